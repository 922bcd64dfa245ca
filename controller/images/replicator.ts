import { randomInt } from 'node:crypto';
import ms from 'ms';
import { type Channel, createChannel, createClient } from 'nice-grpc';
import { describeError } from '../../common/errors.js';
import { clientChannelOptions, type KeepaliveOptions } from '../../common/grpc-options.js';
import type { Logger } from '../../common/logging.js';
import type { ClientTls } from '../../common/tls.js';
import { ImageServiceDefinition } from '../../gen/metalcast/v1/image.js';
import { clusterCredential, loadClusterSecret, operatorMetadata } from '../auth/operator-auth.js';
import type { ControllerRecord, ImageRecord, Store } from '../store/store.js';
import type { ImageFiles } from './image-files.js';
import { downloadToBlob } from './importer.js';
import { redactUrl } from './validation.js';

export interface ReplicatorOptions {
  /** This controller's id in the store's controller list: it is not its own peer. */
  controllerId: string;
  /** Keepalive of the channels to other controllers. */
  keepalive: KeepaliveOptions;
  /** TLS to another controller's address (controller/tls/transport.ts); plaintext when absent or undefined. */
  peerClient?: (address: string) => ClientTls | undefined;
  /** Largest image accepted (--max-image-size). */
  maxBytes: number;
  /** How often to look for missing and orphaned content; 'image_ready' notifications make it sooner (default 30 s). */
  intervalMs?: number;
  /** Images fetched at the same time (default 2). */
  concurrency?: number;
  /** A stream that delivers nothing for this long is abandoned, and resumed from another controller or later (default 30 s). */
  stallTimeoutMs?: number;
  /** Longest one attempt to fetch one image may take, resumes included (default 1 h). */
  attemptTimeoutMs?: number;
  /** Delay after a failed attempt: doubles per failure from this, times a random 0.5–1.5 (default 2 s). */
  minBackoffMs?: number;
  /** Longest delay between attempts for one image (default 5 min). */
  maxBackoffMs?: number;
}

type ImageClient = ReturnType<typeof createClient<typeof ImageServiceDefinition>>;

interface Fetch {
  abort: AbortController;
  done: Promise<void>;
}

interface Failure {
  count: number;
  notBefore: number;
}

/**
 * Makes the content of every ready image present in this controller's
 * image store. Image rows are shared by every controller on the database,
 * content is per controller; an agent reads from whichever controller it
 * is connected to. At start, on each 'image_ready' notification, when a
 * reader asks for missing content, and every interval, it looks at the
 * ready images and fetches each missing sha256: from the image's URL when
 * it has one (verified against the row's sha256), otherwise, or when that
 * fails, from another controller's DownloadImage, resuming a broken stream
 * from the bytes already received (from the same controller or the next).
 * Content is verified by ImageFiles.receive() before it becomes a blob.
 *
 * It also removes blobs that no image row references any more (an image
 * deleted on another controller), when two looks in a row agree and no one
 * reads or writes them.
 */
export class ImageReplicator {
  private readonly intervalMs: number;
  private readonly concurrency: number;
  private readonly stallTimeoutMs: number;
  private readonly attemptTimeoutMs: number;
  private readonly minBackoffMs: number;
  private readonly maxBackoffMs: number;

  /** Fetches in progress, by sha256: one per content at a time. */
  private readonly fetches = new Map<string, Fetch>();
  private readonly failures = new Map<string, Failure>();
  private readonly waiting: (() => void)[] = [];
  private running = 0;
  /** Peers' channels, by address; closed when a peer leaves the list. */
  private readonly channels = new Map<string, { channel: Channel; client: ImageClient }>();
  /** What this controller presents to the others' DownloadImage: the cluster credential (controller/auth/operator-auth.ts). */
  private peerMetadata: ReturnType<typeof operatorMetadata> | undefined;
  /** Blobs no row referenced at the last look, to be removed if the next look agrees. */
  private orphans = new Set<string>();
  /** Missing content that no one can provide, already logged (not repeated every look). */
  private readonly lost = new Set<string>();

