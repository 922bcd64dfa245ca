/**
 * The plaintext tuning benchmark (npm run bench -- transfer-chunks; the
 * headline TLS benchmark with its socket and nginx baselines is
 * bench/transfer.ts): how fast does an image go from the controller to
 * an agent's disk, against how fast this machine can do the same work
 * locally? Controller and agents are real processes (bin/metalcast.js) on
 * loopback; the disks are sparse files of fake machines (demo/fake-machine.ts).
 *
 * - The image: --size bytes of random data (nothing the controller could
 *   send as an all-zero chunk), put into the controller's data directory
 *   through ImageFiles before the controller starts, as the tests seed
 *   images, so its blob is in the page cache like a hot image.
 * - The transfer: a deploy through the real API; the controller sends
 *   write_image, the agent reads the image with ReadImage, hashes, writes
 *   and fsyncs once at the end. Timed by the agent's own log lines,
 *   'writing image; ...' (after StatImage) to 'image written and verified'
 *   (after the fsync). Then undeploy (quick clean) and again.
 * - The local limit: a child process on the same Node reads the same blob
 *   in 4 MiB blocks, hashes sha256 and writes a file, fsync at the end
 *   (bench/transfer-local.ts), timed from opening the target to the end of
 *   the fsync like the agent. Every target, the agent's disk included, is a
 *   fresh sparse file (truncated to 0 and back) before each run, so the page
 *   cache does the same work for both. One local run precedes every
 *   transfer; medians are compared, and each transfer with its neighbour.
 * - Chunk sizes: one controller per --image-chunk-size, restarted between
 *   cases on the same port and database; cases rotate order every round.
 * - Flow-control windows: a bare reader (bench/transfer-reader.ts) runs the
 *   production ControllerLink, lookup, image source and writeImage with
 *   'grpc-node.flow_control_window' set through ControllerLink's
 *   extra-options parameter, on a node left in deploy_wait without an
 *   agent; the production window (4 MiB) is one of the cases, to tie the
 *   probe to the real agent.
 * - N agents at once: per chunk size, a fresh controller, N deploys at once;
 *   aggregate = N x size / (last end - first start); the controller's RSS
 *   is sampled from /proc every 50 ms (and VmHWM read at the end). N local
 *   copies at once give the machine's aggregate limit for comparison.
 * - CPU: utime + stime of each process from /proc/<pid>/stat over the
 *   timed window, as % of one core (threads included: >100% is possible).
 */
