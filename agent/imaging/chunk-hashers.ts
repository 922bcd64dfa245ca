import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';

/**
 * The sha256 of each received chunk, computed on worker threads.
 *
 * Why: during a TLS download the agent's main thread is busy all the time
 * (TLS, HTTP/2 frames, copying the pieces into a block, and sha256), so
 * whatever leaves it is speed; sha256 was a fifth of it. A piece is posted as
 * a view of a SharedArrayBuffer, so nothing is copied: the caller keeps the
 * bytes unchanged until the piece's promise settles (the received blocks come
 * from a shared BufferPool and go back to it only then).
 *
 * A chunk's pieces all go to the same worker (chunk index modulo the number
 * of workers), which holds its hash between pieces and processes its messages
 * in order; so pieces of one chunk are hashed in the order they arrived, also
 * across a resumed call. The workers are evaluated from the source below, not
 * from a file, so the bundled agent (one .mjs in the ramdisk) needs nothing
 * beside it.
 */
export class ChunkHashers {
  private readonly workers: Worker[] = [];
  private readonly waiting = new Map<number, { resolve: (digest: Buffer | undefined) => void; reject: (error: Error) => void }>();
  private nextId = 0;
  private broken: Error | undefined;
  private closing = false;

  constructor(count = defaultHasherCount()) {
    for (let n = 0; n < count; n++) {
      const worker = new Worker(WORKER_SOURCE, { eval: true, name: `chunk-hasher-${n}` });
      worker.on('message', (reply: HashReply) => this.settle(reply));
      worker.on('error', (error) => this.fail(new Error(`a chunk hashing worker failed: ${error.message}`)));
      worker.on('exit', (code) => {
        if (!this.closing) this.fail(new Error(`a chunk hashing worker exited (code ${code})`));
      });
      this.workers.push(worker);
    }
  }

  /**
   * Hashes `data` as the next piece of chunk `index`; `first` starts the chunk's
   * hash afresh, `last` ends it: the promise then resolves with the digest
   * (otherwise with undefined). `data` must be a view of a SharedArrayBuffer.
   */
  update(index: number, data: Uint8Array, first: boolean, last: boolean): Promise<Buffer | undefined> {
    if (this.broken) return Promise.reject(this.broken);
    if (!(data.buffer instanceof SharedArrayBuffer)) throw new TypeError('ChunkHashers.update needs a view of a SharedArrayBuffer');
    const id = this.nextId++;
    const worker = this.workers[index % this.workers.length] as Worker;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      const request: HashRequest = { id, chunk: index, first, last, data };
      worker.postMessage(request);
    });
  }

  /** Stops the workers; pieces still waiting are refused. */
  async close(): Promise<void> {
    this.closing = true;
    this.fail(new Error('the chunk hashers were closed'));
    await Promise.all(this.workers.map((worker) => worker.terminate()));
  }

  private settle(reply: HashReply): void {
    const waiting = this.waiting.get(reply.id);
    if (!waiting) return;
    this.waiting.delete(reply.id);
    if (reply.error !== undefined) waiting.reject(new Error(`hashing chunk ${reply.chunk} failed: ${reply.error}`));
    else waiting.resolve(reply.digest ? Buffer.from(reply.digest.buffer, reply.digest.byteOffset, reply.digest.byteLength) : undefined);
  }

  private fail(error: Error): void {
    this.broken ??= error;
    for (const { reject } of this.waiting.values()) reject(error);
    this.waiting.clear();
  }
}

/** One worker per core beyond the main thread's, at least one, at most four (sha256 runs at ~1.5 GB/s a core). */
function defaultHasherCount(): number {
  return Math.max(1, Math.min(4, availableParallelism() - 1));
}

interface HashRequest {
  id: number;
  chunk: number;
  first: boolean;
  last: boolean;
  data: Uint8Array;
}

interface HashReply {
  id: number;
  chunk: number;
  digest?: Uint8Array;
  error?: string;
}

/** The worker: a hash per chunk being received, answered per piece (CommonJS, as eval workers run). */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const hashes = new Map();
parentPort.on('message', ({ id, chunk, first, last, data }) => {
  try {
    let hash = hashes.get(chunk);
    if (first) {
      hash = createHash('sha256');
      hashes.set(chunk, hash);
    } else if (!hash) {
      throw new Error('a piece continued a chunk whose hash was never started');
    }
    hash.update(data);
    if (!last) return parentPort.postMessage({ id, chunk });
    hashes.delete(chunk);
    parentPort.postMessage({ id, chunk, digest: hash.digest() });
  } catch (error) {
    parentPort.postMessage({ id, chunk, error: String((error && error.message) || error) });
  }
});
`;