  private syncing: Promise<void> | undefined;
  private again = false;
  private stopped = false;
  private interval: NodeJS.Timeout | undefined;
  private readonly timers = new Set<NodeJS.Timeout>();
  private stopListening: (() => void) | undefined;

  constructor(
    private readonly store: Store,
    private readonly files: ImageFiles,
    private readonly options: ReplicatorOptions,
    private readonly logger: Logger,
  ) {
    this.intervalMs = options.intervalMs ?? 30_000;
    this.concurrency = options.concurrency ?? 2;
    this.stallTimeoutMs = options.stallTimeoutMs ?? 30_000;
    this.attemptTimeoutMs = options.attemptTimeoutMs ?? 3_600_000;
    this.minBackoffMs = options.minBackoffMs ?? 2000;
    this.maxBackoffMs = options.maxBackoffMs ?? 300_000;
  }

  start(): void {
    this.stopListening = this.store.listen('image_ready', (name) => {
      this.logger.debug({ image: name }, 'an image became ready; looking for content to fetch');
      this.syncSoon();
    });
    this.files.setMissingHandler((sha256) => this.canProvide(sha256));
    // Unref'd: a timer must not keep a controller that failed to start alive.
    this.interval = setInterval(() => this.syncSoon(), this.intervalMs).unref();
    this.syncSoon();
  }

  /** Stops looking, aborts fetches (their partial files are removed) and closes the peer channels. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.stopListening?.();
    this.files.setMissingHandler(undefined);
    clearInterval(this.interval);
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    for (const fetch of this.fetches.values()) fetch.abort.abort(new Error('the controller is stopping'));
    for (const wake of this.waiting.splice(0)) wake();
    await Promise.all([this.syncing, ...[...this.fetches.values()].map((fetch) => fetch.done)]);
    for (const { channel } of this.channels.values()) channel.close();
    this.channels.clear();
  }

  /** Looks again as soon as the current look (if any) is done; looks asked for meanwhile coalesce. */
  syncSoon(): void {
    if (this.stopped) return;
    if (this.syncing) {
      this.again = true;
      return;
    }
    this.syncing = (async () => {
      do {
        this.again = false;
        try {
          await this.sync();
        } catch (error) {
          this.logger.warn({ err: error }, 'image sync failed; trying again at the next interval');
        }
      } while (this.again && !this.stopped);
    })().finally(() => {
      this.syncing = undefined;
    });
  }

  /**
   * A reader wants content that is not here: look now, and say whether it
   * is worth its retrying (content being fetched, other controllers about,
   * or a URL to fetch it from). Asks the database rather than trusting the
   * last look: a controller that joined since must not make an agent give
   * up on a deploy. When the database does not answer, retrying is worth it.
   */
  private async canProvide(sha256: string): Promise<boolean> {
    this.syncSoon();
    if (this.fetches.has(sha256)) return true;
    try {
      const [controllers, images] = await Promise.all([this.store.listControllers(), this.store.listImages()]);
      if (controllers.some((controller) => controller.id !== this.options.controllerId)) return true;
      return images.some((image) => image.state === 'ready' && image.sha256 === sha256 && sourceUrlOf(image) !== undefined);
    } catch (error) {
      this.logger.warn({ err: error, sha256 }, 'cannot tell whether missing image content can be copied here; letting the reader retry');
      return true;
    }
  }

