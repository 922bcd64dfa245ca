/**
 * npm run bench -- fanout-tracker: the controller's CPU per ExchangeChunks
 * in a wave of --members agents that each hold a random half of the image,
 * for a 3 GiB and a 100 GiB image in 4 MiB chunks (768 and 25,600 chunks).
 *
 * Baseline, in the same run: choosing the same chunks the way the tracker
 * did before it kept holder counts (controller/fanout/holder-counts.ts):
 * for every chunk the agent lacks, a pass over the members to find its
 * holders, then a sort of them all by holder count. Every agent exchanges
 * several times a second while it waits or fetches, so this is controller
 * CPU, and time its event loop is held, per agent.
 */
import { bit, DEFAULT_FANOUT_POLICY, type ExchangeInput, FanoutTracker } from '../controller/fanout/tracker.js';
import { testLogger } from '../test/helpers/controller.js';
import { type BenchCheck, type BenchResult, breathe, columns, parseNumberOptions } from './harness.js';

export const description =
  'fan-out tracker: controller CPU per ExchangeChunks for 3 GiB and 100 GiB images, against counting holders per chunk';

export const options = {
  members: { default: 40, description: 'agents in the wave', integer: true },
  exchanges: { default: 400, description: 'exchanges timed per image size and method', integer: true },
  rounds: { default: 3, description: 'interleaved rounds; medians are reported', integer: true },
};

const CHUNK_COUNTS = [768, 25_600];

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)] as number;

/** What the tracker did per exchange before holder counts: holders per lacking chunk, all sorted, rarest first. */
function perChunkScan(held: Uint8Array[], self: number, chunks: number, maxAssignments: number): number[] {
  const live = held.filter((_, m) => m !== self);
  const wanted: { chunk: number; holders: Uint8Array[]; tie: number }[] = [];
  for (let chunk = 0; chunk < chunks; chunk++) {
    if (bit(held[self] as Uint8Array, chunk)) continue;
    wanted.push({ chunk, holders: live.filter((h) => bit(h, chunk)), tie: Math.random() });
  }
  wanted.sort((a, b) => a.holders.length - b.holders.length || a.tie - b.tie);
  return wanted.slice(0, maxAssignments).map((w) => w.chunk);
}

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseNumberOptions(args, options);
  const metrics: Record<string, number> = {};
  const checks: BenchCheck[] = [];
  const rows = [['image', 'chunks', 'holder counts µs', 'per-chunk scan µs', 'scan / counts']];
  for (const chunks of CHUNK_COUNTS) {
    const bytes = Math.ceil(chunks / 8);
    const held = Array.from({ length: o.members }, () => {
      const bitmap = new Uint8Array(bytes);
      for (let i = 0; i < bytes; i++) bitmap[i] = Math.floor(Math.random() * 256);
      return bitmap;
    });
    // A big upload limit: every exchange assigns its four chunks, in both methods alike.
    const tracker = new FanoutTracker(
      { ...DEFAULT_FANOUT_POLICY, maxUploads: 1_000_000 },
      { bytes() {}, peerFailure() {}, peerDropped() {} },
      testLogger(),
    );
    const input = (m: number): ExchangeInput => ({
      nodeUuid: `node-${m}`,
      address: `10.0.0.${m}:9440`,
      certificatePem: '',
      properties: {},
      waveKey: 'bench@sha',
      chunkCount: chunks,
      held: held[m] as Uint8Array,
      fetching: new Uint8Array(bytes),
      maxAssignments: 4,
      failures: [],
      bytesFromPeers: 0,
      bytesFromController: 0,
    });
    for (let m = 0; m < o.members; m++) tracker.exchange({ ...input(m), maxAssignments: 0 });
    let assigned = 0;
    const counted: number[] = [];
    const scanned: number[] = [];
    for (let round = 0; round < o.rounds; round++) {
      let started = process.hrtime.bigint();
      for (let i = 0; i < o.exchanges; i++) assigned += tracker.exchange(input(i % o.members)).assignments.length;
      counted.push(Number(process.hrtime.bigint() - started) / 1e3 / o.exchanges);
      await breathe();
      started = process.hrtime.bigint();
      for (let i = 0; i < o.exchanges; i++) perChunkScan(held, i % o.members, chunks, 4);
      scanned.push(Number(process.hrtime.bigint() - started) / 1e3 / o.exchanges);
      await breathe();
    }
    const [ours, before] = [median(counted), median(scanned)];
    const gib = (chunks * 4) / 1024;
    rows.push([`${gib.toFixed(0)} GiB`, String(chunks), ours.toFixed(0), before.toFixed(0), `×${(before / ours).toFixed(1)}`]);
    metrics[`exchange_${chunks}_chunks_us`] = Math.round(ours);
    metrics[`per_chunk_scan_${chunks}_chunks_us`] = Math.round(before);
    metrics[`scan_over_counts_${chunks}_chunks_ratio`] = Number((before / ours).toFixed(2));
    checks.push({
      name: `assigns-${chunks}`,
      ok: assigned === 4 * o.exchanges * o.rounds,
      detail: `${assigned} chunks assigned in ${o.exchanges * o.rounds} exchanges of 4`,
    });
  }
  console.log(`${o.members} agents, each holding a random half of the image; 4 chunks asked per exchange`);
  for (const line of columns(rows, [false, true, true, true, true])) console.log(line);
  const big = CHUNK_COUNTS.at(-1) as number;
  return {
    headline: `100 GiB image, ${o.members} agents: ${metrics[`exchange_${big}_chunks_us`]} µs per exchange, ×${metrics[`scan_over_counts_${big}_chunks_ratio`]} faster than a per-chunk scan`,
    metrics,
    checks,
  };
}
