import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, unlinkSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { type GuardedProcess, spawnGuarded } from '../process-guard.js';

/*
 * A provisioning network of the lab's own, for network boot through a real
 * DHCP server: a network namespace holding a bridge, one tap per guest (QEMU
 * runs inside the namespace and opens its tap), and a veth pair whose other
 * end stays in this process's namespace with an address on the bridge's
 * subnet. So the controller, running here, sits on the guests' segment at
 * hostAddress: no routing and no forwarding anywhere, and the namespace has
 * no route beyond its own subnet. dnsmasq runs inside the namespace on the
 * bridge (startDnsmasq).
 *
 * The subnet is a /24 of 198.18.0.0/15 (RFC 2544, benchmarking: never
 * routed) that no address of this host already uses; names carry the pid.
 * destroy() removes everything, and so does this process's exit; a later run
 * removes what a killed run left behind.
 */

const COMMAND_TIMEOUT_MS = 10_000;
const execFileAsync = promisify(execFile);
const LOCK_DIR = tmpdir();
const LOCK_PREFIX = 'metalcast-pxenet-';

async function run(command: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileAsync(command, args, { timeout: COMMAND_TIMEOUT_MS });
    return stdout;
  } catch (error) {
    const failure = error as { stderr?: string; message: string };
    throw new Error(`${command} ${args.join(' ')} failed: ${failure.stderr?.trim() || failure.message}`);
  }
}