  private async sync(): Promise<void> {
    const onDisk = new Set(await this.files.list());
    const [images, controllers] = await Promise.all([this.store.listImages(), this.store.listControllers()]);
    const peers = controllers.filter((controller) => controller.id !== this.options.controllerId);
    this.closeChannelsNotIn(peers);
    if (peers.length > 0) this.peerMetadata ??= operatorMetadata(clusterCredential(await loadClusterSecret(this.store)));

    const wanted = new Map<string, ImageRecord[]>();
    for (const image of images) {
      if (image.state !== 'ready' || image.sha256 === '') continue;
      wanted.set(image.sha256, [...(wanted.get(image.sha256) ?? []), image]);
    }

    // An image deleted while its content was on its way: stop fetching it.
    for (const [sha256, fetch] of this.fetches) {
      if (!wanted.has(sha256)) fetch.abort.abort(new Error('no ready image uses this content any more'));
    }
    for (const sha256 of this.failures.keys()) if (!wanted.has(sha256)) this.failures.delete(sha256);

    const now = Date.now();
    for (const [sha256, rows] of wanted) {
      if (onDisk.has(sha256) || this.fetches.has(sha256)) {
        this.lost.delete(sha256);
        continue;
      }
      if ((this.failures.get(sha256)?.notBefore ?? 0) > now) continue;
      if (peers.length === 0 && !rows.some((row) => sourceUrlOf(row))) {
        if (!this.lost.has(sha256)) {
          this.lost.add(sha256);
          this.logger.warn(
            { images: rows.map((row) => row.name), sha256 },
            'image content is missing on this controller, and there is no other controller or URL to copy it from; upload it again',
          );
        }
        continue;
      }
      // A fetch may have finished since the folder was listed.
      if (await this.files.has(sha256)) continue;
      this.startFetch(sha256, rows, peers);
    }

    await this.collectGarbage(onDisk, images);
  }

  private startFetch(sha256: string, rows: ImageRecord[], peers: ControllerRecord[]): void {
    const abort = new AbortController();
    const fetch: Fetch = { abort, done: Promise.resolve() };
    fetch.done = this.runFetch(sha256, rows, peers, abort.signal).finally(() => {
      if (this.fetches.get(sha256) === fetch) this.fetches.delete(sha256);
    });
    this.fetches.set(sha256, fetch);
  }

