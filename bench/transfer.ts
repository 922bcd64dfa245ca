/**
 * The transfer benchmark (npm run bench -- transfer): an image from the
 * controller to an agent's disk over TLS, the default, each figure against a
 * baseline doing the same work in the same run, rounds interleaved, medians
 * of paired ratios (the machine is shared: only ratios measured minutes
 * apart mean anything).
 *
 * Cases, one of each per round, in an order that rotates every round:
 * - metalcast TLS: a deploy through the real API to a real agent process
 *   (bin/metalcast.js) with --ca, the controller with a certificate from
 *   `metalcast tls init` (ECDSA P-256). Timed by the agent's own log lines,
 *   'writing image; ...' (after StatImage) to 'image written and verified'
 *   (after hashing everything, and the fsync). Then undeploy (quick clean).
 * - TLS socket: bench/transfer-socket.ts, two processes, read -> TLS ->
 *   sha256 -> write, fsync; same certificate, same Node.
 * - metalcast plaintext (--insecure controller and agent) and the same
 *   socket pair over plain `net`.
 * - the Ironic-agent-style peer: Debian's nginx (its own instance and
 *   config here, sendfile on, HTTPS with the same certificate) serving the
 *   image file to bench/transfer-requests.py (python3-requests, stream,
 *   1 MiB chunks, sha256, write, fsync) - what ironic-python-agent does.
 * - upload: `metalcast image upload` over TLS (the CLI process against the
 *   controller), timed by the controller's 'image uploaded' line; its
 *   baseline is the TLS socket pair of the same round (the same work: read,
 *   TLS, sha256, write).
 * CPU: utime + stime of every process over its timed window (from /proc for
 * metalcast and nginx, from the process itself for the baselines), as
 * CPU-seconds per GB (10^9 bytes): the figure that survives a busy machine.
 * --noise 1 runs one CPU-bound process per core beside every case, baselines
 * included. Every written disk and file is hashed (first round) or its
 * sha256 checked by the writer itself (every run).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import { existsSync, readFileSync, statfsSync } from 'node:fs';
import { copyFile, mkdir, open, rm, truncate, writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import { connectOperator, type OperatorClients, readTokenFile } from '../cli/client.js';
import { byteSize } from '../common/config.js';
import { type TLS_INIT_FILES, tlsInit } from '../common/tls-init.js';
import { type FakeMachine, uniqueFakeMachine } from '../demo/fake-machine.js';
import { ProvisionAction, ProvisionState } from '../gen/metalcast/v1/node.js';
import { build } from '../scripts/build.js';
import { packageAgent } from '../scripts/package-agent.js';
import { seedImage } from '../test/helpers/images.js';
import {
  type BenchCheck,
  type BenchResult,
  BenchUsageError,
  breathe,
  columns,
  type NumberOptions,
  parseNumberOptions,
  withTempDir,
} from './harness.js';
import { freePorts, LoggedProcess, type LogLine, lineTime, MACHINE, METALCAST, ProcSampler, REPO } from './transfer-procs.js';
import type { SocketReceive, SocketSend } from './transfer-socket.js';

export const description =
  'image transfer over TLS (and plaintext) controller -> agent vs a TLS (net) socket pair, vs nginx + python3-requests, upload; CPU-s per GB; --noise';

const MIB = 1024 * 1024;
const GIB = 1024 * MIB;

export const options = {
  size: { default: GIB, description: 'image size in bytes; K, M, G suffixes allowed (default 1G; 256M for a quick run)' },
  runs: { default: 5, integer: true, description: 'rounds; each round runs every case once, in rotating order' },
  noise: { default: 0, integer: true, description: '1: one CPU-bound process per core beside every case, baselines included' },
  plain: { default: 1, integer: true, description: '0: skip metalcast plaintext and its net socket baseline' },
  nginx: { default: 1, integer: true, description: '0: skip the nginx + python3-requests peer' },
  upload: { default: 1, integer: true, description: '0: skip metalcast image upload' },
  artifacts: {
    default: 1,
    integer: true,
    description:
      '1: run what operators run, the compiled controller and CLI (npm run build, into dist/) and the packaged agent bundle (npm run package:agent); 0: bin/metalcast.js through tsx. BENCH_TRANSFER_METALCAST=<path to a metalcast.js> overrides both',
  },
  fleet: {
    default: 4,
    integer: true,
    description: 'agents deploying at once over TLS in the fleet case (aggregate MB/s, controller peak RSS); 0 skips it',
  },
  streams: {
    default: 0,
    integer: true,
    description: "the agents' --image-streams (connections per deploy, each on its own thread); 0: the agent's default, auto",
  },
  delta: {
    default: 1,
    integer: true,
    description: '0: skip the delta case (a redeploy of the same image, and of one with 1 % of its chunks changed)',
  },
} satisfies NumberOptions;

/** The bars of issue 16, as paired-ratio medians. */
const BARS = {
  tlsOverSocket: 0.85,
  plainOverSocket: 0.9,
  tlsOverPeer: 1.5,
  uploadOverSocket: 0.7,
  /** Image bytes on the wire: a redeploy of the same image, of one with 1 % of its chunks changed. */
  deltaSameWireShare: 0.01,
  deltaChangedWireShare: 0.03,
  /**
   * The controller's resident memory may grow by this much per concurrent
   * transfer: its bound is the 16 MiB HTTP/2 window plus grpc-js's queue of
   * 16 chunk messages (3.5 MiB each) for a stalled reader, about 72 MiB.
   */
  fleetRssPerAgentBytes: 96 * MIB,
  noisyTlsOverSocket: 0.7,
  controllerCpuOverSender: 2,
  agentCpuOverReceiver: 1.3,
};

const IMAGE_NAME = 'bench-os';
/** The image with 1 % of its chunks changed, for the delta case. */
const DELTA_IMAGE_NAME = 'bench-os-1pct';
/** The manifest's chunk size, passed to the controller (its default, --image-manifest-chunk-size). */
const MANIFEST_CHUNK_BYTES = MIB;
const SOCKET_SCRIPT = join(REPO, 'bench', 'transfer-socket.ts');
const REQUESTS_SCRIPT = join(REPO, 'bench', 'transfer-requests.py');
const TIMEOUT_MS = 600_000;
const STATE_TIMEOUT_MS = 180_000;
const NODE_FLAGS = (process.env.BENCH_TRANSFER_NODE_OPTIONS ?? '').split(/\s+/).filter((f) => f !== '');

