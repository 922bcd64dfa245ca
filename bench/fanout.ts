/**
 * npm run bench -- fanout: a deploy wave of N agents (8, 16, 32 up to
 * --max-agents), real agent processes over TLS on fake machines, against a
 * real controller (in this process), with fan-out on and then off; and one
 * agent alone, the baseline. Every link is capped by a token bucket, so
 * that the topology, not these 2 cores, is the limit:
 *
 * - each agent receives at most --cap bytes/s (its --fanout-max-download-rate)
 *   and serves at most --cap bytes/s to peers (the controller's
 *   --fanout-max-upload-rate);
 * - the controller sends at most --cap bytes/s in all: every agent reaches
 *   it through a proxy here whose controller-to-agents direction shares one
 *   bucket.
 *
 * The cap is small by default (1 MB/s), so that the links and not these 2
 * cores are the limit: at 4 MB/s the 32 agent processes (tsx, about 150 MiB
 * each) already drove the load average to 33, peers starved of CPU stalled
 * and were dropped, and the CPU was measured; at 1 MB/s the 32-agent wave
 * runs at a load average of 3-7. At 25 MB/s the wave would want 800 MB/s of
 * TLS, gRPC and SHA-256, far more than grpc-js does on 2 cores
 * (/work/shared/GRPC-NOTES.md).
 *
 * Prints, per N: fleet time (first write_image start to last verified, from
 * the agents' own log lines), its ratio to the one agent's time, controller
 * egress / image size, and the agents' peak RSS (VmHWM); fan-out off the
 * same. The bars of issue 17 are checks: fleet ≤ 2 × one agent, egress ≤
 * 1.5 × image, fan-out off ≥ 10 × slower, at the largest N.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type Server, type Socket, connect } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { TokenBucket } from '../agent/fanout/token-bucket.js';
import { ProvisionAction, ProvisionState } from '../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../test/helpers/agent-process.js';
import { startTestController, type TestController } from '../test/helpers/controller.js';
import { uniqueFakeMachine } from '../test/helpers/fake-machine.js';
import { addImage, readDiskStart, sha256 } from '../test/helpers/images.js';
import { makeTestPki } from '../test/helpers/tls.js';
import { type BenchCheck, type BenchResult, formatMs, formatRatio, parseNumberOptions, withTempDir } from './harness.js';

const MIB = 1024 * 1024;

/** Agents still running when the benchmark exits (an error, Ctrl-C) go with it. */
const RUNNING = new Set<AgentProcess>();
process.on('exit', () => {
  for (const agent of RUNNING) agent.child.kill('SIGKILL');
});

export const description = 'a deploy wave of 8, 16, 32 agent processes over TLS with capped links: fan-out on vs off vs one agent';
export const options = {
  'max-agents': { default: 32, description: 'largest wave; waves of --min-agents, twice that, … up to it', integer: true },
  'min-agents': { default: 8, description: 'smallest wave', integer: true },
  'image-mib': { default: 16, description: 'image size in MiB', integer: true },
  cap: { default: 1_000_000, description: 'bytes/s of every link: each agent down and up, the controller out', integer: true },
  'chunk-kib': { default: 512, description: 'manifest chunk size in KiB', integer: true },
  'controller-streams': { default: 0, description: "the controller's --fanout-controller-streams; 0: its default", integer: true },
  'skip-off': { default: 0, description: '1: skip the fan-out-off waves (a quicker look at fan-out alone)', integer: true },
};

/** A proxy whose target-to-client direction, over every connection, shares one token bucket: the controller's NIC. */
class CappedProxy {
  egress = 0;
  private readonly sockets = new Set<Socket>();
  private constructor(
    private readonly server: Server,
    readonly address: string,
  ) {}

  static async start(target: string, bytesPerSecond: number): Promise<CappedProxy> {
    const bucket = new TokenBucket(bytesPerSecond);
    const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
    let proxy: CappedProxy | undefined;
    const server = createServer((client) => {
      const upstream = connect(port, host);
      proxy?.sockets.add(client).add(upstream);
      client.pipe(upstream);
      upstream.on('data', (chunk: Buffer) => {
        upstream.pause();
        bucket.take(chunk.length).then(() => {
          if (proxy) proxy.egress += chunk.length;
          if (client.write(chunk)) upstream.resume();
          else client.once('drain', () => upstream.resume());
        });
      });
      const end = () => {
        client.destroy();
        upstream.destroy();
      };
      client.on('error', end).on('close', end);
      upstream.on('error', end).on('close', end);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const address = server.address();
    if (address === null || typeof address === 'string') throw new Error('proxy has no port');
    proxy = new CappedProxy(server, `127.0.0.1:${address.port}`);
    return proxy;
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

interface Agent {
  name: string;
  process: AgentProcess;
  disk: string;
}

interface WaveResult {
  agents: number;
  fanout: boolean;
  fleetMs: number;
  egressRatio: number;
  peakRssMib: number;
  bitExact: boolean;
}

function peakRssMib(pid: number | undefined): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    return Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) / 1024;
  } catch {
    return 0;
  }
}

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseNumberOptions(args, options);
  const imageBytes = o['image-mib'] * MIB;
  const sizes: number[] = [];
  for (let n = o['min-agents']; n <= o['max-agents']; n *= 2) sizes.push(n);
  if (sizes.length === 0) sizes.push(o['max-agents']);
  console.log(
    `image ${o['image-mib']} MiB in ${o['chunk-kib']} KiB chunks; every link capped at ${(o.cap / 1e6).toFixed(1)} MB/s; waves of ${sizes.join(', ')} agent processes (tsx), over TLS`,
  );

