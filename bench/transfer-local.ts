/**
 * The local limit of bench/transfer-chunks.ts, run as a child process on the same
 * Node as the controller and the agents:
 *
 *   node --import tsx bench/transfer-local.ts IMAGE TARGET SIZE BLOCK [START_AT]
 *
 * One process reads IMAGE in BLOCK-sized blocks, hashes them with sha256 and
 * writes them at their offsets into TARGET (which must exist, as the agent's
 * disk does), then fsyncs once at the end, as the agent does. Reads, hashing
 * and writes overlap the way they can in Node: the next block is read (libuv
 * thread pool) while this one is hashed (main thread), and one write is in
 * flight while the next block is hashed, with three buffers in rotation.
 * The timed section runs from opening TARGET to the end of the fsync, like
 * the agent's 'writing image' .. 'image written and verified' lines.
 *
 * START_AT (epoch ms) makes several copies start together.
 *
 * Prints one JSON line: { ms, bytes, sha256, cpuMs, startedAt, endedAt } (times in epoch ms).
 */
import { createHash } from 'node:crypto';
import { type FileHandle, open } from 'node:fs/promises';
import { writeFully } from '../common/disk-writes/positional-writes.js';

const [imagePath, targetPath, sizeArg, blockArg, startAtArg] = process.argv.slice(2);
if (!imagePath || !targetPath || !sizeArg || !blockArg) {
  process.stderr.write('usage: transfer-local.ts IMAGE TARGET SIZE BLOCK\n');
  process.exit(2);
}
const size = Number(sizeArg);
const block = Number(blockArg);

async function readFully(file: FileHandle, buffer: Buffer, length: number, position: number): Promise<Buffer> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await file.read(buffer, got, length - got, position + got);
    if (bytesRead === 0) throw new Error(`${imagePath} ended at ${position + got} of ${size} bytes`);
    got += bytesRead;
  }
  return buffer.subarray(0, length);
}

const source = await open(imagePath, 'r');
const startAt = Number(startAtArg ?? 0);
if (startAt > Date.now()) await new Promise((resolve) => setTimeout(resolve, startAt - Date.now()));
const startedAt = Date.now();
const cpuBefore = process.cpuUsage();
const started = performance.now();
const target = await open(targetPath, 'r+');
const buffers = [Buffer.allocUnsafeSlow(block), Buffer.allocUnsafeSlow(block), Buffer.allocUnsafeSlow(block)];
const hash = createHash('sha256');
let index = 0;
let reading: Promise<Buffer> | undefined = size > 0 ? readFully(source, buffers[0]!, Math.min(block, size), 0) : undefined;
let writing: Promise<void> = Promise.resolve();
for (let offset = 0; reading; index++) {
  const data = await reading;
  const next = offset + data.length;
  // The buffer read next was last written two blocks ago, and that write has been awaited.
  reading = next < size ? readFully(source, buffers[(index + 1) % 3]!, Math.min(block, size - next), next) : undefined;
  hash.update(data);
  await writing;
  writing = writeFully(target, data, offset);
  offset = next;
}
await writing;
const sha256 = hash.digest('hex');
await target.sync();
const ms = performance.now() - started;
const endedAt = Date.now();
const cpu = process.cpuUsage(cpuBefore);
await target.close();
await source.close();
process.stdout.write(`${JSON.stringify({ ms, bytes: size, sha256, cpuMs: (cpu.user + cpu.system) / 1000, startedAt, endedAt })}\n`);