type CaseName = 'metalcast-tls' | 'tls-socket' | 'metalcast-plain' | 'net-socket' | 'nginx-requests' | 'upload-tls' | 'fleet-tls' | 'delta';
/** What a case's runs are filed under: its name, or one of the delta case's three deploys. */
type SampleName = Exclude<CaseName, 'delta'> | 'delta-full' | 'delta-same' | 'delta-1pct';

interface Sample {
  round: number;
  ms: number;
  mbps: number;
  /** CPU-seconds per GB of each side. */
  senderCpuPerGb: number;
  receiverCpuPerGb: number;
  /** Delta cases: image bytes ReadImage carried. */
  wireBytes?: number;
  /** Fleet case: the controller's resident memory before the deploys and at its peak during them. */
  rssBefore?: number;
  rssPeak?: number;
}

/** One timed deploy (deployTimed). */
interface DeployRun {
  start: number;
  end: number;
  controllerCpuMs: number;
  agentCpuMs: number;
  wireBytes: number;
}

interface ImageFile {
  file: string;
  size: number;
  sha256: string;
}

/** One node of a controller: a fake machine and its real agent process. */
interface BenchNode {
  name: string;
  machine: FakeMachine;
  disk: string;
  agent: LoggedProcess;
}

interface Side {
  label: 'tls' | 'plain';
  tls: boolean;
  controller: LoggedProcess;
  dataDir: string;
  address: string;
  operator: OperatorClients;
  /** The node of the one-agent cases (and the delta cases). */
  node: BenchNode;
  /** The nodes that deploy at once in the fleet case (TLS side only). */
  fleet: BenchNode[];
}

type Options = ReturnType<typeof parseOptions>;

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseOptions(args);
  // Image files, blobs, disks (every agent's, sparse until written) and the delta image with its blob.
  const needed = o.size * (8 + o.fleet + (o.delta ? 2 : 0)) + GIB;
  const fs = statfsSync(tmpdir());
  if (fs.bavail * fs.bsize < needed) {
    throw new BenchUsageError(
      `${tmpdir()} has ${gib(fs.bavail * fs.bsize)} free, the run needs about ${gib(needed)}; use a smaller --size`,
    );
  }
  if (o.nginx && !findNginx()) {
    throw new BenchUsageError('nginx is not installed: apt-get install -y nginx-light (or run with --nginx 0 to skip the peer)');
  }
  return withTempDir('metalcast-bench-transfer-', async (dir) => {
    const bench = new TransferBench(o, dir);
    try {
      return await bench.run();
    } finally {
      await bench.close();
    }
  });
}

function parseOptions(args: string[]) {
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const eq = /^--([^=]+)=(.*)$/.exec(arg);
    const flag = eq ? eq[1]! : arg.slice(2);
    const value = eq ? eq[2] : args[i + 1];
    if (flag === 'noise' && !eq && (value === undefined || value.startsWith('--'))) {
      rest.push('--noise', '1');
    } else if (flag === 'size' && value !== undefined) {
      let bytes: number;
      try {
        bytes = Number.isFinite(Number(value)) ? Number(value) : byteSize({ min: 1, max: 2 ** 50 })(value);
      } catch (error) {
        throw new BenchUsageError(`--size: ${(error as Error).message}`);
      }
      rest.push('--size', String(bytes));
      if (!eq) i++;
    } else {
      rest.push(arg);
    }
  }
  const raw = parseNumberOptions(rest, options);
  if (raw.size < MIB) throw new BenchUsageError('--size must be at least 1M');
  if (raw.runs < 1) throw new BenchUsageError('--runs must be at least 1');
  if (raw.fleet < 0 || raw.fleet > 16) throw new BenchUsageError('--fleet must be 0 (skip) to 16 agents');
  return {
    size: Math.round(raw.size),
    runs: raw.runs,
    noise: raw.noise > 0,
    plain: raw.plain > 0,
    nginx: raw.nginx > 0,
    upload: raw.upload > 0,
    artifacts: raw.artifacts > 0,
    fleet: raw.fleet,
    delta: raw.delta > 0,
    streams: raw.streams,
  };
}

function findNginx(): string | undefined {
  return ['/usr/sbin/nginx', '/usr/bin/nginx'].find((p) => existsSync(p));
}

class TransferBench {
  private readonly sampler = new ProcSampler(50);
  private readonly checks: BenchCheck[] = [];
  private readonly samples = new Map<SampleName, Sample[]>();
  private tls!: Side;
  private plain: Side | undefined;
  private tlsFiles!: Record<keyof typeof TLS_INIT_FILES, string>;
  private image: ImageFile = { sha256: '', size: 0, file: '' };
  private deltaImage: ImageFile | undefined;
  private nginx: ChildProcess | undefined;
  private nginxPort = 0;
  private noise: ChildProcess[] = [];
  private readonly diskSize: number;
  private readonly verifyFailed: string[] = [];
  private uploads = 0;
  private programs!: Programs;

  constructor(
    private readonly o: Options,
    private readonly dir: string,
  ) {
    this.diskSize = Math.ceil((o.size + MIB) / MIB) * MIB;
  }

  async run(): Promise<BenchResult> {
    const o = this.o;
    console.log(
      `transfer: ${size(o.size)} of random data, ${o.runs} rounds; ${o.noise ? `with noise (${availableParallelism()} busy processes)` : 'no added noise'}; ` +
        `Node ${process.version}; files in ${this.dir}`,
    );
    console.log(
      `  load average at the start: ${loadavg()
        .map((l) => l.toFixed(1))
        .join(' ')}`,
    );
    this.sampler.track(MACHINE);
    this.programs = await programs(o.artifacts, this.dir);
    console.log(`  programs: ${this.programs.what}`);
    await this.setup();
    const cases: CaseName[] = [
      'metalcast-tls',
      'tls-socket',
      ...(o.plain ? (['metalcast-plain', 'net-socket'] as const) : []),
      ...(o.nginx ? (['nginx-requests'] as const) : []),
      ...(o.upload ? (['upload-tls'] as const) : []),
      ...(o.fleet > 0 ? (['fleet-tls'] as const) : []),
      ...(o.delta ? (['delta'] as const) : []),
    ];
    if (o.noise) this.startNoise();
    try {
      for (let round = 0; round < o.runs; round++) {
        const line: string[] = [];
        for (let j = 0; j < cases.length; j++) {
          const name = cases[(round + j) % cases.length]!;
          for (const [filed, sample] of await this.once(name, round)) {
            list(this.samples, filed).push(sample);
            line.push(`${filed} ${fmt(sample.mbps)}`);
          }
          await breathe();
        }
        console.log(`  round ${round + 1}: ${line.join(', ')} MB/s`);
      }
    } finally {
      this.stopNoise();
    }
    console.log(
      `  load average at the end: ${loadavg()
        .map((l) => l.toFixed(1))
        .join(' ')}`,
    );
    return this.report(cases);
  }

