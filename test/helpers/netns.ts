import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, unlinkSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

/*
 * A network namespace joined to this one by a veth pair, for tests that need
 * a real link to break: iptables DROP inside the namespace cuts it the way a
 * pulled cable or a dead switch does, with no FIN and no RST.
 *
 * Everything is this test's own: the namespace, both ends of the veth, and a
 * /30 of a documentation range (TEST-NET-2, TEST-NET-3, then TEST-NET-1) that
 * no address or route of this host already covers. Names carry the pid, so
 * runs side by side do not collide, and every command has a time limit.
 * destroy() removes it all; so does the exit of the process, and a later
 * run removes what a killed run left behind.
 */

const COMMAND_TIMEOUT_MS = 10_000;
const execFileAsync = promisify(execFile);

/** Why this process cannot build network namespaces, or undefined when it can. */
export function netnsUnavailable(): string | undefined {
  if (process.platform !== 'linux') return `network namespaces need Linux (this is ${process.platform})`;
  const uid = process.getuid?.();
  if (uid !== 0) return `creating network namespaces needs root (running as uid ${uid})`;
  for (const [tool, flag] of [
    ['ip', '-V'],
    ['tc', '-V'],
    ['iptables', '--version'],
  ] as const) {
    const probe = spawnSync(tool, [flag], { timeout: 5000, stdio: 'ignore' });
    if (probe.error) return `${tool} is not installed (${(probe.error as NodeJS.ErrnoException).code ?? probe.error.message})`;
  }
  return undefined;
}

async function run(command: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileAsync(command, args, { timeout: COMMAND_TIMEOUT_MS });
    return stdout;
  } catch (error) {
    const failure = error as { stderr?: string; message: string };
    throw new Error(`${command} ${args.join(' ')} failed: ${failure.stderr?.trim() || failure.message}`);
  }
}