  return withTempDir('metalcast-bench-fanout-', async (dir) => {
    const pki = await makeTestPki(dir);
    let machineIndex = 1;
    const results: WaveResult[] = [];

    /** One wave: a fresh controller, N agents through the capped proxy, one deploy each, measured from the agents' logs. */
    const wave = async (n: number, fanout: boolean): Promise<WaveResult> => {
      const t: TestController = await startTestController(
        {
          ...pki.controllerFlags,
          heartbeatTimeout: '120s',
          heartbeatIntervalMin: '1s',
          heartbeatIntervalMax: '2s',
          startupGrace: '0s',
          imageChunkSize: '256K',
          imageManifestChunkSize: `${o['chunk-kib']}K`,
          maxImageTransfers: '256',
          maxConcurrentDeploys: '256',
          maxConcurrentCleans: '256',
          fanout: 'true',
          fanoutMaxUploadRate: String(o.cap),
          ...(o['controller-streams'] > 0 ? { fanoutControllerStreams: String(o['controller-streams']) } : {}),
          transferStallTimeout: '20s',
          keepaliveTime: '10s',
          keepaliveTimeout: '30s',
        },
        undefined,
        { caPem: pki.ca.certPem },
      );
      const proxy = await CappedProxy.start(t.controller.grpcAddress, o.cap);
      const agents: Agent[] = [];
      try {
        const image = await addImage(t.controller, 'bench-os', randomBytes(imageBytes));
        for (let i = 0; i < n; i++) {
          const name = `node-${i}`;
          const machine = await uniqueFakeMachine(join(dir, `m${machineIndex}`), machineIndex++, {
            disks: [{ name: 'sda', sizeBytes: imageBytes + 64 * MIB }],
          });
          await t.nodes.createNode({ name, macAddresses: [machine.macs[0] as string] });
          await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
          await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
          const process = spawnAgent({
            controller: proxy.address,
            root: machine.root,
            ca: pki.caFile,
            'log-level': 'info',
            'keepalive-time': '10s',
            'keepalive-timeout': '30s',
            'fanout-max-download-rate': String(o.cap),
          });
          RUNNING.add(process);
          agents.push({ name, process, disk: (machine.disks[0] as { path: string }).path });
        }
        await untilAll(t, agents, ProvisionState.PROVISION_STATE_AVAILABLE, 300_000);
        const servedBefore = await served(t);
        await Promise.all(
          agents.map((a) =>
            t.nodes.setProvisionState({
              node: a.name,
              action: ProvisionAction.PROVISION_ACTION_DEPLOY,
              deploy: { image: 'bench-os', target: undefined, fanoutDisabled: !fanout } as never,
            }),
          ),
        );
        await untilAll(t, agents, ProvisionState.PROVISION_STATE_ACTIVE, 1_800_000);
        const egress = (await served(t)) - servedBefore;
        // First write start to last verified, from the agents' own clocks (one machine: one clock).
        const starts = agents.map((a) => logTime(a, 'writing image'));
        const ends = agents.map((a) => logTime(a, 'image written and verified'));
        const fleetMs = Math.max(...ends) - Math.min(...starts);
        const each = agents.map((_, i) => (ends[i] as number) - (starts[i] as number));
        console.log(
          `    writes started over ${formatMs(Math.max(...starts) - Math.min(...starts))}; each agent's write took ${formatMs(Math.min(...each))} to ${formatMs(Math.max(...each))}`,
        );
        let bitExact = true;
        for (const a of agents) if (sha256(await readDiskStart(a.disk, imageBytes)) !== image.sha256) bitExact = false;
        const rss = Math.max(...agents.map((a) => peakRssMib(a.process.child.pid)));
        const result = { agents: n, fanout, fleetMs, egressRatio: egress / imageBytes, peakRssMib: rss, bitExact };
        console.log(
          `${String(n).padStart(3)} agents, fan-out ${fanout ? 'on ' : 'off'}: fleet ${formatMs(fleetMs)}, controller egress ${formatRatio(result.egressRatio)} the image (proxy saw ${(proxy.egress / MIB).toFixed(1)} MiB), peak RSS per agent ${rss.toFixed(0)} MiB, bit-exact: ${bitExact}`,
        );
        // What went wrong, if anything: the agents' warnings by message.
        const warnings = new Map<string, number>();
        for (const a of agents) {
          for (const l of a.process.logs) {
            if ((l.level as number) >= 40 && l.component !== 'lookup' && l.component !== 'heartbeat') {
              const key = `${String(l.msg).slice(0, 80)} ${String(l.kind ?? '')} ${String(l.reason ?? '').slice(0, 60)}`;
              warnings.set(key, (warnings.get(key) ?? 0) + 1);
            }
          }
        }
        for (const [warning, count] of [...warnings].sort((a, b) => b[1] - a[1]).slice(0, 5)) console.log(`    ${count} × ${warning}`);
        return result;
      } finally {
        await Promise.all(agents.map((a) => a.process.kill('SIGKILL')));
        for (const a of agents) RUNNING.delete(a.process);
        await proxy.close();
        // The agents were killed with their streams open: a controller that reports an unclean shutdown is expected here.
        await t.destroy().catch((error: unknown) => console.log(`    (controller stop: ${String(error).slice(0, 120)})`));
      }
    };

    const one = await wave(1, true);
    results.push(one);
    for (const n of sizes) {
      results.push(await wave(n, true));
      if (o['skip-off'] !== 1) results.push(await wave(n, false));
    }

    const metrics: Record<string, number> = { one_agent_ms: Math.round(one.fleetMs), cap_bytes_per_second: o.cap, image_bytes: imageBytes };
    for (const r of results.slice(1)) {
      const key = `${r.agents}_${r.fanout ? 'on' : 'off'}`;
      metrics[`fleet_${key}_ms`] = Math.round(r.fleetMs);
      metrics[`fleet_${key}_ratio`] = Number((r.fleetMs / one.fleetMs).toFixed(2));
      metrics[`egress_${key}_ratio`] = Number(r.egressRatio.toFixed(2));
      metrics[`peak_rss_${key}_mib`] = Math.round(r.peakRssMib);
    }
    const largest = sizes.at(-1) as number;
    const on = results.find((r) => r.agents === largest && r.fanout) as WaveResult;
    const off = results.find((r) => r.agents === largest && !r.fanout);
    const checks: BenchCheck[] = [
      {
        name: 'bit-exact',
        ok: results.every((r) => r.bitExact),
        detail: 'every disk of every wave holds the image',
      },
      {
        name: `fleet-${largest}-within-2x-one-agent`,
        ok: on.fleetMs <= 2 * one.fleetMs,
        detail: `${formatMs(on.fleetMs)} for ${largest} agents vs ${formatMs(one.fleetMs)} for one (${formatRatio(on.fleetMs / one.fleetMs)})`,
      },
      {
        name: `egress-${largest}-within-1.5x-image`,
        ok: on.egressRatio <= 1.5,
        detail: `the controller sent ${formatRatio(on.egressRatio)} the image`,
      },
    ];
    // --skip-off 1 runs no fan-out-off wave: that bar is then not checked at all.
    if (off) {
      checks.push({
        name: `fanout-off-${largest}-at-least-10x-slower`,
        ok: off.fleetMs >= 10 * on.fleetMs,
        detail: `off ${formatMs(off.fleetMs)} vs on ${formatMs(on.fleetMs)} (${formatRatio(off.fleetMs / on.fleetMs)})`,
      });
    }
    const offHeadline = off ? `; off ${formatMs(off.fleetMs)} (${formatRatio(off.fleetMs / on.fleetMs)} slower)` : '; fan-out off not run';
    return {
      headline: `${largest} agents: fan-out ${formatMs(on.fleetMs)} (${formatRatio(on.fleetMs / one.fleetMs)} one agent), egress ${formatRatio(on.egressRatio)} image${offHeadline}`,
      metrics,
      checks,
    };
  });
}

async function served(t: TestController): Promise<number> {
  const values = (await t.controller.registry.getSingleMetric('metalcast_image_bytes_served_total')?.get())?.values ?? [];
  return values.reduce((sum, v) => sum + v.value, 0);
}

function logTime(agent: Agent, message: string): number {
  const line = agent.process.logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith(message));
  if (!line) throw new Error(`${agent.name} never logged '${message}'`);
  return Date.parse(String(line.time));
}

async function untilAll(t: TestController, agents: Agent[], state: ProvisionState, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const pending = new Set(agents.map((a) => a.name));
  while (pending.size > 0) {
    if (Date.now() > deadline) throw new Error(`${[...pending].join(', ')} did not reach ${ProvisionState[state]} in ${timeoutMs / 1000}s`);
    const { nodes } = await t.nodes.listNodes({});
    for (const node of nodes) {
      if (!pending.has(node.name)) continue;
      if (node.provisionState === state) pending.delete(node.name);
      else if (node.lastError && /failed/.test(ProvisionState[node.provisionState] ?? '')) {
        throw new Error(`${node.name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
      }
    }
    await sleep(250);
  }
}