  async close(): Promise<void> {
    this.stopNoise();
    this.sampler.stop();
    this.nginx?.kill('SIGTERM');
    for (const side of [this.tls, this.plain]) {
      if (!side) continue;
      side.operator.close();
      for (const node of [side.node, ...side.fleet]) await node.agent.stop(5000);
      await side.controller.stop(10_000);
    }
  }

  // ---------------------------------------------------------------------------
  // Setup.

  private async setup(): Promise<void> {
    this.tlsFiles = await tlsInit({ dir: join(this.dir, 'tls'), hosts: ['127.0.0.1', 'localhost'], days: 30 });
    this.image.file = join(this.dir, 'image.raw');
    this.image.size = this.o.size;
    await writeRandomFile(this.image.file, this.o.size);
    this.tls = await this.startSide('tls', true);
    // Seeded with their chunk manifests, as an upload leaves them (else round 1's first deploy would build one).
    // Building it reads the blob, which the controller stored past the page cache (controller/images/blob-writer.ts):
    // every sender then starts from a cached file, as the baselines' image file is.
    const seed = (side: Side, name: string, file: string) =>
      seedImage(side.dataDir, name, fileChunks(file), undefined, MANIFEST_CHUNK_BYTES);
    this.image.sha256 = (await seed(this.tls, IMAGE_NAME, this.image.file)).sha256;
    if (this.o.plain) {
      this.plain = await this.startSide('plain', false);
      await seed(this.plain, IMAGE_NAME, this.image.file);
    }
    if (this.o.delta) {
      this.deltaImage = await this.writeChangedImage(join(this.dir, 'image-1pct.raw'));
      await seed(this.tls, DELTA_IMAGE_NAME, this.deltaImage.file);
    }
    for (let i = 0; i < this.o.fleet; i++) this.tls.fleet.push(await this.startNode(this.tls, `bench-fleet-${i + 1}`, 3 + i));
    for (const side of [this.tls, this.plain]) {
      if (!side) continue;
      for (const node of [side.node, ...side.fleet]) await this.makeAvailable(side, node);
    }
    if (this.o.nginx) {
      await this.startNginx();
      console.log(
        `  nginx: ${kernelTlsOffered() ? 'the kernel offers kTLS (/proc/net/tls_stat), so sendfile can serve TLS' : 'this kernel has no kTLS (no /proc/net/tls_stat): nginx encrypts through OpenSSL, without sendfile'}`,
      );
    }
    console.log(`  set up: image sha256 ${this.image.sha256.slice(0, 12)}…, controllers and agents ready`);
  }

  private async startSide(label: 'tls' | 'plain', tls: boolean): Promise<Side> {
    const dataDir = join(this.dir, `controller-${label}`);
    await mkdir(dataDir, { recursive: true });
    const [grpcPort, metricsPort] = await freePorts(2);
    const address = `127.0.0.1:${grpcPort}`;
    const secure = tls ? [`--tls-cert=${this.tlsFiles.controller}`, `--tls-key=${this.tlsFiles.controllerKey}`] : ['--insecure'];
    const controller = new LoggedProcess(
      `controller ${label}`,
      [
        ...NODE_FLAGS,
        ...this.programs.metalcast,
        'controller',
        `--listen=${address}`,
        `--metrics-listen=127.0.0.1:${metricsPort}`,
        `--data-dir=${dataDir}`,
        `--controller-id=bench-transfer-${label}`,
        '--heartbeat-timeout=600s',
        '--heartbeat-interval-min=250ms',
        '--heartbeat-interval-max=500ms',
        '--startup-grace=600s',
        '--deploy-final-power=none',
        '--clean-mode=quick',
        '--shutdown-timeout=5s',
        '--log-level=info',
        `--image-manifest-chunk-size=${MANIFEST_CHUNK_BYTES}`,
        ...secure,
      ],
      join(this.dir, `controller-${label}.log`),
    );
    await controller.waitFor((l) => l.msg === 'controller started', 60_000);
    const operator = connectOperator(
      address,
      30_000,
      readTokenFile(join(dataDir, 'admin.token')),
      tls ? { caPem: readFileSync(this.tlsFiles.ca, 'utf8') } : undefined,
    );
    const side: Side = { label, tls, controller, dataDir, address, operator, node: undefined as unknown as BenchNode, fleet: [] };
    side.node = await this.startNode(side, `bench-${label}`, tls ? 1 : 2);
    return side;
  }

  /** A fake machine and a real agent process for it, against the side's controller. */
  private async startNode(side: Side, name: string, index: number): Promise<BenchNode> {
    const { tls, address } = side;
    const machine = await uniqueFakeMachine(join(this.dir, 'machines', name), index, {
      disks: [{ name: 'sda', sizeBytes: this.diskSize, model: 'BENCH DISK', serial: `BENCH${index}`, rotational: false }],
    });
    const agent = new LoggedProcess(
      `agent ${name}`,
      [
        ...NODE_FLAGS,
        ...this.programs.agent,
        `--controller=${address}`,
        '--listen=127.0.0.1:0',
        `--root=${machine.root}`,
        '--power-driver=recording',
        `--power-record-file=${join(machine.root, 'power.log')}`,
        '--lookup-backoff-start=100ms',
        '--lookup-backoff-max=500ms',
        '--reconnect-delay=200ms',
        '--min-heartbeat-gap=200ms',
        '--log-level=info',
        ...(tls ? [`--ca=${this.tlsFiles.ca}`] : ['--insecure']),
        ...(this.o.streams > 0 ? [`--image-streams=${this.o.streams}`] : []),
      ],
      join(this.dir, `agent-${name}.log`),
    );
    await agent.waitFor((l) => l.msg === 'agent API listening', 60_000);
    return { name, machine, disk: machine.disks[0]!.path, agent };
  }