function runSync(command: string, args: string[]): boolean {
  try {
    execFileSync(command, args, { timeout: COMMAND_TIMEOUT_MS, stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface VethNamespaceOptions {
  /** Shapes traffic from this namespace into the other one to this many bytes per second (tc tbf); 0 for none. Default 0. */
  rateBytesPerSecond?: number;
}

let created = 0;
const live = new Set<VethNamespace>();

/** A namespace with one end of a veth pair; the other end, and its address, are in this process's namespace. */
export class VethNamespace {
  private destroyed = false;
  private cutRules: string[][] = [];

  private constructor(
    /** Namespace name, for `ip netns exec`. */
    readonly name: string,
    /** The veth end in this process's namespace. */
    readonly hostInterface: string,
    /** The veth end inside the namespace. */
    readonly namespaceInterface: string,
    /** Address of hostInterface: what processes in the namespace dial to reach this side. */
    readonly hostAddress: string,
    /** Address of namespaceInterface. */
    readonly namespaceAddress: string,
    private readonly lockPath: string,
  ) {}

  /** Builds the namespace and the link. Check netnsUnavailable() first. */
  static async create(options: VethNamespaceOptions = {}): Promise<VethNamespace> {
    await removeLeftovers();
    const n = created++;
    const pid = process.pid;
    const block = await claimBlock();
    const ns = new VethNamespace(`mcnet-${pid}-${n}`, `mch${pid}n${n}`, `mca${pid}n${n}`, block.host, block.peer, block.lockPath);
    live.add(ns);
    installExitCleanup();
    try {
      await run('ip', ['netns', 'add', ns.name]);
      await run('ip', ['link', 'add', ns.hostInterface, 'type', 'veth', 'peer', 'name', ns.namespaceInterface, 'netns', ns.name]);
      await run('ip', ['addr', 'add', `${ns.hostAddress}/30`, 'dev', ns.hostInterface]);
      await run('ip', ['link', 'set', ns.hostInterface, 'up']);
      await ns.exec(['ip', 'addr', 'add', `${ns.namespaceAddress}/30`, 'dev', ns.namespaceInterface]);
      await ns.exec(['ip', 'link', 'set', ns.namespaceInterface, 'up']);
      await ns.exec(['ip', 'link', 'set', 'lo', 'up']);
      const rate = options.rateBytesPerSecond ?? 0;
      if (rate > 0) {
        // Egress of the host end is what flows into the namespace. The burst covers a 64 KiB GSO packet.
        await run('tc', [
          'qdisc',
          'add',
          'dev',
          ns.hostInterface,
          'root',
          'tbf',
          'rate',
          `${Math.round(rate * 8)}bit`,
          'burst',
          '256kb',
          'limit',
          '1mb',
        ]);
      }
    } catch (error) {
      await ns.destroy();
      throw error;
    }
    return ns;
  }

  /** Prefix for a command to run inside the namespace (ip netns exec execs it, so signals reach it). */
  get prefix(): string[] {
    return ['ip', 'netns', 'exec', this.name];
  }

  /** Runs a command inside the namespace and returns its output. */
  exec(args: string[]): Promise<string> {
    return run('ip', ['netns', 'exec', this.name, ...args]);
  }

  /** Drops every packet in and out of the namespace's veth end (iptables inside the namespace): a link gone silent. */
  async cut(): Promise<void> {
    if (this.cutRules.length > 0) return;
    this.cutRules = [
      ['INPUT', '-i', this.namespaceInterface, '-j', 'DROP'],
      ['OUTPUT', '-o', this.namespaceInterface, '-j', 'DROP'],
    ];
    for (const rule of this.cutRules) await this.exec(['iptables', '-w', '5', '-I', ...rule]);
  }

  /** Removes the DROP rules again. */
  async mend(): Promise<void> {
    const rules = this.cutRules;
    this.cutRules = [];
    for (const rule of rules) await this.exec(['iptables', '-w', '5', '-D', ...rule]);
  }

  /** Removes the veth pair, the namespace and the address claim. Idempotent; never throws. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    live.delete(this);
    // Deleting one end deletes the pair, even while a process still holds the namespace open.
    await run('ip', ['link', 'del', this.hostInterface]).catch(() => {});
    await run('ip', ['netns', 'del', this.name]).catch(() => {});
    releaseLock(this.lockPath);
  }

  /** destroy() for exit handlers: synchronous. */
  destroySync(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    live.delete(this);
    runSync('ip', ['link', 'del', this.hostInterface]);
    runSync('ip', ['netns', 'del', this.name]);
    releaseLock(this.lockPath);
  }
}

let exitCleanupInstalled = false;

/** On exit, and on SIGINT or SIGTERM (then re-raised), removes what is still there. */
function installExitCleanup(): void {
  if (exitCleanupInstalled) return;
  exitCleanupInstalled = true;
  const cleanup = () => {
    for (const ns of [...live]) ns.destroySync();
  };
  process.on('exit', cleanup);
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      cleanup();
      process.kill(process.pid, signal);
    });
  }
}

/** Namespaces, veths and address claims of runs whose process is gone. */
async function removeLeftovers(): Promise<void> {
  const namespaces = await run('ip', ['netns', 'list']);
  for (const match of namespaces.matchAll(/^(mcnet-(\d+)-\d+)\b/gm)) {
    if (!alive(Number(match[2]))) await run('ip', ['netns', 'del', match[1] as string]).catch(() => {});
  }
  const links = await run('ip', ['-o', 'link', 'show']);
  for (const match of links.matchAll(/^\d+: (mch(\d+)n\d+)[@:]/gm)) {
    if (!alive(Number(match[2]))) await run('ip', ['link', 'del', match[1] as string]).catch(() => {});
  }
}

/** Documentation ranges (RFC 5737), in order of preference; TEST-NET-1 comes last because hosts sometimes use it. */
const RANGES = ['198.51.100', '203.0.113', '192.0.2'];

interface Block {
  host: string;
  peer: string;
  lockPath: string;
}

/**
 * A /30 of a documentation range that no address or route of this host
 * overlaps, held by a lock file with our pid so that a parallel run does not
 * take it between our check and our `ip addr add`.
 */
async function claimBlock(): Promise<Block> {
  const taken = [...(await prefixesInUse())];
  const start = process.pid % 64;
  for (const range of RANGES) {
    for (let i = 0; i < 64; i++) {
      const base = ((start + i) % 64) * 4;
      const network = toNumber(`${range}.${base}`);
      if (taken.some((p) => overlaps(p, { network, length: 30 }))) continue;
      const lockPath = join(tmpdir(), `metalcast-netns-${range}.${base}.lock`);
      if (!takeLock(lockPath)) continue;
      return { host: `${range}.${base + 1}`, peer: `${range}.${base + 2}`, lockPath };
    }
  }
  throw new Error(`no free /30 left in ${RANGES.map((r) => `${r}.0/24`).join(', ')}`);
}

interface Prefix {
  network: number;
  length: number;
}

async function prefixesInUse(): Promise<Prefix[]> {
  const prefixes: Prefix[] = [];
  const addresses = await run('ip', ['-o', '-4', 'addr', 'show']);
  for (const match of addresses.matchAll(/\binet (\d+\.\d+\.\d+\.\d+)\/(\d+)/g)) {
    prefixes.push({ network: toNumber(match[1] as string), length: Number(match[2]) });
  }
  const routes = await run('ip', ['-o', '-4', 'route', 'show', 'table', 'all']);
  for (const line of routes.split('\n')) {
    // "10.0.0.0/8 via …", "local 127.0.0.1 dev lo …"; the default route overlaps everything and is no conflict.
    const match = /^(?:[a-z]+ )?(\d+\.\d+\.\d+\.\d+)(?:\/(\d+))?\b/.exec(line.trim());
    if (match) prefixes.push({ network: toNumber(match[1] as string), length: Number(match[2] ?? 32) });
  }
  return prefixes;
}

function toNumber(address: string): number {
  return address.split('.').reduce((value, octet) => value * 256 + Number(octet), 0);
}

function overlaps(a: Prefix, b: Prefix): boolean {
  const length = Math.min(a.length, b.length);
  if (length === 0) return false;
  const size = 2 ** (32 - length);
  return Math.floor(a.network / size) === Math.floor(b.network / size);
}

function takeLock(path: string): boolean {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(path, 'wx');
      writeSync(fd, String(process.pid));
      closeSync(fd);
      return true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      const owner = Number(readFileSafe(path));
      if (Number.isInteger(owner) && owner > 0 && alive(owner)) return false;
      try {
        unlinkSync(path);
      } catch {
        // another run removed it first; try again
      }
    }
  }
  return false;
}

function readFileSafe(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

function releaseLock(path: string): void {
  if (readFileSafe(path) !== String(process.pid)) return;
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}
