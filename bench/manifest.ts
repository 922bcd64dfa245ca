/**
 * The chunk manifest's chunk size (docs/chunk-manifest.md): how fast a
 * manifest is built at each size, against plain sha256 over the same bytes
 * in the same rounds (the baseline: what import cost before manifests), and
 * what each size means for the manifest's size and for delta re-imaging.
 *
 *   npm run bench -- manifest [--size-mib 256] [--rounds 3]
 */
import { createHash, randomBytes } from 'node:crypto';
import { ManifestBuilder } from '../common/chunk-manifest.js';
import { type BenchResult, breathe, columns, parseNumberOptions } from './harness.js';

export const description =
  'chunk manifest build rate per chunk size vs plain sha256 in the same rounds; manifest size and delta granularity';

export const options = {
  'size-mib': { default: 256, description: 'MiB of random data hashed per measurement (kept in memory)', integer: true },
  rounds: { default: 3, description: 'interleaved rounds; medians are reported', integer: true },
};

const KIB = 1024;
const MIB = 1024 * KIB;
const GIB = 1024 * MIB;
const SIZES = [256 * KIB, MIB, 4 * MIB, 16 * MIB];
/** How the data is fed: the size of a ReadImage-like piece. */
const PIECE = 4 * MIB;

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)] as number;

export async function run(args: string[]): Promise<BenchResult> {
  const opts = parseNumberOptions(args, options);
  const data = randomBytes(opts['size-mib'] * MIB);
  const rates = new Map<number, number[]>();
  const time = (fn: () => void) => {
    const started = process.hrtime.bigint();
    fn();
    return data.length / MIB / (Number(process.hrtime.bigint() - started) / 1e9);
  };
  for (let round = 0; round < opts.rounds; round++) {
    // 0 is the baseline: one sha256 over the image, as import did before manifests.
    for (const size of [0, ...SIZES]) {
      const rate = time(() => {
        if (size === 0) {
          const hash = createHash('sha256');
          for (let at = 0; at < data.length; at += PIECE) hash.update(data.subarray(at, at + PIECE));
          hash.digest();
        } else {
          const builder = new ManifestBuilder(size);
          for (let at = 0; at < data.length; at += PIECE) builder.update(data.subarray(at, at + PIECE));
          builder.finish();
        }
      });
      rates.set(size, [...(rates.get(size) ?? []), rate]);
      await breathe();
    }
  }
  const baseline = median(rates.get(0) as number[]);
  const metrics: Record<string, number> = { sha256_mib_per_s: Math.round(baseline) };
  const rows = [['chunk', 'build MiB/s', '/ sha256', 'chunks per 100 GiB', 'manifest per 100 GiB', '100 changes in 1 GiB', '1000 changes']];
  for (const size of SIZES) {
    const rate = median(rates.get(size) as number[]);
    const perImage = GIB / size;
    const fetched = (k: number) => `${(100 * (1 - (1 - 1 / perImage) ** k)).toFixed(1)} %`;
    rows.push([
      `${size / KIB} KiB`,
      rate.toFixed(0),
      (rate / baseline).toFixed(2),
      String((100 * GIB) / size),
      `${((((100 * GIB) / size) * 32) / MIB).toFixed(2)} MiB`,
      fetched(100),
      fetched(1000),
    ]);
    metrics[`build_${size / KIB}k_vs_sha256_ratio`] = Number((rate / baseline).toFixed(3));
  }
  console.log(`plain sha256 (baseline, same rounds): ${baseline.toFixed(0)} MiB/s; the builder hashes each byte twice (chunk and whole)`);
  for (const line of columns(rows, [false, true, true, true, true, true, true])) console.log(line);
  console.log('(changes: scattered 4 KiB writes; the share of the image a delta deploy fetches is 1 - (1 - 1/n)^k for n chunks)');
  const oneMib = metrics.build_1024k_vs_sha256_ratio as number;
  return {
    headline: `manifest build at 1 MiB chunks: ${oneMib}× plain sha256`,
    metrics,
    checks: [],
  };
}
