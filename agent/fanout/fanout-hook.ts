import type { FileHandle } from 'node:fs/promises';
import type { ChunkManifest } from '../../common/chunk-manifest.js';
import type { Logger } from '../../common/logging.js';
import type { ImageSource } from '../imaging/image-source.js';

/** What the chunked writer hands the fan-out phase (agent/imaging/chunked-writer.ts). */
export interface FanoutFetchContext {
  image: string;
  devicePath: string;
  manifest: ChunkManifest;
  /** One byte per chunk, set when the chunk is on the disk and verified; shared with the writer. */
  done: Uint8Array;
  device: FileHandle;
  source: ImageSource;
  signal: AbortSignal;
  logger: Logger;
  /** No data for this long ends a fetch from the controller; from a peer, at most 10 s. */
  stallTimeoutMs: number;
  /** Failures of the controller in a row (reads or exchanges) before the plain transfer takes over with its own backoff. */
  maxAttempts: number;
  /** A chunk landed, verified, from a peer or the controller. */
  onChunk(index: number, bytes: number, from: 'peer' | 'controller'): void;
}

/** The fan-out phase of write_image: what the agent fetched, and whether every chunk is in. */
export interface FanoutHook {
  fetch(context: FanoutFetchContext): Promise<void>;
  /** write_image ended (well or not): serve for the linger time, or stop serving now. */
  writeEnded(ok: boolean): void;
}