  private async runFetch(sha256: string, rows: ImageRecord[], peers: ControllerRecord[], signal: AbortSignal): Promise<void> {
    const first = rows[0] as ImageRecord;
    const log = this.logger.child({ image: first.name, sha256, sizeBytes: first.sizeBytes });
    await this.acquireSlot(signal);
    try {
      if (signal.aborted) return;
      const startedAt = Date.now();
      log.info('image content is not on this controller; copying it');
      const attempt = AbortSignal.any([signal, AbortSignal.timeout(this.attemptTimeoutMs)]);
      const from = await this.fetchOnce(sha256, rows, peers, attempt, log).catch((error: unknown) => {
        if (attempt.aborted && !signal.aborted) {
          throw new Error(`the attempt took longer than ${ms(this.attemptTimeoutMs, { long: true })}`, { cause: error });
        }
        throw error;
      });
      const seconds = (Date.now() - startedAt) / 1000;
      this.failures.delete(sha256);
      log.info(
        { from, seconds, bytesPerSecond: Math.round(first.sizeBytes / Math.max(seconds, 0.001)) },
        'image content copied to this controller',
      );
    } catch (error) {
      if (signal.aborted) {
        log.info({ reason: describeError(signal.reason) }, 'image copy stopped');
        return;
      }
      const count = (this.failures.get(sha256)?.count ?? 0) + 1;
      const delay = Math.round(Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** (count - 1)) * (0.5 + Math.random()));
      this.failures.set(sha256, { count, notBefore: Date.now() + delay });
      log.warn({ attempt: count, retryInMs: delay, reason: describeError(error) }, 'could not copy the image content; retrying later');
      this.wakeAfter(delay);
    } finally {
      this.releaseSlot();
    }
  }

  /** One attempt: the image's URL first when it has a usable one, then the other controllers. Returns where it came from. */
  private async fetchOnce(
    sha256: string,
    rows: ImageRecord[],
    peers: ControllerRecord[],
    signal: AbortSignal,
    log: Logger,
  ): Promise<string> {
    const size = (rows[0] as ImageRecord).sizeBytes;
    const url = rows.map(sourceUrlOf).find((candidate) => candidate !== undefined);
    if (url) {
      try {
        const content = await downloadToBlob(
          this.files,
          url,
          { algorithm: 'sha256', hex: sha256 },
          { stallTimeoutMs: this.stallTimeoutMs, maxBytes: this.options.maxBytes, expectedSize: size },
          signal,
        );
        content.release();
        return redactUrl(url);
      } catch (error) {
        if (signal.aborted) throw error;
        if (peers.length === 0) throw error;
        log.warn(
          { url: redactUrl(url), reason: describeError(error) },
          'could not copy the image from its URL; trying the other controllers',
        );
      }
    }
    if (peers.length === 0) throw new Error('no other controller to copy it from');
    const source = { current: '' };
    const content = await this.files.receive(this.fromPeers(shuffled(peers), rows, sha256, size, source, signal, log), {
      expectedSha256: sha256,
      expectedSize: size,
      maxBytes: this.options.maxBytes,
      signal,
    });
    content.release();
    return source.current;
  }

  /**
   * The image's bytes in order, from the other controllers: a stream that
   * breaks after delivering something is resumed from there on the same
   * controller; one that delivers nothing moves on to the next. Gives up
   * when every controller in a row delivered nothing.
   */
  private async *fromPeers(
    peers: ControllerRecord[],
    rows: ImageRecord[],
    sha256: string,
    size: number,
    source: { current: string },
    signal: AbortSignal,
    log: Logger,
  ): AsyncGenerator<Uint8Array> {
    let offset = 0;
    let index = 0;
    const failures: string[] = [];
    while (offset < size) {
      const peer = peers[index % peers.length] as ControllerRecord;
      // Any name of this content will do; spread the names over the peers in case one was just deleted.
      const name = (rows[index % rows.length] as ImageRecord).name;
      source.current = `controller ${peer.id} (${peer.address})`;
      const before = offset;
      try {
        for await (const data of this.streamFrom(peer, name, sha256, size, offset, signal)) {
          offset += data.byteLength;
          yield data;
        }
        if (offset < size) throw new Error(`the stream ended at ${offset} of ${size} bytes`);
      } catch (error) {
        signal.throwIfAborted();
        const reason = describeError(error);
        if (offset > before) {
          failures.length = 0;
          log.info({ from: source.current, offset, reason }, 'image copy interrupted; resuming from the bytes received');
          continue;
        }
        failures.push(`${source.current}: ${reason}`);
        if (failures.length >= peers.length) throw new Error(`no other controller could send it: ${failures.join('; ')}`);
        index++;
      }
    }
  }

  /** One DownloadImage call from `offset`; checks the header and the order of the chunks. */
  private async *streamFrom(
    peer: ControllerRecord,
    name: string,
    sha256: string,
    size: number,
    offset: number,
    outer: AbortSignal,
  ): AsyncGenerator<Uint8Array> {
    const call = new AbortController();
    const stalled = new Error(`nothing received for ${ms(this.stallTimeoutMs, { long: true })}`);
    const onAbort = () => call.abort(outer.reason);
    outer.addEventListener('abort', onAbort, { once: true });
    // Reset on every message: a deadline would cap the whole copy, but silence is what we want to catch
    // (it also bounds connecting, which grpc-js does not).
    const timer = setTimeout(() => call.abort(stalled), this.stallTimeoutMs);
    let at = offset;
    let header = false;
    try {
      for await (const message of this.clientOf(peer).downloadImage({ name, offset }, { signal: call.signal })) {
        timer.refresh();
        const part = message.part;
        if (part?.$case === 'header') {
          const got = part.value;
          if (got.sha256 !== sha256 || got.sizeBytes !== size) {
            throw new Error(`its image '${name}' is ${got.sizeBytes} bytes with sha256 ${got.sha256}, not this content`);
          }
          if (got.offset !== offset) throw new Error(`it started at ${got.offset} where ${offset} was asked`);
          header = true;
          continue;
        }
        if (!header || part?.$case !== 'chunk') throw new Error('it sent data without a header first');
        const { offset: chunkOffset, data } = part.value;
        if (chunkOffset !== at || data.byteLength === 0 || at + data.byteLength > size) {
          throw new Error(`it sent ${data.byteLength} bytes at ${chunkOffset} where ${at} was expected`);
        }
        at += data.byteLength;
        yield data;
        timer.refresh(); // writing here is not the peer's silence
      }
    } catch (error) {
      if (call.signal.reason === stalled) throw stalled;
      throw error;
    } finally {
      clearTimeout(timer);
      outer.removeEventListener('abort', onAbort);
    }
  }

  /**
   * Removes blobs that no image row references any more, unless something
   * holds them (a reader, a receive whose row is not committed yet). A blob
   * is removed only when two looks in a row found it unreferenced: the
   * second look's rows are read after the first look checked the holds, so
   * a row committed in between (an upload of this content here) is seen.
   */
  private async collectGarbage(onDisk: Set<string>, images: ImageRecord[]): Promise<void> {
    // A controller pointed at a wrong, empty database must not wipe its content.
    if (images.length === 0) {
      this.orphans.clear();
      return;
    }
    const referenced = new Set(images.map((image) => image.sha256));
    const orphans = new Set<string>();
    let removed = 0;
    for (const sha256 of onDisk) {
      if (referenced.has(sha256) || this.files.isHeld(sha256)) continue;
      if (!this.orphans.has(sha256)) {
        orphans.add(sha256);
        continue;
      }
      // Held since the first look: left for a later pair of looks.
      if (await this.files.removeIfIdle(sha256)) {
        removed++;
        this.logger.info({ sha256 }, 'removed image content that no image uses any more (deleted on another controller)');
      }
    }
    this.orphans = orphans;
    // Confirm soon rather than an interval later: the second look only has to come after the first.
    if (orphans.size > 0) this.wakeAfter(Math.min(this.intervalMs, 1000));
    if (removed > 0) this.logger.debug({ removed, left: orphans.size }, 'image garbage collection done');
  }

  private wakeAfter(delayMs: number): void {
    if (this.stopped) return;
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      this.syncSoon();
    }, delayMs).unref();
    this.timers.add(timer);
  }

  private clientOf(peer: ControllerRecord): ImageClient {
    let entry = this.channels.get(peer.address);
    if (!entry) {
      const tls = this.options.peerClient?.(peer.address);
      const channel = createChannel(peer.address, tls?.credentials, {
        ...clientChannelOptions(this.options.keepalive),
        ...tls?.channelOptions,
      });
      entry = { channel, client: createClient(ImageServiceDefinition, channel, { '*': { metadata: this.peerMetadata } }) };
      this.channels.set(peer.address, entry);
    }
    return entry.client;
  }

  private closeChannelsNotIn(peers: ControllerRecord[]): void {
    const addresses = new Set(peers.map((peer) => peer.address));
    for (const [address, { channel }] of this.channels) {
      if (addresses.has(address)) continue;
      channel.close();
      this.channels.delete(address);
    }
  }

  private async acquireSlot(signal: AbortSignal): Promise<void> {
    while (this.running >= this.concurrency && !signal.aborted && !this.stopped) {
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    }
    this.running++;
  }

  private releaseSlot(): void {
    this.running--;
    this.waiting.shift()?.();
  }
}

/**
 * The URL an image was imported from, when it can be fetched again: the
 * database keeps URLs without their password (redactUrl), so one that had
 * credentials can only be copied from another controller.
 */
function sourceUrlOf(image: ImageRecord): URL | undefined {
  if (image.sourceUrl === '') return undefined;
  try {
    const url = new URL(image.sourceUrl);
    return url.username === '' && url.password === '' ? url : undefined;
  } catch {
    return undefined;
  }
}

/** Peers in random order, so that many controllers copying at once do not all ask the same one. */
function shuffled<T>(items: readonly T[]): T[] {
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = randomInt(i + 1);
    [copy[i], copy[j]] = [copy[j] as T, copy[i] as T];
  }
  return copy;
}

/**
 * Tells every controller on the database that an image is ready, so that
 * they copy its content; best effort (they find it at their next look
 * anyway), so it never throws.
 */
export async function announceImageReady(store: Store, name: string, logger: Logger): Promise<void> {
  try {
    await store.notify('image_ready', name);
  } catch (error) {
    logger.warn(
      { err: error, image: name },
      'could not tell the other controllers that the image is ready; they find it at their next look',
    );
  }
}