/** Why this process cannot build the network, or undefined when it can. */
export function pxeNetworkUnavailable(): string | undefined {
  if (process.platform !== 'linux') return `network namespaces need Linux (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return `network namespaces, bridges and taps need root (running as uid ${process.getuid?.()})`;
  for (const [tool, pkg] of [
    ['ip', 'iproute2'],
    ['dnsmasq', 'dnsmasq-base'],
  ] as const) {
    if (spawnSync('sh', ['-c', `PATH="$PATH:/usr/sbin:/sbin" command -v ${tool}`], { timeout: 5000 }).status !== 0)
      return `${tool} is not installed (apt-get install -y ${pkg})`;
  }
  if (!existsSync('/usr/lib/ipxe/undionly.kpxe')) return "Debian's iPXE binaries are missing (apt-get install -y ipxe)";
  if (!existsSync('/dev/net/tun')) return '/dev/net/tun is missing: taps cannot be made';
  return undefined;
}

export interface PxeNetwork {
  /** The namespace, for `ip netns exec`. */
  readonly namespace: string;
  /** Prefix for a command to run inside the namespace (it execs the command, so signals and pids are the command's). */
  readonly prefix: string[];
  /** The bridge inside the namespace: the interface dnsmasq serves. */
  readonly bridge: string;
  /** This process's address on the guests' segment: where the controller listens. */
  readonly hostAddress: string;
  /** The bridge's own address (dnsmasq's). */
  readonly bridgeAddress: string;
  /** The subnet's network address, e.g. 198.18.7.0. */
  readonly subnet: string;
  /** The addresses DHCP may lease. */
  readonly range: { start: string; end: string };
  /** Makes a tap on the bridge for one guest and returns its name. */
  addTap(): Promise<string>;
  /** Runs a command inside the namespace. */
  exec(args: string[]): Promise<string>;
  /** Starts dnsmasq inside the namespace with this configuration (plus lease, pid and log files of its own). */
  startDnsmasq(config: string, dir: string, name?: string): Promise<Dnsmasq>;
  /**
   * The site's own DHCP server, for proxy-DHCP runs: a second namespace joined
   * to the bridge by a veth pair, at siteDhcpAddress, running a plain dnsmasq
   * that hands out addresses from `range` and knows nothing of network boot.
   */
  startSiteDhcp(dir: string): Promise<Dnsmasq>;
  /** The site DHCP server's address on the bridge. */
  readonly siteDhcpAddress: string;
  /** Removes everything. Idempotent; never throws. */
  destroy(): Promise<void>;
}

export interface Dnsmasq {
  readonly logPath: string;
  /** Its log so far. */
  log(): string;
  stop(): Promise<void>;
}

const live = new Set<{ destroySync(): void }>();
let exitCleanupInstalled = false;

function installExitCleanup(): void {
  if (exitCleanupInstalled) return;
  exitCleanupInstalled = true;
  process.on('exit', () => {
    for (const network of [...live]) network.destroySync();
  });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function runSync(command: string, args: string[]): void {
  try {
    execFileSync(command, args, { timeout: COMMAND_TIMEOUT_MS, stdio: 'ignore' });
  } catch {
    // gone already
  }
}

/** Removes namespaces and links of runs whose process is gone (their lock file names the pid). */
function removeLeftovers(): void {
  let names: string[] = [];
  try {
    names = execFileSync('ls', [LOCK_DIR], { encoding: 'utf8' }).split('\n');
  } catch {
    return;
  }
  for (const name of names) {
    const match = new RegExp(`^${LOCK_PREFIX}(\\d+)$`).exec(name);
    if (!match) continue;
    const path = join(LOCK_DIR, name);
    let owner: { pid: number; namespace: string; hostInterface: string } | undefined;
    try {
      owner = JSON.parse(readFileSync(path, 'utf8'));
    } catch {
      continue;
    }
    if (!owner || alive(owner.pid)) continue;
    runSync('ip', ['link', 'del', owner.hostInterface]);
    runSync('ip', ['netns', 'del', owner.namespace]);
    runSync('ip', ['netns', 'del', `${owner.namespace}-site`]);
    try {
      unlinkSync(path);
    } catch {
      // someone else cleaned it
    }
  }
}

/** Claims a /24 of 198.18.0.0/15 that no interface of this host uses, by an exclusive lock file per block. */
function claimSubnet(owner: { pid: number; namespace: string; hostInterface: string }): { third: number; lockPath: string } {
  const used = execFileSync('ip', ['-o', '-4', 'addr'], { encoding: 'utf8' });
  for (let i = 0; i < 256; i++) {
    const third = (process.pid + i) % 256;
    if (used.includes(` 198.18.${third}.`)) continue;
    const lockPath = join(LOCK_DIR, `${LOCK_PREFIX}${third}`);
    try {
      const fd = openSync(lockPath, 'wx');
      writeSync(fd, JSON.stringify(owner));
      closeSync(fd);
      return { third, lockPath };
    } catch {
      // claimed by another run
    }
  }
  throw new Error('no free /24 in 198.18.0.0/16 for a lab provisioning network');
}

/** Builds the namespace, the bridge and the veth pair. Check pxeNetworkUnavailable() first. */
export async function createPxeNetwork(): Promise<PxeNetwork> {
  removeLeftovers();
  const pid = process.pid;
  const namespace = `mcpxe-${pid}`;
  const hostInterface = `mcpx${pid}h`.slice(0, 15);
  const peerInterface = `mcpx${pid}p`.slice(0, 15);
  const bridge = 'br0';
  const { third, lockPath } = claimSubnet({ pid, namespace, hostInterface });
  const subnet = `198.18.${third}.0`;
  const hostAddress = `198.18.${third}.1`;
  const bridgeAddress = `198.18.${third}.2`;
  let taps = 0;
  let destroyed = false;
  let siteNamespace: string | undefined;
  const dnsmasqs = new Set<GuardedProcess>();
  const exec = (args: string[]) => run('ip', ['netns', 'exec', namespace, ...args]);

  const handle = {
    destroySync() {
      if (destroyed) return;
      destroyed = true;
      live.delete(handle);
      for (const guarded of dnsmasqs) guarded.kill();
      runSync('ip', ['link', 'del', hostInterface]);
      runSync('ip', ['netns', 'del', namespace]);
      if (siteNamespace) runSync('ip', ['netns', 'del', siteNamespace]);
      // A guest that vanished (powered off, killed) never answers again: this process's TCP connections to it
      // would linger half-open for minutes (FIN-WAIT-1, retransmitting) and keep it from exiting. The kernel
      // ends them at once.
      runSync('ss', ['-K', 'dst', `${subnet}/24`]);
      try {
        unlinkSync(lockPath);
      } catch {
        // already gone
      }
    },
  };
  live.add(handle);
  installExitCleanup();

  async function startDnsmasqIn(inNamespace: string, config: string, dir: string, name: string): Promise<Dnsmasq> {
    const confPath = join(dir, `${name}.conf`);
    writeFileSync(confPath, config);
    const logPath = join(dir, `${name}.log`);
    const guarded = spawnGuarded(
      'ip',
      [
        'netns',
        'exec',
        inNamespace,
        'dnsmasq',
        '--keep-in-foreground',
        `--conf-file=${confPath}`,
        '--log-facility=-',
        `--dhcp-leasefile=${join(dir, `${name}.leases`)}`,
        `--pid-file=${join(dir, `${name}.pid`)}`,
        // The lab's dnsmasq runs as root: Debian's dnsmasq-base has no user of its own.
        '--user=root',
        '--group=root',
      ],
      logPath,
    );
    dnsmasqs.add(guarded);
    // Ready when it says so (or fails).
    const deadline = Date.now() + 10_000;
    while (!/started, version/.test(guarded.output())) {
      if (guarded.exited) throw new Error(`dnsmasq exited at start: ${guarded.output().trim()}`);
      if (Date.now() > deadline) throw new Error(`dnsmasq did not start within 10 s: ${guarded.output().trim()}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return {
      logPath,
      log: () => guarded.output(),
      stop: async () => {
        dnsmasqs.delete(guarded);
        await guarded.stop();
      },
    };
  }

  const network: PxeNetwork = {
    namespace,
    prefix: ['ip', 'netns', 'exec', namespace],
    bridge,
    hostAddress,
    bridgeAddress,
    subnet,
    range: { start: `198.18.${third}.100`, end: `198.18.${third}.199` },
    siteDhcpAddress: `198.18.${third}.3`,
    async addTap() {
      const name = `tap${taps++}`;
      await exec(['ip', 'tuntap', 'add', 'dev', name, 'mode', 'tap']);
      await exec(['ip', 'link', 'set', name, 'master', bridge]);
      await exec(['ip', 'link', 'set', name, 'up']);
      return name;
    },
    exec,
    startDnsmasq: (config, dir, name = 'dnsmasq') => startDnsmasqIn(namespace, config, dir, name),
    async startSiteDhcp(dir) {
      const site = `${namespace}-site`;
      await run('ip', ['netns', 'add', site]);
      siteNamespace = site;
      await exec(['ip', 'link', 'add', 'site0', 'type', 'veth', 'peer', 'name', 'site1', 'netns', site]);
      await exec(['ip', 'link', 'set', 'site0', 'master', bridge]);
      await exec(['ip', 'link', 'set', 'site0', 'up']);
      const inSite = (args: string[]) => run('ip', ['netns', 'exec', site, ...args]);
      await inSite(['ip', 'link', 'set', 'lo', 'up']);
      await inSite(['ip', 'addr', 'add', `${network.siteDhcpAddress}/24`, 'dev', 'site1']);
      await inSite(['ip', 'link', 'set', 'site1', 'up']);
      const config = [
        "# The site's DHCP server: addresses only, no network boot.",
        'port=0',
        'interface=site1',
        'bind-interfaces',
        'log-dhcp',
        `dhcp-range=${network.range.start},${network.range.end},255.255.255.0,1h`,
        'dhcp-option=option:router',
        'dhcp-option=option:dns-server',
        'dhcp-authoritative',
        '',
      ].join('\n');
      return startDnsmasqIn(site, config, dir, 'site-dhcp');
    },
    async destroy() {
      if (destroyed) return;
      await Promise.all([...dnsmasqs].map((process) => process.stop()));
      handle.destroySync();
    },
  };

  try {
    await run('ip', ['netns', 'add', namespace]);
    await exec(['ip', 'link', 'set', 'lo', 'up']);
    await exec(['ip', 'link', 'add', bridge, 'type', 'bridge']);
    // No spanning tree delay: a guest's first DHCP packet must not wait for the port to learn.
    await exec(['ip', 'link', 'set', bridge, 'type', 'bridge', 'forward_delay', '0', 'stp_state', '0']);
    await exec(['ip', 'addr', 'add', `${bridgeAddress}/24`, 'dev', bridge]);
    await exec(['ip', 'link', 'set', bridge, 'up']);
    await run('ip', ['link', 'add', hostInterface, 'type', 'veth', 'peer', 'name', peerInterface, 'netns', namespace]);
    await exec(['ip', 'link', 'set', peerInterface, 'master', bridge]);
    await exec(['ip', 'link', 'set', peerInterface, 'up']);
    await run('ip', ['addr', 'add', `${hostAddress}/24`, 'dev', hostInterface]);
    await run('ip', ['link', 'set', hostInterface, 'up']);
  } catch (error) {
    await network.destroy();
    throw error;
  }
  return network;
}