  private async makeAvailable(side: Side, node: BenchNode): Promise<void> {
    const { nodes } = side.operator;
    await nodes.createNode({ name: node.name, macAddresses: [node.machine.macs[0]!] });
    await nodes.setProvisionState({ node: node.name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await nodes.setProvisionState({ node: node.name, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
    await this.waitState(side, node, ProvisionState.PROVISION_STATE_AVAILABLE);
  }

  private async startNginx(): Promise<void> {
    const [port] = await freePorts(1);
    this.nginxPort = port!;
    const root = join(this.dir, 'nginx');
    await mkdir(join(root, 'tmp'), { recursive: true });
    const config = join(root, 'nginx.conf');
    // Tuned as an operator would for one large static file over HTTPS: sendfile (kTLS when the kernel
    // offers it), large output buffers, no access log. Runs as this user, so it can read the temp dir.
    await writeFile(
      config,
      `${process.getuid?.() === 0 ? 'user root;\n' : ''}worker_processes 1;
daemon off;
master_process on;
pid ${join(root, 'nginx.pid')};
error_log ${join(root, 'error.log')} warn;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  output_buffers 2 1m;
  ssl_buffer_size 16k;
  client_body_temp_path ${join(root, 'tmp')};
  proxy_temp_path ${join(root, 'tmp')};
  fastcgi_temp_path ${join(root, 'tmp')};
  uwsgi_temp_path ${join(root, 'tmp')};
  scgi_temp_path ${join(root, 'tmp')};
  server {
    listen 127.0.0.1:${this.nginxPort} ssl;
    ssl_certificate ${this.tlsFiles.controller};
    ssl_certificate_key ${this.tlsFiles.controllerKey};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_conf_command Options KTLS;
    root ${this.dir};
    location = /image.raw { }
  }
}
`,
    );
    this.nginx = spawn(findNginx()!, ['-c', config, '-p', root], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    this.nginx.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    const deadline = Date.now() + 10_000;
    while (!existsSync(join(root, 'nginx.pid'))) {
      if (Date.now() > deadline || this.nginx.exitCode !== null) throw new Error(`nginx did not start: ${stderr}`);
      await sleep(100);
    }
  }

  /** nginx's worker processes (the master only supervises). */
  private nginxWorkers(): number[] {
    const master = this.nginx?.pid;
    if (!master) return [];
    try {
      return readFileSync(`/proc/${master}/task/${master}/children`, 'utf8')
        .trim()
        .split(/\s+/)
        .filter((p) => p !== '')
        .map(Number);
    } catch {
      return [];
    }
  }

  private startNoise(): void {
    for (let i = 0; i < availableParallelism(); i++) {
      this.noise.push(
        spawn(process.execPath, ['-e', 'const end = Date.now() + 3_600_000; while (Date.now() < end) {}'], { stdio: 'ignore' }),
      );
    }
  }

  private stopNoise(): void {
    for (const child of this.noise) child.kill('SIGKILL');
    this.noise = [];
  }

  // ---------------------------------------------------------------------------
  // Cases.

  private async once(name: CaseName, round: number): Promise<[SampleName, Sample][]> {
    switch (name) {
      case 'metalcast-tls':
        return [[name, await this.deployOnce(this.tls, round)]];
      case 'metalcast-plain':
        return [[name, await this.deployOnce(this.plain!, round)]];
      case 'tls-socket':
        return [[name, await this.socketOnce(true, round)]];
      case 'net-socket':
        return [[name, await this.socketOnce(false, round)]];
      case 'nginx-requests':
        return [[name, await this.peerOnce(round)]];
      case 'upload-tls':
        return [[name, await this.uploadOnce(round)]];
      case 'fleet-tls':
        return [[name, await this.fleetOnce(round)]];
      case 'delta':
        return this.deltaOnce(round);
    }
  }

  private sample(round: number, start: number, end: number, senderCpuMs: number, receiverCpuMs: number): Sample {
    const gb = this.o.size / 1e9;
    return {
      round,
      ms: end - start,
      mbps: this.o.size / 1e6 / ((end - start) / 1000),
      senderCpuPerGb: senderCpuMs / 1000 / gb,
      receiverCpuPerGb: receiverCpuMs / 1000 / gb,
    };
  }

  /** CPU milliseconds of `pid` between two times, from the sampler. */
  private cpuMs(pid: number, from: number, to: number): number {
    return (this.sampler.cpuPercent(pid, from, to) / 100) * (to - from);
  }

  private async deployOnce(side: Side, round: number): Promise<Sample> {
    const run = await this.deployTimed(side, side.node, IMAGE_NAME, true);
    if (round === 0) await this.verifyFile(side.node.disk, `${side.node.agent.label}'s disk`, this.image);
    await this.undeploy(side, [side.node]);
    return this.sample(round, run.start, run.end, run.controllerCpuMs, run.agentCpuMs);
  }

  /**
   * One deploy of `image` to `node`, timed by its agent's log lines; with
   * `fresh` its disk is first emptied (a sparse file of zeros, as a new disk).
   * Leaves the node ACTIVE.
   */
  private async deployTimed(side: Side, node: BenchNode, image: string, fresh: boolean): Promise<DeployRun> {
    if (fresh) {
      await truncate(node.disk, 0);
      await truncate(node.disk, this.diskSize);
    }
    const from = node.agent.lines.length;
    this.sampler.track(node.agent.pid);
    this.sampler.track(side.controller.pid);
    await side.operator.nodes.setProvisionState({
      node: node.name,
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: { image, target: undefined },
    });
    const { start, end, endLine } = await writeWindow(node, from);
    this.sampler.sampleAll();
    await this.waitState(side, node, ProvisionState.PROVISION_STATE_ACTIVE);
    return {
      start,
      end,
      controllerCpuMs: this.cpuMs(side.controller.pid, start, end),
      agentCpuMs: this.cpuMs(node.agent.pid, start, end),
      // The chunked writer counts the image bytes ReadImage brought; the stream writer has no such field.
      wireBytes: typeof endLine.fromController === 'number' ? endLine.fromController : this.o.size,
    };
  }

  private async undeploy(side: Side, nodes: BenchNode[]): Promise<void> {
    for (const node of nodes) {
      await side.operator.nodes.setProvisionState({ node: node.name, action: ProvisionAction.PROVISION_ACTION_UNDEPLOY });
    }
    for (const node of nodes) await this.waitState(side, node, ProvisionState.PROVISION_STATE_AVAILABLE);
  }

  /**
   * The fleet case: every fleet node deploys the image at once over TLS.
   * Aggregate MB/s over the window from the first agent's start line to the
   * last one's end; CPU per GB moved; the controller's resident memory
   * before and at its peak (sampled every 50 ms).
   */
  private async fleetOnce(round: number): Promise<Sample> {
    const side = this.tls;
    const nodes = side.fleet;
    for (const node of nodes) {
      await truncate(node.disk, 0);
      await truncate(node.disk, this.diskSize);
      this.sampler.track(node.agent.pid);
    }
    this.sampler.track(side.controller.pid);
    const before = Date.now();
    const froms = nodes.map((node) => node.agent.lines.length);
    await Promise.all(
      nodes.map((node) =>
        side.operator.nodes.setProvisionState({
          node: node.name,
          action: ProvisionAction.PROVISION_ACTION_DEPLOY,
          deploy: { image: IMAGE_NAME, target: undefined },
        }),
      ),
    );
    const windows = await Promise.all(nodes.map((node, i) => writeWindow(node, froms[i] as number)));
    this.sampler.sampleAll();
    const start = Math.min(...windows.map((w) => w.start));
    const end = Math.max(...windows.map((w) => w.end));
    const bytes = nodes.length * this.o.size;
    const agentsCpuMs = nodes.reduce((sum, node) => sum + this.cpuMs(node.agent.pid, start, end), 0);
    const sample: Sample = {
      round,
      ms: end - start,
      mbps: bytes / 1e6 / ((end - start) / 1000),
      senderCpuPerGb: this.cpuMs(side.controller.pid, start, end) / 1000 / (bytes / 1e9),
      receiverCpuPerGb: agentsCpuMs / 1000 / (bytes / 1e9),
      rssBefore: this.sampler.rssAt(side.controller.pid, before),
      rssPeak: this.sampler.peakRss(side.controller.pid, before, end),
    };
    for (const node of nodes) await this.waitState(side, node, ProvisionState.PROVISION_STATE_ACTIVE);
    if (round === 0) for (const node of nodes) await this.verifyFile(node.disk, `${node.agent.label}'s disk`, this.image);
    await this.undeploy(side, nodes);
    return sample;
  }

  /**
   * The delta cases, in one sequence on the TLS node: a full deploy to an
   * empty disk, a redeploy of the same image over it, then a deploy of the
   * image with 1 % of its chunks changed. Undeploy (quick clean) runs between
   * them as it would in a datacenter, so the chunks it zeroes travel again.
   */
  private async deltaOnce(round: number): Promise<[SampleName, Sample][]> {
    const side = this.tls;
    const node = side.node;
    const delta = this.deltaImage!;
    const asSample = (run: DeployRun): Sample => ({
      ...this.sample(round, run.start, run.end, run.controllerCpuMs, run.agentCpuMs),
      wireBytes: run.wireBytes,
    });
    const full = await this.deployTimed(side, node, IMAGE_NAME, true);
    await this.undeploy(side, [node]);
    const same = await this.deployTimed(side, node, IMAGE_NAME, false);
    if (round === 0) await this.verifyFile(node.disk, `${node.agent.label}'s disk after a redeploy`, this.image);
    await this.undeploy(side, [node]);
    const changed = await this.deployTimed(side, node, DELTA_IMAGE_NAME, false);
    if (round === 0) await this.verifyFile(node.disk, `${node.agent.label}'s disk after the 1 % changed image`, delta);
    await this.undeploy(side, [node]);
    return [
      ['delta-full', asSample(full)],
      ['delta-same', asSample(same)],
      ['delta-1pct', asSample(changed)],
    ];
  }

  /**
   * The image with 1 % of its manifest chunks changed (one byte each, spread
   * evenly), as a new build that differs in a few places.
   */
  private async writeChangedImage(path: string): Promise<ImageFile> {
    const chunks = Math.ceil(this.o.size / MANIFEST_CHUNK_BYTES);
    const changed = Math.max(1, Math.round(chunks / 100));
    await copyFile(this.image.file, path);
    const file = await open(path, 'r+');
    try {
      for (let k = 0; k < changed; k++) {
        const chunk = Math.floor(((k + 0.5) * chunks) / changed);
        const at = Math.min(this.o.size - 1, chunk * MANIFEST_CHUNK_BYTES + 4096);
        const byte = Buffer.alloc(1);
        await file.read(byte, 0, 1, at);
        byte[0] = byte[0]! ^ 0xff;
        await file.write(byte, 0, 1, at);
      }
    } finally {
      await file.close();
    }
    const hash = createHash('sha256');
    for await (const piece of fileChunks(path)) hash.update(piece);
    return { file: path, size: this.o.size, sha256: hash.digest('hex') };
  }

  private async socketOnce(tls: boolean, round: number): Promise<Sample> {
    const target = join(this.dir, 'socket-target');
    await writeFile(target, '');
    await truncate(target, this.diskSize);
    const sendSetup: SocketSend = {
      tls,
      file: this.image.file,
      size: this.o.size,
      cert: this.tlsFiles.controller,
      key: this.tlsFiles.controllerKey,
    };
    const sender = new LoggedProcess(
      'socket sender',
      ['--import', 'tsx', SOCKET_SCRIPT, 'send', JSON.stringify(sendSetup)],
      join(this.dir, 'socket.log'),
    );
    try {
      const listening = await sender.waitFor((l) => l.type === 'listening', 30_000);
      const receiveSetup: SocketReceive = { tls, port: Number(listening.port), target, size: this.o.size, ca: this.tlsFiles.ca };
      const receiver = new LoggedProcess(
        'socket receiver',
        ['--import', 'tsx', SOCKET_SCRIPT, 'receive', JSON.stringify(receiveSetup)],
        join(this.dir, 'socket.log'),
      );
      const r = (await receiver.waitFor((l) => l.type === 'result', TIMEOUT_MS)) as LogLine & Record<string, number | string>;
      const s = (await sender.waitFor((l) => l.type === 'result', 30_000)) as LogLine & Record<string, number | string>;
      await receiver.exited;
      if (r.error || s.error) throw new Error(`socket baseline failed: ${String(r.error ?? s.error)}`);
      if (r.sha256 !== this.image.sha256 || r.bytes !== this.o.size) {
        this.verifyFailed.push(`${tls ? 'TLS' : 'net'} socket received ${r.bytes} bytes hashing ${String(r.sha256).slice(0, 12)}…`);
      }
      return this.sample(round, Number(r.startedAt), Number(r.endedAt), Number(s.cpuMs), Number(r.cpuMs));
    } finally {
      await sender.stop(5000);
      await rm(target, { force: true });
    }
  }

  private async peerOnce(round: number): Promise<Sample> {
    const target = join(this.dir, 'peer-target');
    await writeFile(target, '');
    await truncate(target, this.diskSize);
    const workers = this.nginxWorkers();
    for (const pid of workers) this.sampler.track(pid);
    try {
      const output = await runPython([REQUESTS_SCRIPT, `https://127.0.0.1:${this.nginxPort}/image.raw`, target, this.tlsFiles.ca]);
      const r = JSON.parse(output.trim().split('\n').at(-1) ?? '{}') as Record<string, number | string>;
      this.sampler.sampleAll();
      if (r.sha256 !== this.image.sha256 || r.bytes !== this.o.size) {
        this.verifyFailed.push(`nginx + requests received ${r.bytes} bytes hashing ${String(r.sha256).slice(0, 12)}…`);
      }
      const start = Number(r.startedAt);
      const end = Number(r.endedAt);
      const nginxCpu = workers.reduce((sum, pid) => sum + this.cpuMs(pid, start, end), 0);
      return this.sample(round, start, end, nginxCpu, Number(r.cpuMs));
    } finally {
      for (const pid of workers) this.sampler.untrack(pid);
      await rm(target, { force: true });
    }
  }

  private async uploadOnce(round: number): Promise<Sample> {
    const name = `bench-upload-${++this.uploads}`;
    const from = this.tls.controller.lines.length;
    this.sampler.track(this.tls.controller.pid);
    const cli = new LoggedProcess(
      'upload',
      [
        ...NODE_FLAGS,
        ...this.programs.metalcast,
        'image',
        'upload',
        this.image.file,
        `--name=${name}`,
        `--controller=${this.tls.address}`,
        `--ca=${this.tlsFiles.ca}`,
        `--token=${readTokenFile(join(this.tls.dataDir, 'admin.token'))}`,
      ],
      join(this.dir, 'upload.log'),
    );
    this.sampler.track(cli.pid);
    try {
      const line = await this.tls.controller.waitFor(
        (l) => l.image === name && (l.msg === 'image uploaded' || String(l.msg).startsWith('upload')),
        TIMEOUT_MS,
        from,
      );
      // Sampled now, while the CLI still waits for the answer: once it has exited, nothing would close its window.
      this.sampler.sampleAll();
      if (line.msg !== 'image uploaded') throw new Error(`upload failed: ${String(line.msg)} ${String(line.reason ?? '')}`);
      const code = await cli.exited;
      if (code !== 0) throw new Error(`metalcast image upload exited with ${code}${cli.tail()}`);
      if (line.sha256 !== this.image.sha256) this.verifyFailed.push(`upload stored sha256 ${String(line.sha256).slice(0, 12)}…`);
      const end = lineTime(line);
      const start = end - Number(line.seconds) * 1000;
      return this.sample(round, start, end, this.cpuMs(cli.pid, start, end), this.cpuMs(this.tls.controller.pid, start, end));
    } finally {
      this.sampler.untrack(cli.pid);
      await this.tls.operator.images.deleteImage({ name }).catch(() => {});
    }
  }

  // ---------------------------------------------------------------------------
  // Helpers.

  private async waitState(side: Side, target: BenchNode, state: ProvisionState): Promise<void> {
    const deadline = Date.now() + STATE_TIMEOUT_MS;
    for (;;) {
      let current = ProvisionState.PROVISION_STATE_UNSPECIFIED;
      let lastError = '';
      try {
        const { node } = await side.operator.nodes.getNode({ node: target.name });
        current = node?.provisionState ?? current;
        lastError = node?.lastError ?? '';
      } catch (error) {
        if (!(error instanceof ClientError && error.code === Status.UNAVAILABLE)) throw error;
      }
      if (current === state) return;
      if (/FAILED/.test(ProvisionState[current] ?? '')) throw new Error(`node ${target.name} is ${ProvisionState[current]}: ${lastError}`);
      if (Date.now() > deadline) throw new Error(`node ${target.name} not ${ProvisionState[state]} within ${STATE_TIMEOUT_MS / 1000}s`);
      await sleep(200);
    }
  }

  /** Hashes the first image-size bytes of a written disk: the agent's own check, checked from outside. */
  private async verifyFile(path: string, what: string, image: ImageFile): Promise<void> {
    const hash = createHash('sha256');
    const file = await open(path, 'r');
    try {
      for await (const chunk of file.createReadStream({ start: 0, end: image.size - 1, highWaterMark: 4 * MIB }))
        hash.update(chunk as Buffer);
    } finally {
      await file.close();
    }
    const digest = hash.digest('hex');
    if (digest !== image.sha256) this.verifyFailed.push(`${what} hashes to ${digest.slice(0, 12)}…, not the image`);
  }

  // ---------------------------------------------------------------------------
  // Report.

  private report(cases: CaseName[]): BenchResult {
    const o = this.o;
    const metrics: Record<string, number> = {};
    const rows = [['case', 'MB/s', 'min - max', 'sender CPU-s/GB', 'receiver CPU-s/GB']];
    const labels: Record<Exclude<CaseName, 'delta'>, [string, string, string]> = {
      'metalcast-tls': ['metalcast over TLS', 'controller', 'agent'],
      'tls-socket': ['TLS socket pair', 'sender', 'receiver'],
      'metalcast-plain': ['metalcast plaintext', 'controller', 'agent'],
      'net-socket': ['net socket pair', 'sender', 'receiver'],
      'nginx-requests': ['nginx + python3-requests', 'nginx', 'python'],
      'upload-tls': ['metalcast image upload, TLS', 'CLI', 'controller'],
      'fleet-tls': [`metalcast over TLS, ${o.fleet} agents at once, aggregate`, 'controller', 'agents'],
    };
    for (const name of cases) {
      if (name === 'delta') continue;
      const s = this.samples.get(name) ?? [];
      const key = name.replace(/-/g, '_');
      const m = median(s.map((x) => x.mbps));
      const snd = median(s.map((x) => x.senderCpuPerGb));
      const rcv = median(s.map((x) => x.receiverCpuPerGb));
      rows.push([
        `${labels[name][0]} (${labels[name][1]} / ${labels[name][2]})`,
        fmt(m),
        `${fmt(Math.min(...s.map((x) => x.mbps)))} - ${fmt(Math.max(...s.map((x) => x.mbps)))}`,
        snd.toFixed(2),
        rcv.toFixed(2),
      ]);
      metrics[`${key}_mb_per_s`] = r1(m);
      metrics[`${key}_sender_cpu_s_per_gb`] = r3(snd);
      metrics[`${key}_receiver_cpu_s_per_gb`] = r3(rcv);
    }
    console.log(`\n  ${size(o.size)}, medians of ${o.runs} rounds; MB = 10^6 bytes; CPU-s/GB = CPU-seconds (all threads) per 10^9 bytes`);
    for (const line of columns(rows, [false, true, true, true, true])) console.log(`    ${line}`);

    const pairedRows = [['paired ratio (same round)', 'median', 'min - max', 'bar']];
    const pair = (
      label: string,
      key: string,
      over: SampleName,
      under: SampleName,
      bar: number | undefined,
      pick = (x: Sample) => x.mbps,
    ) => {
      const a = this.samples.get(over);
      const b = this.samples.get(under);
      if (!a || !b) return;
      const ratios = a.map((x) => {
        const y = b.find((z) => z.round === x.round);
        return y ? pick(x) / pick(y) : Number.NaN;
      });
      const m = median(ratios.filter(Number.isFinite));
      metrics[`${key}_ratio`] = r3(m);
      const higherIsBetter = !key.includes('cpu');
      pairedRows.push([
        label,
        m.toFixed(2),
        `${Math.min(...ratios).toFixed(2)} - ${Math.max(...ratios).toFixed(2)}`,
        bar === undefined ? '' : `${higherIsBetter ? '>=' : '<='} ${bar}`,
      ]);
      if (bar === undefined) return;
      const ok = higherIsBetter ? m >= bar : m <= bar;
      this.checks.push({
        name: `${key}${o.noise ? '_noise' : ''}`,
        ok,
        detail: `${label}: median paired ratio ${m.toFixed(2)}, bar ${higherIsBetter ? '>=' : '<='} ${bar}`,
      });
    };
    pair(
      'metalcast TLS / TLS socket',
      'tls_over_socket',
      'metalcast-tls',
      'tls-socket',
      o.noise ? BARS.noisyTlsOverSocket : BARS.tlsOverSocket,
    );
    // Issue 16 sets only the TLS bar under noise; the plaintext ratio is printed there without one.
    pair(
      'metalcast plaintext / net socket',
      'plain_over_socket',
      'metalcast-plain',
      'net-socket',
      o.noise ? undefined : BARS.plainOverSocket,
    );
    pair('metalcast TLS / nginx + requests', 'tls_over_peer', 'metalcast-tls', 'nginx-requests', BARS.tlsOverPeer);
    // The ceiling of the line above: what two Node processes doing nothing but read, TLS, sha256 and write reach
    // against the peer on this machine.
    pair('TLS socket pair / nginx + requests (the ceiling)', 'socket_over_peer', 'tls-socket', 'nginx-requests', undefined);
    pair('upload TLS / TLS socket', 'upload_over_socket', 'upload-tls', 'tls-socket', BARS.uploadOverSocket);
    pair(
      'controller CPU/GB / socket sender',
      'controller_cpu_over_sender',
      'metalcast-tls',
      'tls-socket',
      BARS.controllerCpuOverSender,
      (x) => x.senderCpuPerGb,
    );
    pair(
      'agent CPU/GB / socket receiver',
      'agent_cpu_over_receiver',
      'metalcast-tls',
      'tls-socket',
      BARS.agentCpuOverReceiver,
      (x) => x.receiverCpuPerGb,
    );
    pair('metalcast TLS / metalcast plaintext', 'tls_over_plain', 'metalcast-tls', 'metalcast-plain', undefined);
    pair(`${o.fleet} agents at once (aggregate) / one agent, TLS`, 'fleet_over_one', 'fleet-tls', 'metalcast-tls', undefined);
    console.log('');
    for (const line of columns(pairedRows, [false, true, true, true])) console.log(`    ${line}`);
    this.reportFleetMemory(metrics);
    this.reportDelta(metrics);
    this.checks.push({
      name: 'every_copy_verified',
      ok: this.verifyFailed.length === 0,
      detail: this.verifyFailed.length === 0 ? 'every transfer hashed to the image sha256' : this.verifyFailed.join('; '),
    });
    const headline = `TLS ${fmt(metrics.metalcast_tls_mb_per_s ?? Number.NaN)} MB/s, ${fmtRatio(metrics.tls_over_socket_ratio)}× TLS socket, ${fmtRatio(metrics.tls_over_peer_ratio)}× nginx+requests`;
    return { headline, metrics, checks: this.checks };
  }

  /** The fleet case's controller memory: before the deploys and at its peak, medians over rounds. */
  private reportFleetMemory(metrics: Record<string, number>): void {
    const s = this.samples.get('fleet-tls');
    if (!s || s.length === 0) return;
    const before = median(s.map((x) => x.rssBefore ?? Number.NaN));
    const peak = median(s.map((x) => x.rssPeak ?? Number.NaN));
    const bound = before + this.o.fleet * BARS.fleetRssPerAgentBytes;
    metrics.fleet_controller_rss_before_mib = r1(before / MIB);
    metrics.fleet_controller_rss_peak_mib = r1(peak / MIB);
    console.log(
      `\n    controller resident memory, ${this.o.fleet} agents at once: ${mib(before)} before, ${mib(peak)} at the peak (medians; bound ${mib(bound)})`,
    );
    this.checks.push({
      name: 'fleet_controller_rss',
      ok: peak <= bound,
      detail: `controller peak RSS ${mib(peak)} with ${this.o.fleet} agents at once, started at ${mib(before)}; bound ${mib(bound)} (${mib(BARS.fleetRssPerAgentBytes)} per transfer)`,
    });
  }

  /** The delta case: time and image bytes on the wire of a redeploy and of a 1 %-changed image, against the full deploy of the same round. */
  private reportDelta(metrics: Record<string, number>): void {
    const full = this.samples.get('delta-full');
    if (!full || full.length === 0) return;
    const rows = [['deploy (TLS)', 'seconds', 'image bytes on the wire', 'share of the image', 'time / full deploy']];
    const kinds: [SampleName, string, string, number | undefined][] = [
      ['delta-full', 'full, to an empty disk', 'full', undefined],
      ['delta-same', 'the same image again', 'same', BARS.deltaSameWireShare],
      ['delta-1pct', 'an image with 1 % of its chunks changed', 'changed', BARS.deltaChangedWireShare],
    ];
    for (const [name, label, key, bar] of kinds) {
      const s = this.samples.get(name) ?? [];
      const wire = median(s.map((x) => x.wireBytes ?? Number.NaN));
      const share = wire / this.o.size;
      const times = s.map((x) => x.ms / (full.find((f) => f.round === x.round)?.ms ?? Number.NaN));
      const time = median(times);
      rows.push([label, (median(s.map((x) => x.ms)) / 1000).toFixed(2), fmt(wire), `${(share * 100).toFixed(2)} %`, time.toFixed(3)]);
      metrics[`delta_${key}_wire_share`] = Math.round(share * 1e5) / 1e5;
      metrics[`delta_${key}_time_ratio`] = r3(time);
      if (bar === undefined) continue;
      this.checks.push({
        name: `delta_${key}_wire_share`,
        ok: share < bar,
        detail: `${label}: ${(share * 100).toFixed(2)} % of the image on the wire (median), bar < ${bar * 100} %`,
      });
    }
    console.log(`\n    delta, medians of ${full.length} rounds (time ratios paired with the full deploy of the same round):`);
    for (const line of columns(rows, [false, true, true, true, true])) console.log(`    ${line}`);
  }
}

// -----------------------------------------------------------------------------

/**
 * When the agent wrote the image, from its own log after line `from`: its
 * 'writing image' start line (after StatImage) to 'image written and
 * verified' (after the fsync). Throws when write_image failed.
 */
async function writeWindow(node: BenchNode, from: number): Promise<{ start: number; end: number; endLine: LogLine }> {
  const startLine = await node.agent.waitFor((l) => String(l.msg).startsWith('writing image'), TIMEOUT_MS, from);
  const endLine = await node.agent.waitFor(
    (l) => String(l.msg).startsWith('image written and verified') || l.msg === 'command failed',
    TIMEOUT_MS,
    from,
  );
  if (!String(endLine.msg).startsWith('image written and verified'))
    throw new Error(`${node.agent.label}: write_image failed: ${String(endLine.error)}`);
  return { start: lineTime(startLine), end: lineTime(endLine), endLine };
}

/** The command lines (after `node` and its flags) of the metalcast CLI and controller, and of the agent. */
interface Programs {
  metalcast: string[];
  agent: string[];
  what: string;
}

/**
 * What the metalcast cases run. By default what operators run: the
 * controller and CLI compiled by `npm run build` (plain Node.js, no tsx) and
 * the agent bundle of `npm run package:agent` (what a ramdisk carries).
 * Through tsx every module is compiled at start-up and its source map kept,
 * which leaves a larger heap for each garbage collection to walk.
 */
async function programs(artifacts: boolean, dir: string): Promise<Programs> {
  const override = process.env.BENCH_TRANSFER_METALCAST;
  if (override) return { metalcast: [override], agent: [override, 'agent'], what: `${override} (BENCH_TRANSFER_METALCAST)` };
  if (!artifacts) return { metalcast: [METALCAST], agent: [METALCAST, 'agent'], what: 'bin/metalcast.js through tsx (--artifacts 0)' };
  const { outDir } = build();
  const { bundle } = await packageAgent({ outDir: join(dir, 'agent-package'), sea: false });
  return {
    metalcast: [join(outDir, 'bin', 'metalcast.js')],
    agent: [bundle.path],
    what: `controller and CLI compiled (npm run build: ${join(outDir, 'bin', 'metalcast.js')}), agent packaged (${bundle.path})`,
  };
}

// -----------------------------------------------------------------------------

async function writeRandomFile(path: string, bytes: number): Promise<void> {
  const file = await open(path, 'w');
  const block = Buffer.allocUnsafe(4 * MIB);
  try {
    for (let at = 0; at < bytes; at += block.length) {
      const n = Math.min(block.length, bytes - at);
      randomFillSync(block, 0, n);
      await file.write(block, 0, n, at);
    }
  } finally {
    await file.close();
  }
}

async function* fileChunks(path: string): AsyncGenerator<Uint8Array> {
  const file = await open(path, 'r');
  try {
    for await (const chunk of file.createReadStream({ highWaterMark: 4 * MIB })) yield chunk as Buffer;
  } finally {
    await file.close();
  }
}

function runPython(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('/usr/bin/python3', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), TIMEOUT_MS);
    child.once('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(stdout);
      else reject(new Error(`python3 ${args[0]} exited with ${code}: ${stderr.slice(-1000)}`));
    });
  });
}

function list<K, V>(map: Map<K, V[]>, key: K): V[] {
  let values = map.get(key);
  if (!values) {
    values = [];
    map.set(key, values);
  }
  return values;
}

function median(values: readonly number[]): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

const fmt = (x: number) => (Number.isFinite(x) ? Math.round(x).toLocaleString('en-US') : '-');
const fmtRatio = (x: number | undefined) => (x !== undefined && Number.isFinite(x) ? x.toFixed(2) : '-');
const size = (bytes: number) =>
  bytes >= GIB ? `${(bytes / GIB).toFixed(bytes % GIB === 0 ? 0 : 1)} GiB` : `${Math.round(bytes / MIB)} MiB`;
const gib = (bytes: number) => `${(bytes / GIB).toFixed(1)} GiB`;
const mib = (bytes: number) => `${Math.round(bytes / MIB)} MiB`;
const r1 = (x: number) => (Number.isFinite(x) ? Math.round(x * 10) / 10 : -1);
const r3 = (x: number) => (Number.isFinite(x) ? Math.round(x * 1000) / 1000 : -1);

/** Whether the kernel's tls module is loaded, so that nginx's `ssl_conf_command Options KTLS` can take effect. */
function kernelTlsOffered(): boolean {
  return existsSync('/proc/net/tls_stat');
}
