import ms from 'ms';
import pRetry from 'p-retry';
import { MetalcastError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { ImageRecord, Store } from '../store/store.js';
import type { ImageCatalog } from './catalog.js';
import type { ImageFiles, ReceivedContent, ReceiveOptions } from './image-files.js';
import { type Checksum, redactUrl } from './validation.js';

/** The error a row gets when the controller stops while its import runs, or restarts after it. */
export const IMPORT_STOPPED = 'controller stopped during import; import again';

export interface ImporterOptions {
  /** Tries per import, the first included. */
  attempts: number;
  /** An attempt that receives nothing for this long is abandoned and retried. */
  stallTimeoutMs: number;
  maxBytes: number;
  /** Delay before the first retry; it doubles each time, times a random 1–2 (default 1 s). */
  minBackoffMs?: number;
  /** Longest delay between tries (default 60 s). */
  maxBackoffMs?: number;
  /** What turns the verified download into the stored content (format detection, qcow2 conversion); none keeps it as it is. */
  prepare?: Preparer;
  /** Builds the chunk manifest while the download is hashed (ReceiveOptions.manifestChunkSize). */
  manifestChunkSize?: number;
}

/** Makes the ReceiveOptions.prepare step of one attempt, bound to the attempt's abort signal. */
export type Preparer = (signal: AbortSignal) => NonNullable<ReceiveOptions['prepare']>;

/** Why one attempt failed, and whether another attempt could help. */
export class AttemptFailed extends Error {
  constructor(
    message: string,
    readonly retryable: boolean,
  ) {
    super(message);
    this.name = 'AttemptFailed';
  }
}

/** Abort reasons of a whole import. */
const STOPPED = new Error(IMPORT_STOPPED);
const DELETED = new Error('the image was deleted');

interface Running {
  controller: AbortController;
  done: Promise<void>;
}

/**
 * Downloads images from http(s) URLs in the background, straight into the
 * image store: the body is streamed through ImageFiles.receive(), never
 * buffered, and verified against the checksum the operator gave. A 4xx
 * answer or a checksum mismatch fails the import at once; 5xx answers,
 * connection errors and stalls are retried with jittered exponential
 * backoff. The row reserved by the caller ends 'ready' or 'failed'.
 */
export class ImageImporter {
  private readonly running = new Map<string, Running>();

  constructor(
    private readonly store: Store,
    private readonly files: ImageFiles,
    private readonly catalog: ImageCatalog,
    private readonly options: ImporterOptions,
    private readonly logger: Logger,
  ) {}

  /** Starts importing into the image row `name` (state 'importing'); returns at once. `prepare` replaces the options' for this import. */
  start(name: string, url: URL, checksum: Checksum, prepare?: Preparer): void {
    const controller = new AbortController();
    const entry: Running = { controller, done: Promise.resolve() };
    entry.done = this.run(name, url, checksum, controller.signal, prepare ?? this.options.prepare).finally(() => {
      if (this.running.get(name) === entry) this.running.delete(name);
    });
    this.running.set(name, entry);
  }

  isRunning(name: string): boolean {
    return this.running.has(name);
  }

  /** Stops an import because its image is being deleted; resolves when it has let go of everything. */
  async cancel(name: string): Promise<void> {
    const entry = this.running.get(name);
    if (!entry) return;
    entry.controller.abort(DELETED);
    await entry.done;
  }

  /** Aborts every import; each row is marked failed with {@link IMPORT_STOPPED}. */
  async stop(): Promise<void> {
    const entries = [...this.running.values()];
    for (const entry of entries) entry.controller.abort(STOPPED);
    await Promise.all(entries.map((entry) => entry.done));
  }

  private async run(name: string, url: URL, checksum: Checksum, signal: AbortSignal, prepare: Preparer | undefined): Promise<void> {
    const log = this.logger.child({ image: name, url: redactUrl(url) });
    const startedAt = Date.now();
    let lastAttempt = 0;
    try {
      const content = await pRetry(
        (attempt) => {
          lastAttempt = attempt;
          return downloadToBlob(this.files, url, checksum, { ...this.options, prepare }, signal);
        },
        {
          retries: this.options.attempts - 1,
          factor: 2,
          minTimeout: this.options.minBackoffMs ?? 1000,
          maxTimeout: this.options.maxBackoffMs ?? 60_000,
          randomize: true,
          signal,
          shouldRetry: ({ error }) => error instanceof AttemptFailed && error.retryable,
          onFailedAttempt: ({ error, attemptNumber, retriesLeft }) => {
            if (signal.aborted) return;
            const retrying = error instanceof AttemptFailed && error.retryable && retriesLeft > 0;
            log.warn(
              { attempt: attemptNumber, reason: error.message, retrying },
              retrying ? 'import attempt failed; retrying' : 'import failed',
            );
          },
        },
      );
      let image: ImageRecord;
      try {
        image = await this.catalog.commit(name, content);
      } finally {
        content.release();
      }
      const seconds = (Date.now() - startedAt) / 1000;
      log.info({ sha256: image.sha256, sizeBytes: image.sizeBytes, attempts: lastAttempt, seconds }, 'image imported');
      // Every controller on the database copies the content now (controller/images/replicator.ts).
      await this.store.notify('image_ready', name).catch((err: unknown) => {
        log.warn({ err }, 'could not tell the other controllers that the image is ready; they find it at their next sync');
      });
    } catch (error) {
      if (signal.reason === DELETED) return; // the delete removes the row
      let message: string;
      if (signal.reason === STOPPED) message = IMPORT_STOPPED;
      else if (error instanceof AttemptFailed && error.retryable) message = `gave up after ${lastAttempt} attempts: ${error.message}`;
      else if (error instanceof AttemptFailed || error instanceof MetalcastError) message = error.message;
      else {
        log.error({ err: error }, 'unexpected error during import');
        message = `internal error during import: ${(error as Error).message}`;
      }
      await this.store.updateImage(name, { state: 'failed', error: message }).catch((err: unknown) => {
        log.error({ err }, 'could not mark the import failed');
      });
    }
  }
}

export interface DownloadOptions {
  /** An attempt that receives nothing for this long is abandoned (retryable). */
  stallTimeoutMs: number;
  maxBytes: number;
  /** The content must be exactly this long (the replicator knows it); otherwise Content-Length, when given, is checked. */
  expectedSize?: number;
  /** Turns the verified download into the stored content (imports: format detection and conversion). */
  prepare?: Preparer;
  /** Builds the chunk manifest while the download is hashed (ReceiveOptions.manifestChunkSize). */
  manifestChunkSize?: number;
}

/**
 * One download of an http(s) URL into the image store: streamed through
 * ImageFiles.receive(), never buffered, verified against `checksum` before
 * it becomes a blob. Throws {@link AttemptFailed}: retryable for 5xx
 * answers, connection errors and stalls, not for 4xx answers or content
 * that does not match. The returned content is held; release it.
 */
export async function downloadToBlob(
  files: ImageFiles,
  url: URL,
  checksum: Checksum,
  options: DownloadOptions,
  outer: AbortSignal,
): Promise<ReceivedContent> {
  const { stallTimeoutMs, maxBytes } = options;
  const shown = redactUrl(url);
  const controller = new AbortController();
  const stalled = new AttemptFailed(`nothing received from ${shown} for ${ms(stallTimeoutMs, { long: true })}`, true);
  const onOuterAbort = () => controller.abort(outer.reason);
  outer.addEventListener('abort', onOuterAbort, { once: true });
  // Reset on every chunk: a deadline would cap the whole download, but what we want to catch is silence.
  const timer = setTimeout(() => controller.abort(stalled), stallTimeoutMs);
  try {
    const { href, headers } = requestOf(url);
    const response = await fetch(href, { signal: controller.signal, headers, redirect: 'follow' });
    timer.refresh();
    if (!response.ok) {
      await response.body?.cancel().catch(() => {});
      const status = `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ''}`;
      if (response.status >= 400 && response.status < 500) {
        throw new AttemptFailed(`${shown} answered ${status}; check the URL and that the server lets this controller fetch it`, false);
      }
      throw new AttemptFailed(`${shown} answered ${status}`, true);
    }
    // With a Content-Encoding, fetch decodes and the length is the encoded one.
    const length = response.headers.has('content-encoding') ? undefined : Number(response.headers.get('content-length') ?? Number.NaN);
    const announced = length !== undefined && Number.isSafeInteger(length) && length > 0 ? length : undefined;
    if (announced !== undefined && options.expectedSize !== undefined && announced !== options.expectedSize) {
      await response.body?.cancel().catch(() => {});
      throw new AttemptFailed(`${shown} is ${announced} bytes now, but the image is ${options.expectedSize}; the file has changed`, false);
    }
    const expectedSize = options.expectedSize ?? announced;
    if (expectedSize !== undefined && expectedSize > maxBytes) {
      await response.body?.cancel().catch(() => {});
      throw new AttemptFailed(
        `${shown} is ${expectedSize} bytes, more than this controller accepts (--max-image-size, ${maxBytes} bytes)`,
        false,
      );
    }
    const body = response.body;
    if (!body) throw new AttemptFailed(`${shown} answered without a body`, true);
    async function* chunks(): AsyncGenerator<Uint8Array> {
      for await (const chunk of body as AsyncIterable<Uint8Array>) {
        timer.refresh();
        yield chunk;
      }
      clearTimeout(timer); // hashing is done; flushing to disk may take a while and is not a stall
    }
    return await files.receive(chunks(), {
      expectedSha256: checksum.algorithm === 'sha256' ? checksum.hex : undefined,
      extraDigest: checksum.algorithm === 'sha512' ? { algorithm: 'sha512', hex: checksum.hex } : undefined,
      expectedSize,
      maxBytes,
      signal: controller.signal,
      prepare: options.prepare?.(controller.signal),
      manifestChunkSize: options.manifestChunkSize,
    });
  } catch (error) {
    if (error instanceof AttemptFailed) throw error;
    if (outer.aborted) throw new AttemptFailed('aborted', false);
    if (controller.signal.reason === stalled) throw stalled;
    // Checksum, size or limit: the content itself is wrong, and fetching it again gives the same.
    if (error instanceof MetalcastError) throw new AttemptFailed(`${shown}: ${error.message}`, false);
    throw new AttemptFailed(`cannot download ${shown}: ${describeNetworkError(error)}`, true);
  } finally {
    clearTimeout(timer);
    outer.removeEventListener('abort', onOuterAbort);
  }
}

/** fetch refuses URLs with credentials in them; they become a Basic authorization header. */
function requestOf(url: URL): { href: string; headers: Record<string, string> } {
  // The checksum is of the file as served: ask servers not to compress it on the fly.
  const headers: Record<string, string> = { 'accept-encoding': 'identity' };
  if (url.username === '' && url.password === '') return { href: url.href, headers };
  const bare = new URL(url.href);
  bare.username = '';
  bare.password = '';
  const credentials = `${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`;
  headers.authorization = `Basic ${Buffer.from(credentials).toString('base64')}`;
  return { href: bare.href, headers };
}

/** undici says "fetch failed" or "terminated" and puts the reason in `cause`. */
function describeNetworkError(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause instanceof Error ? error.cause : undefined;
  const code = cause && 'code' in cause && typeof cause.code === 'string' && !cause.message.includes(cause.code) ? ` (${cause.code})` : '';
  return cause ? `${error.message}: ${cause.message}${code}` : error.message;
}