import { seedImage } from '../test/helpers/images.js';
import { CONTROLLER_OPTIONS } from '../controller/config.js';
import { createHash, randomFillSync } from 'node:crypto';
import { readFileSync, statfsSync } from 'node:fs';
import { open, rm, truncate, writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import { connectOperator, type OperatorClients, readTokenFile } from '../cli/client.js';
import { byteSize } from '../common/config.js';
import { type FakeMachine, uniqueFakeMachine } from '../demo/fake-machine.js';
import { ProvisionAction, ProvisionState } from '../gen/metalcast/v1/node.js';
import {
  type BenchCheck,
  type BenchResult,
  BenchUsageError,
  breathe,
  columns,
  formatMs,
  type NumberOptions,
  parseNumberOptions,
  withTempDir,
} from './harness.js';
import {
  freePorts,
  highWaterMark,
  LoggedProcess,
  type LogLine,
  lineTime,
  MACHINE,
  METALCAST,
  ProcSampler,
  REPO,
} from './transfer-procs.js';
import type { ReaderSetup } from './transfer-reader.js';

export const description =
  'plaintext tuning: controller -> agent processes vs the local read+sha256+write limit; chunk sizes, flow-control windows, N agents at once';

const KIB = 1024;
const MIB = 1024 * 1024;
const GIB = 1024 * MIB;

export const options = {
  size: { default: GIB, description: 'image size in bytes; K, M, G suffixes allowed (default 1G)' },
  runs: { default: 3, integer: true, description: 'measured runs per case, interleaved with runs of the local limit' },
  chunks: {
    default: 0,
    description: '--image-chunk-size values to compare, comma-separated, 64K to 3.5M (0: 256K,1M,3.5M)',
  },
  agents: { default: 4, integer: true, description: 'agents deploying at once against one controller, once per chunk size (0: skip)' },
  windows: {
    default: 0,
    description: "agent flow-control windows for the window probe, comma-separated (0: 64K,4M,16M; 'none': skip the probe)",
  },
  'window-chunk': { default: 0, description: 'chunk size the window probe runs at; must be one of --chunks (0: 1M)' },
} satisfies NumberOptions;

/** What the controller's --image-chunk-size accepts (controller/config.ts). */
const CHUNK_MIN = 64 * KIB;
const CHUNK_MAX = 3.5 * MIB;
const DEFAULT_CHUNKS = [256 * KIB, MIB, 3.5 * MIB];
const DEFAULT_WINDOWS = [64 * KIB - 1, 4 * MIB, 16 * MIB];
/** The controller's default --image-chunk-size and the window of common/grpc-options.ts clientChannelOptions. */
const PRODUCTION_CHUNK = CONTROLLER_OPTIONS.imageChunkSize.parse(CONTROLLER_OPTIONS.imageChunkSize.defaultValue);
const PRODUCTION_WINDOW = 4 * MIB;
/** Block size of the local limit. */
const LOCAL_BLOCK = 4 * MIB;
const IMAGE_NAME = 'bench-os';
/** The goal of the issue: the transfer at this fraction of the local limit or better. */
const GOAL_RATIO = 0.9;
/** Cases within this fraction of the best count as equal (the machine is noisy: runs of one case spread 10-15%). */
const NOISE = 0.1;
/** Above this median CPU of other processes (% of a core) during the timed runs, the report warns that the machine was busy. */
const BUSY_OTHERS = 25;
/** Chunks a stalled ReadImage stream pins on the controller, and the controller's default --max-image-transfers. */
const QUEUED_CHUNKS = 17;
const DEFAULT_MAX_TRANSFERS = CONTROLLER_OPTIONS.maxImageTransfers.parse(CONTROLLER_OPTIONS.maxImageTransfers.defaultValue);

/**
 * Experiment knobs, for trying an optimisation without touching the code under test:
 * BENCH_TRANSFER_METALCAST runs the controller and agents from another bin/metalcast.js
 * (a patched copy under scratch/), BENCH_TRANSFER_NODE_OPTIONS adds Node flags to them
 * (for example --cpu-prof --cpu-prof-dir=/tmp/prof).
 */
const METALCAST_BIN = process.env.BENCH_TRANSFER_METALCAST || METALCAST;
const NODE_FLAGS = (process.env.BENCH_TRANSFER_NODE_OPTIONS ?? '').split(/\s+/).filter((f) => f !== '');
const LOCAL_SCRIPT = join(REPO, 'bench', 'transfer-local.ts');
const READER_SCRIPT = join(REPO, 'bench', 'transfer-reader.ts');
const CONTROLLER_READY_TIMEOUT_MS = 60_000;
const TRANSFER_TIMEOUT_MS = 600_000;
const STATE_TIMEOUT_MS = 120_000;

type Options = ReturnType<typeof parseOptions>;

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseOptions(args);
  const machines = Math.max(1, o.agents) + (o.windows.length > 0 ? 1 : 0);
  // Written data is real: the image, every disk, and N local targets at once, plus room to spare.
  const needed = o.size * (1 + machines + Math.max(1, o.agents)) + GIB;
  const fs = statfsSync(tmpdir());
  const free = fs.bavail * fs.bsize;
  if (free < needed) {
    throw new BenchUsageError(
      `${tmpdir()} has ${gib(free)} free, the run needs about ${gib(needed)} (image, ${machines} disks, local targets); use a smaller --size`,
    );
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
  const lists: Record<string, string> = {};
  const rest: string[] = [];
  const sizeFlag = (flag: string, value: string) => {
    if (value.trim() === '' || Number.isFinite(Number(value))) return value;
    try {
      return String(byteSize({ min: 1, max: 2 ** 50 })(value));
    } catch (error) {
      throw new BenchUsageError(`--${flag}: ${(error as Error).message}`);
    }
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const eq = /^--([^=]+)=(.*)$/.exec(arg);
    const [flag, value, consumed] = eq ? [eq[1]!, eq[2], 0] : [arg.slice(2), args[i + 1], 1];
    if (!arg.startsWith('--') || value === undefined) {
      rest.push(arg);
    } else if (flag === 'chunks' || flag === 'windows') {
      lists[flag] = value;
      i += consumed;
    } else if (flag === 'size' || flag === 'window-chunk') {
      rest.push(`--${flag}`, sizeFlag(flag, value));
      i += consumed;
    } else {
      rest.push(arg);
    }
  }
  const raw = parseNumberOptions(rest, options);
  const list = (flag: string, value: string | undefined, fallback: number[], min: number, max: number): number[] => {
    if (value === undefined || value.trim() === '0') return fallback;
    if (value.trim() === 'none') return [];
    const parse = byteSize({ min, max });
    try {
      return [...new Set(value.split(',').map((v) => parse(v)))];
    } catch (error) {
      throw new BenchUsageError(
        `--${flag}: ${(error as Error).message}${flag === 'chunks' ? ' (--image-chunk-size takes 64 KiB to 3.5 MiB, below the default 4 MiB message limit of grpc-js)' : ''}`,
      );
    }
  };
  const chunks = list('chunks', lists.chunks, DEFAULT_CHUNKS, CHUNK_MIN, CHUNK_MAX);
  const windows = list('windows', lists.windows, DEFAULT_WINDOWS, 1024, 2 ** 31 - 1);
  const windowChunk = raw['window-chunk'] || (chunks.includes(PRODUCTION_CHUNK) ? PRODUCTION_CHUNK : chunks[0]!);
  const problems = [
    chunks.length === 0 && '--chunks needs at least one chunk size',
    raw.size < MIB && '--size must be at least 1M',
    raw.runs < 1 && '--runs must be at least 1',
    raw.agents > 32 && '--agents: at most 32',
    windows.length > 0 && !chunks.includes(windowChunk) && `--window-chunk (${size(windowChunk)}) must be one of --chunks`,
  ].filter((p): p is string => typeof p === 'string');
  if (problems.length > 0) throw new BenchUsageError(problems.join('; '));
  return { size: Math.round(raw.size), runs: raw.runs, chunks, agents: raw.agents, windows, windowChunk };
}

// ---------------------------------------------------------------------------
// Samples.

interface Timed {
  ms: number;
  mbps: number;
}

interface LocalSample extends Timed {
  cpu: number;
  /** CPU of every other process on the machine meanwhile, % of one core. */
  othersCpu: number;
}

interface TransferSample extends Timed {
  controllerCpu: number;
  clientCpu: number;
  othersCpu: number;
  /** The local run just before this one, for the paired ratio. */
  local: LocalSample | undefined;
}

interface MultiSample {
  chunk: number;
  agents: number;
  aggregateMbps: number;
  perAgentMbps: number[];
  startSpreadMs: number;
  wallMs: number;
  controllerCpu: number;
  agentsCpu: number;
  othersCpu: number;
  rssBefore: number;
  rssPeak: number;
  hwm: number;
}

interface LocalMultiSample {
  copies: number;
  aggregateMbps: number;
  startSpreadMs: number;
}

/** One fake machine: its agent (if running), its node, its disk. */
interface Machine {
  name: string;
  machine: FakeMachine;
  disk: string;
  agent: LoggedProcess | undefined;
}

class TransferBench {
  private readonly sampler = new ProcSampler(50);
  private readonly checks: BenchCheck[] = [];
  private controller: LoggedProcess | undefined;
  private controllerChunk = 0;
  private operator: OperatorClients | undefined;
  private grpcAddress = '';
  private metricsAddress = '';
  private readonly dataDir: string;
  private readonly machines: Machine[] = [];
  private reader: Machine | undefined;
  private image = { sha256: '', size: 0, blob: '' };
  private readonly diskSize: number;
  private readonly singles = new Map<number, TransferSample[]>();
  private readonly probes = new Map<number, TransferSample[]>();
  private readonly multis: MultiSample[] = [];
  private localMulti: LocalMultiSample | undefined;
  private logCount = 0;
  private failedTransfers: string[] = [];
  private verified: string[] = [];
  private verifyFailed: string[] = [];
  private resumes = 0;
  private readonly started = performance.now();

  constructor(
    private readonly o: Options,
    private readonly dir: string,
  ) {
    this.dataDir = join(dir, 'controller');
    this.diskSize = Math.ceil((o.size + MIB) / MIB) * MIB;
  }

  async run(): Promise<BenchResult> {
    const o = this.o;
    console.log(
      `transfer: ${size(o.size)} image of random data; chunk sizes ${o.chunks.map(size).join(', ')}; ${o.runs} runs per case; ` +
        `${o.agents} agents at once; windows ${o.windows.length > 0 ? `${o.windows.map(windowLabel).join(', ')} at chunk ${size(o.windowChunk)}` : 'not probed'}; ` +
        `Node ${process.version}, @grpc/grpc-js ${grpcVersion()}; files in ${this.dir}`,
    );
    if (METALCAST_BIN !== METALCAST || NODE_FLAGS.length > 0) {
      console.log(
        `  experiment: controller and agents run ${METALCAST_BIN}${NODE_FLAGS.length > 0 ? ` with ${NODE_FLAGS.join(' ')}` : ''}`,
      );
    }
    console.log(`  load average at the start: ${loadText()}`);
    this.sampler.track(MACHINE);
    await this.setup();

    console.log(`\n  measuring: ${o.runs} rounds; each transfer follows a run of the local limit; case order rotates per round`);
    for (let round = 0; round < o.runs; round++) {
      for (let j = 0; j < o.chunks.length; j++) {
        const chunk = o.chunks[(round + j) % o.chunks.length]!;
        await this.useController(chunk, false);
        const local = await this.localOnce();
        const single = await this.singleOnce(chunk, local, round === 0);
        list(this.singles, chunk).push(single);
        this.progress(`round ${round + 1}: local ${mbps(local.mbps)}, chunk ${size(chunk)} ${mbps(single.mbps)}`);
        if (chunk === o.windowChunk && this.reader) {
          for (let k = 0; k < o.windows.length; k++) {
            const window = o.windows[(round + k) % o.windows.length]!;
            const probe = await this.probeOnce(window, local);
            list(this.probes, window).push(probe);
            this.progress(`round ${round + 1}: window ${windowLabel(window)} ${mbps(probe.mbps)}`);
          }
        }
        await breathe();
      }
    }

    if (o.agents > 0) {
      console.log(`\n  ${o.agents} agents at once, one fresh controller per chunk size:`);
      await this.resetDisks(this.machines);
      this.localMulti = await this.localMultiOnce(o.agents);
      this.progress(`${o.agents} local copies at once: ${mbps(this.localMulti.aggregateMbps)} aggregate`);
      for (const [i, chunk] of o.chunks.entries()) {
        const multi = await this.multiOnce(chunk, i === 0);
        this.multis.push(multi);
        this.progress(
          `chunk ${size(chunk)}: ${mbps(multi.aggregateMbps)} aggregate, controller peak RSS ${mb(multi.rssPeak)} (VmHWM ${mb(multi.hwm)})`,
        );
        await breathe();
      }
    }
    console.log(`  load average at the end: ${loadText()}`);
    return this.report();
  }

  async close(): Promise<void> {
    this.sampler.stop();
    this.operator?.close();
    const processes = [...this.machines, ...(this.reader ? [this.reader] : [])].map((m) => m.agent).filter((a) => a !== undefined);
    await Promise.all(processes.map((p) => p.stop(5000)));
    await this.controller?.stop(10_000);
  }

  // -------------------------------------------------------------------------
  // Setup.

  private async setup(): Promise<void> {
    const o = this.o;
    let t = performance.now();
    this.image = await seedRandomImage(this.dataDir, o.size);
    this.progress(`image seeded in ${formatMs(performance.now() - t)} (sha256 ${this.image.sha256.slice(0, 12)}…)`);

    const [grpcPort, metricsPort] = await freePorts(2);
    this.grpcAddress = `127.0.0.1:${grpcPort}`;
    this.metricsAddress = `127.0.0.1:${metricsPort}`;
    t = performance.now();
    await this.useController(o.chunks[0]!, true);

    const count = Math.max(1, o.agents);
    for (let i = 0; i < count + (o.windows.length > 0 ? 1 : 0); i++) {
      const name = i < count ? `bench-${i}` : 'bench-reader';
      const machine = await uniqueFakeMachine(join(this.dir, 'machines', name), i + 1, {
        disks: [{ name: 'sda', sizeBytes: this.diskSize, model: 'BENCH DISK', serial: `BENCH${i}`, rotational: false }],
      });
      const entry: Machine = { name, machine, disk: machine.disks[0]!.path, agent: this.startAgent(name, machine) };
      if (i < count) this.machines.push(entry);
      else this.reader = entry;
    }
    const all = [...this.machines, ...(this.reader ? [this.reader] : [])];
    await Promise.all(all.map((m) => m.agent!.waitFor((l) => l.msg === 'agent API listening', 60_000)));
    const { nodes } = this.operator!;
    for (const m of all) {
      await nodes.createNode({ name: m.name, macAddresses: [m.machine.macs[0]!] });
      await nodes.setProvisionState({ node: m.name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
      await nodes.setProvisionState({ node: m.name, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
    }
    await this.waitState(
      all.map((m) => m.name),
      ProvisionState.PROVISION_STATE_AVAILABLE,
    );
    if (this.reader) {
      // The probe's node: deploy_wait with no agent, so that only the probe reads its image.
      await this.reader.agent!.stop();
      this.reader.agent = undefined;
      await this.deploy(this.reader.name);
    }
    this.progress(
      `controller, ${this.machines.length} agents${this.reader ? ' and the probe node' : ''} ready in ${formatMs(performance.now() - t)}`,
    );
  }

  private startAgent(name: string, machine: FakeMachine): LoggedProcess {
    return new LoggedProcess(
      `agent ${name}`,
      [
        ...NODE_FLAGS,
        METALCAST_BIN,
        'agent',
        `--controller=${this.grpcAddress}`,
        '--listen=127.0.0.1:0',
        `--root=${machine.root}`,
        '--power-driver=recording',
        `--power-record-file=${join(machine.root, 'power.log')}`,
        '--lookup-backoff-start=100ms',
        '--lookup-backoff-max=500ms',
        '--reconnect-delay=200ms',
        '--min-heartbeat-gap=200ms',
        '--log-level=info',
        // Plaintext, like the in-process baseline it is compared with.
        '--insecure',
      ],
      join(this.dir, `${name}.log`),
    );
  }

  /** Makes sure a controller with this chunk size runs (a fresh one if `fresh`), same port, same database. */
  private async useController(chunk: number, fresh: boolean): Promise<void> {
    if (this.controller && this.controllerChunk === chunk && !fresh) return;
    if (this.controller) {
      this.sampler.untrack(this.controller.pid);
      this.operator?.close();
      this.operator = undefined;
      await this.controller.stop();
    }
    const controller = new LoggedProcess(
      'controller',
      [
        ...NODE_FLAGS,
        METALCAST_BIN,
        'controller',
        `--listen=${this.grpcAddress}`,
        `--metrics-listen=${this.metricsAddress}`,
        `--data-dir=${this.dataDir}`,
        '--controller-id=bench-transfer',
        `--image-chunk-size=${chunk}`,
        '--heartbeat-timeout=600s',
        '--heartbeat-interval-min=250ms',
        '--heartbeat-interval-max=500ms',
        '--startup-grace=600s',
        '--deploy-final-power=none',
        '--clean-mode=quick',
        '--shutdown-timeout=5s',
        '--log-level=info',
        '--insecure',
      ],
      join(this.dir, `controller-${++this.logCount}-${size(chunk).replace(/ /g, '')}.log`),
    );
    this.controller = controller;
    this.controllerChunk = chunk;
    await controller.waitFor((l) => l.msg === 'controller started', CONTROLLER_READY_TIMEOUT_MS);
    this.sampler.track(controller.pid);
    // The first start wrote an admin token beside the database (a baseline controller from before tokens writes none).
    this.operator = connectOperator(this.grpcAddress, 30_000, readTokenFile(join(this.dataDir, 'admin.token')));
  }

  // -------------------------------------------------------------------------
  // Measurements.

  private async localOnce(): Promise<LocalSample> {
    const target = join(this.dir, 'local-target');
    await writeFile(target, '');
    await truncate(target, this.diskSize);
    try {
      const [result] = await this.runLocal([target], 0);
      const r = result!;
      this.sampler.sampleAll();
      const cpu = (100 * r.cpuMs) / r.ms;
      return { ms: r.ms, mbps: rate(this.o.size, r.ms), cpu, othersCpu: this.sampler.cpuPercent(MACHINE, r.startedAt, r.endedAt) - cpu };
    } finally {
      await rm(target, { force: true });
    }
  }

  /** Local copies, all started at `startAt` (epoch ms; 0: at once). */
  private async runLocal(targets: string[], startAt: number) {
    const procs = targets.map(
      (target, i) =>
        new LoggedProcess(
          `local ${i}`,
          ['--import', 'tsx', LOCAL_SCRIPT, this.image.blob, target, String(this.o.size), String(LOCAL_BLOCK), String(startAt)],
          join(this.dir, 'local.log'),
        ),
    );
    try {
      const lines = await Promise.all(procs.map((p) => p.waitFor((l) => 'ms' in l, TRANSFER_TIMEOUT_MS)));
      await Promise.all(procs.map((p) => p.exited));
      const results = lines as unknown as { ms: number; sha256: string; cpuMs: number; startedAt: number; endedAt: number }[];
      for (const r of results) {
        if (r.sha256 !== this.image.sha256) this.verifyFailed.push(`local copy hashed ${r.sha256.slice(0, 12)}…`);
      }
      return results;
    } finally {
      for (const p of procs) p.kill();
    }
  }

  private async singleOnce(chunk: number, local: LocalSample, verify: boolean): Promise<TransferSample> {
    const m = this.machines[0]!;
    await this.resetDisks([m]);
    const agent = m.agent!;
    const from = agent.lines.length;
    this.sampler.track(agent.pid);
    await this.deploy(m.name);
    const { start, end } = await this.timed(agent, from);
    this.sampler.sampleAll();
    const sample = this.transferSample(start, end, agent.pid, local);
    this.sampler.untrack(agent.pid);
    await this.waitState([m.name], ProvisionState.PROVISION_STATE_ACTIVE);
    if (verify) await this.verifyDisk(m, `chunk ${size(chunk)}`);
    await this.undeploy([m.name]);
    return sample;
  }

  private async probeOnce(window: number, local: LocalSample): Promise<TransferSample> {
    const m = this.reader!;
    await this.resetDisks([m]);
    const setup: ReaderSetup = {
      controller: this.grpcAddress,
      macs: m.machine.macs,
      image: IMAGE_NAME,
      sha256: this.image.sha256,
      sizeBytes: this.image.size,
      devicePath: m.disk,
      deviceSizeBytes: this.diskSize,
      flowControlWindow: window,
    };
    const reader = new LoggedProcess(
      `reader ${windowLabel(window)}`,
      ['--import', 'tsx', READER_SCRIPT, JSON.stringify(setup)],
      join(this.dir, 'reader.log'),
    );
    this.sampler.track(reader.pid);
    try {
      const { start, end } = await this.timed(reader, 0);
      this.sampler.sampleAll();
      const result = await reader.waitFor((l) => l.type === 'result', 30_000);
      if (result.ok !== true) throw new Error(`the window probe failed: ${String(result.error)}`);
      return this.transferSample(start, end, reader.pid, local);
    } finally {
      this.sampler.untrack(reader.pid);
      await reader.stop(5000);
    }
  }

  private transferSample(start: number, end: number, clientPid: number, local: LocalSample): TransferSample {
    const controllerCpu = this.sampler.cpuPercent(this.controller!.pid, start, end);
    const clientCpu = this.sampler.cpuPercent(clientPid, start, end);
    return {
      ms: end - start,
      mbps: rate(this.o.size, end - start),
      controllerCpu,
      clientCpu,
      othersCpu: this.sampler.cpuPercent(MACHINE, start, end) - controllerCpu - clientCpu,
      local,
    };
  }

  private async localMultiOnce(copies: number): Promise<LocalMultiSample> {
    const targets = Array.from({ length: copies }, (_, i) => join(this.dir, `local-target-${i}`));
    for (const target of targets) {
      await writeFile(target, '');
      await truncate(target, this.diskSize);
    }
    try {
      // Start together once every copy has loaded.
      const results = await this.runLocal(targets, Date.now() + 3000 + 500 * copies);
      const first = Math.min(...results.map((r) => r.startedAt));
      const last = Math.max(...results.map((r) => r.endedAt));
      return {
        copies,
        aggregateMbps: rate(copies * this.o.size, last - first),
        startSpreadMs: Math.max(...results.map((r) => r.startedAt)) - first,
      };
    } finally {
      for (const target of targets) await rm(target, { force: true });
    }
  }

  private async multiOnce(chunk: number, verify: boolean): Promise<MultiSample> {
    const ms = this.machines.slice(0, this.o.agents);
    await this.useController(chunk, true);
    await this.resetDisks(ms);
    const pid = this.controller!.pid;
    // Agents of available nodes are not connected (their lookups answer NOT_FOUND until the deploy), so the
    // transfers start within one lookup backoff (at most 500 ms here) of each other: see 'starts within'.
    await sleep(500);
    const rssBefore = this.sampler.rssAt(pid, Date.now());
    const froms = ms.map((m) => m.agent!.lines.length);
    for (const m of ms) this.sampler.track(m.agent!.pid);
    await Promise.all(ms.map((m) => this.deploy(m.name)));
    const times = await Promise.all(ms.map((m, i) => this.timed(m.agent!, froms[i]!)));
    this.sampler.sampleAll();
    const first = Math.min(...times.map((t) => t.start));
    const last = Math.max(...times.map((t) => t.end));
    const controllerCpu = this.sampler.cpuPercent(pid, first, last);
    const agentsCpu = ms.reduce((sum, m) => sum + this.sampler.cpuPercent(m.agent!.pid, first, last), 0);
    for (const m of ms) this.sampler.untrack(m.agent!.pid);
    const sample: MultiSample = {
      chunk,
      agents: ms.length,
      aggregateMbps: rate(ms.length * this.o.size, last - first),
      perAgentMbps: times.map((t) => rate(this.o.size, t.end - t.start)),
      startSpreadMs: Math.max(...times.map((t) => t.start)) - first,
      wallMs: last - first,
      controllerCpu,
      agentsCpu,
      othersCpu: this.sampler.cpuPercent(MACHINE, first, last) - controllerCpu - agentsCpu,
      rssBefore,
      rssPeak: this.sampler.peakRss(pid, first, last),
      hwm: highWaterMark(pid),
    };
    const names = ms.map((m) => m.name);
    await this.waitState(names, ProvisionState.PROVISION_STATE_ACTIVE);
    if (verify) for (const m of ms) await this.verifyDisk(m, `${ms.length} at once, chunk ${size(chunk)}`);
    await this.undeploy(names);
    return sample;
  }

  /** Waits for a process's 'writing image' and 'image written and verified' lines (from line `from` on); their times. */
  private async timed(proc: LoggedProcess, from: number): Promise<{ start: number; end: number }> {
    const isStart = (l: LogLine) => typeof l.msg === 'string' && l.msg.startsWith('writing image');
    const isEnd = (l: LogLine) => l.msg === 'image written and verified' || l.msg === 'command failed';
    const startLine = await proc.waitFor(isStart, TRANSFER_TIMEOUT_MS, from);
    const endLine = await proc.waitFor(isEnd, TRANSFER_TIMEOUT_MS, from);
    if (endLine.msg !== 'image written and verified') {
      this.failedTransfers.push(`${proc.label}: ${String(endLine.error)}`);
      throw new Error(`${proc.label}: write_image failed: ${String(endLine.error)}`);
    }
    this.resumes += Number(endLine.resumes ?? 0);
    return { start: lineTime(startLine), end: lineTime(endLine) };
  }

  // -------------------------------------------------------------------------
  // Nodes and disks.

  private async deploy(node: string): Promise<void> {
    await this.operator!.nodes.setProvisionState({
      node,
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: { image: IMAGE_NAME, target: undefined },
    });
  }

  private async undeploy(names: string[]): Promise<void> {
    for (const node of names) await this.operator!.nodes.setProvisionState({ node, action: ProvisionAction.PROVISION_ACTION_UNDEPLOY });
    await this.waitState(names, ProvisionState.PROVISION_STATE_AVAILABLE);
  }

  /** Polls until every node is in `state`; fails at once when one failed. */
  private async waitState(names: string[], state: ProvisionState): Promise<void> {
    const deadline = Date.now() + STATE_TIMEOUT_MS;
    while (true) {
      let all = true;
      for (const name of names) {
        let node: Awaited<ReturnType<OperatorClients['nodes']['getNode']>>['node'];
        try {
          node = (await this.operator!.nodes.getNode({ node: name })).node;
        } catch (error) {
          if (error instanceof ClientError && error.code === Status.UNAVAILABLE && Date.now() < deadline) {
            all = false;
            break;
          }
          throw error;
        }
        const current = node?.provisionState ?? ProvisionState.PROVISION_STATE_UNSPECIFIED;
        if (current === state) continue;
        all = false;
        if (/FAILED/.test(ProvisionState[current] ?? '')) throw new Error(`node ${name} is ${ProvisionState[current]}: ${node?.lastError}`);
      }
      if (all) return;
      if (Date.now() >= deadline) {
        throw new Error(
          `nodes ${names.join(', ')} not ${ProvisionState[state]} within ${STATE_TIMEOUT_MS / 1000}s${this.controller?.tail() ?? ''}`,
        );
      }
      await sleep(200);
    }
  }

  /** Fresh sparse disks: truncated to nothing and back, so that every run writes into new page-cache pages and blocks. */
  private async resetDisks(machines: Machine[]): Promise<void> {
    for (const m of machines) {
      await truncate(m.disk, 0);
      await truncate(m.disk, this.diskSize);
    }
  }

  private async verifyDisk(m: Machine, what: string): Promise<void> {
    const digest = await hashFile(m.disk, this.o.size);
    if (digest === this.image.sha256) this.verified.push(`${m.name} (${what})`);
    else this.verifyFailed.push(`${m.name} (${what}) hashes to ${digest.slice(0, 12)}…`);
  }

  private progress(text: string): void {
    console.log(`  [${((performance.now() - this.started) / 1000).toFixed(0).padStart(4)}s] ${text}`);
  }

  // -------------------------------------------------------------------------
  // Report.

  private report(): BenchResult {
    const o = this.o;
    const localSamples = [...this.singles.values()].flat().map((s) => s.local!);
    const localMedian = median(localSamples.map((l) => l.mbps));
    const rows: string[][] = [
      ['one agent, window 4 MiB', 'MB/s', 'min - max', '/ local', 'paired', 'controller CPU', 'agent CPU', 'others CPU'],
    ];
    rows.push([
      `local limit (${localSamples.length} runs)`,
      fmt(localMedian),
      range(localSamples.map((l) => l.mbps)),
      '',
      '',
      '',
      `${pct(median(localSamples.map((l) => l.cpu)))} (local)`,
      pct(median(localSamples.map((l) => l.othersCpu))),
    ]);
    const metrics: Record<string, number> = {
      size_bytes: o.size,
      runs_count: o.runs,
      local_mb_per_s: r1(localMedian),
      local_cpu_percent: r1(median(localSamples.map((l) => l.cpu))),
    };
    const chunkStats = o.chunks.map((chunk) => {
      const samples = this.singles.get(chunk) ?? [];
      const m = median(samples.map((s) => s.mbps));
      const paired = median(samples.map((s) => s.mbps / s.local!.mbps));
      const stats = {
        chunk,
        mbps: m,
        ratio: m / localMedian,
        paired,
        controllerCpu: median(samples.map((s) => s.controllerCpu)),
        agentCpu: median(samples.map((s) => s.clientCpu)),
        othersCpu: median(samples.map((s) => s.othersCpu)),
      };
      rows.push([
        `chunk ${size(chunk)}${chunk === PRODUCTION_CHUNK ? ' (current default)' : ''}`,
        fmt(m),
        range(samples.map((s) => s.mbps)),
        ratioText(stats.ratio),
        ratioText(paired),
        pct(stats.controllerCpu),
        pct(stats.agentCpu),
        pct(stats.othersCpu),
      ]);
      const key = chunkKey(chunk);
      Object.assign(metrics, {
        [`chunk_${key}_mb_per_s`]: r1(m),
        [`chunk_${key}_over_local_ratio`]: r3(stats.ratio),
        [`chunk_${key}_paired_ratio`]: r3(paired),
        [`chunk_${key}_controller_cpu_percent`]: r1(stats.controllerCpu),
        [`chunk_${key}_agent_cpu_percent`]: r1(stats.agentCpu),
        [`chunk_${key}_others_cpu_percent`]: r1(stats.othersCpu),
      });
      return stats;
    });
    console.log(
      '\n  one agent; MB = 10^6 bytes; medians; "paired": each transfer over the local run just before it; CPU in % of one core ' +
        `(${availableParallelism()} cores = ${availableParallelism() * 100}%) over the timed window;` +
        ' "others": every other process meanwhile (idle agents, this bench, anything else)',
    );
    for (const line of columns(rows, [false, true, true, true, true, true, true, true])) console.log(`    ${line}`);

    let windowStats: { window: number; mbps: number; ratio: number }[] = [];
    if (this.probes.size > 0) {
      const wrows = [
        [`window probe, chunk ${size(o.windowChunk)}`, 'MB/s', 'min - max', '/ local', 'controller CPU', 'reader CPU', 'others CPU'],
      ];
      windowStats = o.windows.map((window) => {
        const samples = this.probes.get(window) ?? [];
        const m = median(samples.map((s) => s.mbps));
        wrows.push([
          windowLabel(window),
          fmt(m),
          range(samples.map((s) => s.mbps)),
          ratioText(m / localMedian),
          pct(median(samples.map((s) => s.controllerCpu))),
          pct(median(samples.map((s) => s.clientCpu))),
          pct(median(samples.map((s) => s.othersCpu))),
        ]);
        const key = chunkKey(window);
        Object.assign(metrics, {
          [`window_${key}_mb_per_s`]: r1(m),
          [`window_${key}_over_local_ratio`]: r3(m / localMedian),
          [`window_${key}_reader_cpu_percent`]: r1(median(samples.map((s) => s.clientCpu))),
        });
        return { window, mbps: m, ratio: m / localMedian };
      });
      console.log(
        "\n  flow-control window of the agent's channel: the production writer (ControllerLink, writeImage) in a bare process, the window set through ControllerLink's extra channel options",
      );
      for (const line of columns(wrows, [false, true, true, true, true, true, true])) console.log(`    ${line}`);
    }

    if (this.multis.length > 0) {
      const n = this.multis[0]!.agents;
      const mrows = [
        [
          `${n} agents at once`,
          'aggregate MB/s',
          'per agent',
          'starts within',
          'controller CPU',
          'agents CPU',
          'others CPU',
          'ctrl RSS before',
          'peak',
          'VmHWM',
        ],
      ];
      if (this.localMulti) {
        mrows.push([
          `local limit x${this.localMulti.copies}`,
          fmt(this.localMulti.aggregateMbps),
          '',
          formatMs(this.localMulti.startSpreadMs),
          '',
          '',
          '',
          '',
          '',
          '',
        ]);
        metrics.local_multi_aggregate_mb_per_s = r1(this.localMulti.aggregateMbps);
      }
      for (const s of this.multis) {
        mrows.push([
          `chunk ${size(s.chunk)}`,
          fmt(s.aggregateMbps),
          `${fmt(Math.min(...s.perAgentMbps))}-${fmt(Math.max(...s.perAgentMbps))}`,
          formatMs(s.startSpreadMs),
          pct(s.controllerCpu),
          pct(s.agentsCpu),
          pct(s.othersCpu),
          mb(s.rssBefore),
          mb(s.rssPeak),
          mb(s.hwm),
        ]);
        const key = chunkKey(s.chunk);
        Object.assign(metrics, {
          [`multi_${key}_aggregate_mb_per_s`]: r1(s.aggregateMbps),
          [`multi_${key}_controller_cpu_percent`]: r1(s.controllerCpu),
          [`multi_${key}_agents_cpu_percent`]: r1(s.agentsCpu),
          [`multi_${key}_others_cpu_percent`]: r1(s.othersCpu),
          [`multi_${key}_controller_rss_before_bytes`]: s.rssBefore,
          [`multi_${key}_controller_peak_rss_bytes`]: s.rssPeak,
          [`multi_${key}_controller_hwm_bytes`]: s.hwm,
        });
      }
      console.log(
        `\n  ${n} agents deploying at once against one controller (fresh per chunk size); aggregate = ${n} x size / (last end - first start); RSS sampled every 50 ms`,
      );
      for (const line of columns(mrows, [false, true, true, true, true, true, true, true, true, true])) console.log(`    ${line}`);
    }

    // Verdict and recommendation.
    const best = chunkStats.reduce((a, b) => (b.mbps > a.mbps ? b : a));
    const current = chunkStats.find((s) => s.chunk === PRODUCTION_CHUNK);
    const goalMet = best.ratio >= GOAL_RATIO;
    console.log(
      `\n  transfer / local: best ${ratioText(best.ratio)} (chunk ${size(best.chunk)}, ${fmt(best.mbps)} of ${fmt(localMedian)} MB/s)` +
        `${current ? `; current default ${size(PRODUCTION_CHUNK)}: ${ratioText(current.ratio)}` : ''}. ` +
        `Goal ${GOAL_RATIO} of the local limit: ${goalMet ? 'MET' : 'NOT MET'}.`,
    );
    const multiByChunk = new Map(this.multis.map((s) => [s.chunk, s]));
    const bestMulti = this.multis.length > 0 ? this.multis.reduce((a, b) => (b.aggregateMbps > a.aggregateMbps ? b : a)) : undefined;
    const fits = (s: (typeof chunkStats)[number]) =>
      s.mbps >= best.mbps * (1 - NOISE) &&
      (!bestMulti || (multiByChunk.get(s.chunk)?.aggregateMbps ?? 0) >= bestMulti.aggregateMbps * (1 - NOISE));
    const recommended = chunkStats.filter(fits).sort((a, b) => a.chunk - b.chunk)[0] ?? best;
    const recMulti = multiByChunk.get(recommended.chunk);
    console.log(
      `  recommended --image-chunk-size: ${size(recommended.chunk)}, the smallest chunk within ${NOISE * 100}% of the fastest ` +
        `${bestMulti ? `both alone and ${bestMulti.agents} at once` : 'single transfer'}` +
        `${recMulti ? ` (${recMulti.agents} at once: ${fmt(recMulti.aggregateMbps)} MB/s, controller peak RSS ${mb(recMulti.rssPeak)})` : ''}.`,
    );
    console.log(
      `  memory: a transfer whose reader stalls pins about ${QUEUED_CHUNKS} chunks on the controller (grpc-js queues 16 messages per stream, plus the one read ahead): ` +
        `${o.chunks.map((c) => `${size(QUEUED_CHUNKS * c)} at ${size(c)}`).join(', ')}; ` +
        `times --max-image-transfers (default ${DEFAULT_MAX_TRANSFERS}): ${o.chunks.map((c) => size(DEFAULT_MAX_TRANSFERS * QUEUED_CHUNKS * c)).join(', ')}.`,
    );
    if (windowStats.length > 0) {
      const wBest = windowStats.reduce((a, b) => (b.mbps > a.mbps ? b : a));
      const wRec = windowStats.filter((s) => s.mbps >= wBest.mbps * (1 - NOISE)).sort((a, b) => a.window - b.window)[0]!;
      const prod = windowStats.find((s) => s.window === PRODUCTION_WINDOW);
      console.log(
        `  flow-control window: fastest ${windowLabel(wBest.window)} (${fmt(wBest.mbps)} MB/s); the smallest within ${NOISE * 100}% of it: ${windowLabel(wRec.window)}` +
          `${prod ? `; production ${windowLabel(PRODUCTION_WINDOW)}: ${fmt(prod.mbps)} MB/s` : ''}.`,
      );
      metrics.recommended_window_bytes = wRec.window;
    }
    // CPU seconds per 10^9 bytes moved: less sensitive to a busy machine than MB/s.
    const perGb = (samples: { cpu: number; mbps: number }[]) => median(samples.map((x) => (x.cpu / 100 / x.mbps) * 1000));
    const all = [...this.singles.values()].flat();
    const controllerPerGb = perGb(all.map((x) => ({ cpu: x.controllerCpu, mbps: x.mbps })));
    const agentPerGb = perGb(all.map((x) => ({ cpu: x.clientCpu, mbps: x.mbps })));
    const localPerGb = perGb(localSamples.map((x) => ({ cpu: x.cpu, mbps: x.mbps })));
    console.log(
      `  where the time goes (one agent, all chunk sizes, medians): CPU seconds per GB moved: controller ${controllerPerGb.toFixed(2)}, ` +
        `agent ${agentPerGb.toFixed(2)}, the local limit ${localPerGb.toFixed(2)} in all; ${bottleneck(all)}.`,
    );
    const busy = median([...all.map((x) => x.othersCpu), ...localSamples.map((x) => x.othersCpu)]);
    if (busy > BUSY_OTHERS) {
      console.log(
        `  NOTE: other processes took a median ${pct(busy)} of a core during the timed runs: the machine was shared, ` +
          'so MB/s and ratios are depressed and noisy; the CPU seconds per GB above hold up better.',
      );
    }
    Object.assign(metrics, {
      others_cpu_percent: r1(busy),
      best_over_local_ratio: r3(best.ratio),
      best_chunk_bytes: best.chunk,
      recommended_chunk_bytes: recommended.chunk,
      goal_met_count: goalMet ? 1 : 0,
      controller_cpu_s_per_gb: r3(controllerPerGb),
      agent_cpu_s_per_gb: r3(agentPerGb),
      local_cpu_s_per_gb: r3(localPerGb),
    });

    const transfers = [...this.singles.values()].flat().length;
    this.checks.push(
      {
        name: 'every transfer wrote the whole image and verified its sha256 (agent and probe)',
        ok: this.failedTransfers.length === 0 && transfers === o.runs * o.chunks.length,
        detail: this.failedTransfers.length === 0 ? `${transfers} single transfers` : this.failedTransfers.slice(0, 3).join('; '),
      },
      {
        name: 'no transfer was interrupted and resumed (a resume would distort the timing)',
        ok: this.resumes === 0,
        detail: `${this.resumes} resumes`,
      },
      {
        name: 'sampled disks and every local copy hold the image (sha256)',
        ok: this.verifyFailed.length === 0 && this.verified.length > 0,
        detail: this.verifyFailed.length > 0 ? this.verifyFailed.slice(0, 3).join('; ') : `verified ${this.verified.join(', ')}`,
      },
    );
    const headline =
      `${fmt(best.mbps)} MB/s at chunk ${size(best.chunk)} = ${ratioText(best.ratio)} of local ${fmt(localMedian)} MB/s (goal ${GOAL_RATIO}: ${goalMet ? 'met' : 'not met'})` +
      `${recMulti ? `; ${recMulti.agents} agents ${fmt(recMulti.aggregateMbps)} MB/s, ctrl RSS ${mb(recMulti.rssPeak)}` : ''}; recommend ${size(recommended.chunk)}`;
    return { headline, metrics, checks: this.checks };
  }
}

// ---------------------------------------------------------------------------
// Helpers.

/** Random data into the controller's data directory through ImageFiles (hashed, fsynced, renamed), and its database row. */
async function seedRandomImage(dataDir: string, bytes: number): Promise<{ sha256: string; size: number; blob: string }> {
  return seedImage(
    dataDir,
    IMAGE_NAME,
    (function* () {
      // A new buffer per part: ImageFiles.receive still writes a chunk while the next ones are hashed.
      for (let at = 0; at < bytes; at += 4 * MIB) yield randomFillSync(Buffer.allocUnsafe(Math.min(4 * MIB, bytes - at)));
    })(),
  );
}

async function hashFile(path: string, bytes: number): Promise<string> {
  const file = await open(path, 'r');
  try {
    const hash = createHash('sha256');
    const buffer = Buffer.allocUnsafe(4 * MIB);
    for (let at = 0; at < bytes; ) {
      const { bytesRead } = await file.read(buffer, 0, Math.min(buffer.length, bytes - at), at);
      if (bytesRead === 0) break;
      hash.update(buffer.subarray(0, bytesRead));
      at += bytesRead;
    }
    return hash.digest('hex');
  } finally {
    await file.close();
  }
}

function list<K, V>(map: Map<K, V[]>, key: K): V[] {
  const found = map.get(key);
  if (found) return found;
  const created: V[] = [];
  map.set(key, created);
  return created;
}

function median(values: readonly number[]): number {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (sorted.length === 0) return Number.NaN;
  const mid = (sorted.length - 1) / 2;
  return (sorted[Math.floor(mid)]! + sorted[Math.ceil(mid)]!) / 2;
}

/** MB/s, MB = 10^6 bytes. */
function rate(bytes: number, ms: number): number {
  return bytes / 1000 / ms;
}

/** Which side limits the single transfers, from their CPU use. */
function bottleneck(samples: TransferSample[]): string {
  const controller = median(samples.map((x) => x.controllerCpu));
  const agent = median(samples.map((x) => x.clientCpu));
  const others = median(samples.map((x) => x.othersCpu));
  const cores = availableParallelism();
  const total = controller + agent + Math.max(0, others);
  if (Math.max(controller, agent) >= 95) {
    return `the ${controller >= agent ? 'controller' : 'agent'} runs at ${pct(Math.max(controller, agent))} of a core: it sets the pace`;
  }
  if (total >= 100 * cores * 0.85) return `the machine is nearly full: ${pct(total)} of ${cores * 100}% busy during the transfers`;
  return `neither process fills a core (controller ${pct(controller)}, agent ${pct(agent)}): each waits for the other, chunk by chunk, through loopback`;
}

function loadText(): string {
  const [one, five] = loadavg();
  let pressure = '';
  try {
    const some = /some avg10=([\d.]+) avg60=([\d.]+)/.exec(readFileSync('/proc/pressure/cpu', 'utf8'));
    if (some) pressure = `; CPU pressure (time some task waited for a CPU) ${some[1]}% over 10 s, ${some[2]}% over 60 s`;
  } catch {
    // no PSI
  }
  return `${one!.toFixed(2)} (1 min), ${five!.toFixed(2)} (5 min) on ${availableParallelism()} CPUs${pressure}`;
}

function grpcVersion(): string {
  try {
    return (JSON.parse(readFileSync(join(REPO, 'node_modules', '@grpc', 'grpc-js', 'package.json'), 'utf8')) as { version: string })
      .version;
  } catch {
    return '?';
  }
}

function size(bytes: number): string {
  if (bytes >= GIB) return `${+(bytes / GIB).toFixed(2)} GiB`;
  if (bytes >= MIB) return `${+(bytes / MIB).toFixed(2)} MiB`;
  if (bytes >= KIB) return `${+(bytes / KIB).toFixed(2)} KiB`;
  return `${bytes} B`;
}

function windowLabel(bytes: number): string {
  return bytes === 64 * KIB - 1 ? '64 KiB (grpc-js default)' : `${size(bytes)}${bytes === PRODUCTION_WINDOW ? ' (production)' : ''}`;
}

function chunkKey(bytes: number): string {
  if (bytes === 64 * KIB - 1) return '64k';
  return bytes % MIB === 0
    ? `${bytes / MIB}m`
    : bytes % (MIB / 2) === 0
      ? `${(bytes / MIB).toFixed(1).replace('.', '_')}m`
      : `${Math.round(bytes / KIB)}k`;
}

const fmt = (x: number) => (Number.isFinite(x) ? Math.round(x).toLocaleString('en-US') : '-');
const mbps = (x: number) => `${fmt(x)} MB/s`;
const mb = (bytes: number) => (Number.isFinite(bytes) && bytes > 0 ? `${Math.round(bytes / 1e6)} MB` : '-');
const pct = (x: number) => (Number.isFinite(x) ? `${Math.max(0, Math.round(x))}%` : '-');
const ratioText = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '-');
const range = (xs: number[]) => (xs.length === 0 ? '-' : `${fmt(Math.min(...xs))} - ${fmt(Math.max(...xs))}`);
const gib = (bytes: number) => `${(bytes / GIB).toFixed(1)} GiB`;
const r1 = (x: number) => (Number.isFinite(x) ? Math.round(x * 10) / 10 : -1);
const r3 = (x: number) => (Number.isFinite(x) ? Math.round(x * 1000) / 1000 : -1);
