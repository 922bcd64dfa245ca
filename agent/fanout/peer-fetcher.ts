import { createHash, X509Certificate } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Channel, ClientError, createChannel, createClient, Metadata, Status } from 'nice-grpc';
import { chunkCount, chunkDigest, chunkRange } from '../../common/chunk-manifest.js';
import { describeError } from '../../common/errors.js';
import { clientChannelOptions, type KeepaliveOptions } from '../../common/grpc-options.js';
import { pinnedTlsClient } from '../../common/tls.js';
import {
  type ChunkAssignment,
  type ChunkPeer,
  type ExchangeChunksRequest,
  type ExchangeChunksResponse,
  type PeerFailure,
  PeerFailureKind,
  PeerChunkServiceDefinition,
} from '../../gen/metalcast/v1/fanout.js';
import { writeFully } from '../../common/disk-writes/positional-writes.js';
import { isDiskError } from '../imaging/disk-io.js';
import type { ChunkShare } from './chunk-share.js';
import type { FanoutHook } from './fanout-hook.js';
import type { TokenBucket } from './token-bucket.js';

export interface FanoutOptions {
  share: ChunkShare;
  /** This agent runs without TLS (--insecure): peers without a pinned certificate are dialled in plaintext. */
  insecure: boolean;
  keepalive: KeepaliveOptions;
  /** How long the agent serves its wave after its own write ended, unless its next command comes first. */
  lingerMs: number;
  /** Chunks fetched at once. */
  parallel: number;
  /** A cap on what the agent receives, modelling its NIC (bench) or sparing a shared uplink; undefined for none. */
  downloadBucket?: TokenBucket;
}

const PEER_STALL_CAP_MS = 10_000;
/**
 * An agent whose fetch slots are all busy still exchanges this often (asking
 * for nothing): the tracker takes an agent silent for longer than a few of
 * these as dead and hands out again what it was reading from the controller.
 */
const EXCHANGE_AT_LEAST_EVERY_MS = 2_000;

class PeerFetchError extends Error {
  constructor(
    readonly kind: PeerFailureKind,
    message: string,
  ) {
    super(message);
  }
}

function setBit(bitmap: Uint8Array, index: number): void {
  bitmap[index >> 3] = (bitmap[index >> 3] ?? 0) | (1 << (index & 7));
}

/**
 * Fan-out (docs/fanout.md), the fetching side: exchange with the
 * controller (what this agent holds, what it fetches now), fetch the chunks
 * it assigns from the peers it names — pinning each peer's certificate and
 * presenting the wave's credential — or from the controller; verify every
 * chunk against the manifest before it is written or counted. A peer that
 * sends a wrong chunk or stalls is dropped for the wave (locally at once,
 * and reported), and the chunk is fetched from the next peer or the
 * controller. Whatever this phase leaves undone, the plain transfer after
 * it fetches from the controller.
 */
export function createFanoutHook(options: FanoutOptions): FanoutHook {
  const { share } = options;
  return {
    writeEnded(ok) {
      if (ok) share.writeFinished(options.lingerMs);
      else share.end('write_image failed');
    },
    async fetch(context) {
      const { manifest, done, signal, logger, source } = context;
      const exchange = source.exchange;
      if (!exchange) return;
      const count = chunkCount(manifest.sizeBytes, manifest.chunkSize);
      const bytes = Math.ceil(count / 8);
      share.begin(context.image, context.devicePath, manifest);
      for (let index = 0; index < count; index++) if (done[index]) share.markServable(index);

      const channels = new Map<string, { channel: Channel; client: ReturnType<typeof createClient<typeof PeerChunkServiceDefinition>> }>();
      /** Peers this agent no longer asks, and why: reported again when the tracker still names them (it may have restarted). */
      const dropped = new Map<string, PeerFailureKind>();
      const failures: PeerFailure[] = [];
      const fetching = new Map<number, Promise<void>>();
      let fromPeers = 0;
      let fromController = 0;
      let controllerFailures = 0;
      let exchangeFailures = 0;
      let credential = '';
      let lastExchangeAt = 0;
      const peerStallMs = Math.min(PEER_STALL_CAP_MS, context.stallTimeoutMs);
      const remaining = () => done.reduce((n, d) => n + (d ? 0 : 1), 0);

      const clientFor = (peer: ChunkPeer) => {
        const key = `${peer.address} ${peer.certificatePem}`;
        let entry = channels.get(key);
        if (!entry) {
          const tls = peer.certificatePem === '' ? undefined : pinnedTlsClient(peer.certificatePem);
          const channel = createChannel(peer.address, tls?.credentials, {
            ...clientChannelOptions(options.keepalive),
            ...tls?.channelOptions,
          });
          entry = { channel, client: createClient(PeerChunkServiceDefinition, channel) };
          channels.set(key, entry);
        }
        return entry.client;
      };

      /** Receives a whole chunk within the stall timer; the caller verifies it. */
      const receive = async (
        length: number,
        stallMs: number,
        open: (callSignal: AbortSignal) => AsyncIterable<Uint8Array>,
      ): Promise<Buffer> => {
        const call = new AbortController();
        const onAbort = () => call.abort(signal.reason);
        signal.addEventListener('abort', onAbort);
        let timer: NodeJS.Timeout | undefined;
        let stalled = false;
        const arm = () => {
          clearTimeout(timer);
          timer = setTimeout(() => {
            stalled = true;
            call.abort();
          }, stallMs);
        };
        const buffer = Buffer.allocUnsafe(length);
        let got = 0;
        try {
          arm();
          for await (const piece of open(call.signal)) {
            arm();
            if (got + piece.length > length)
              throw new PeerFetchError(PeerFailureKind.PEER_FAILURE_KIND_CORRUPT, `more than ${length} bytes sent`);
            buffer.set(piece, got);
            got += piece.length;
            await options.downloadBucket?.take(piece.length, call.signal);
          }
          if (got !== length) throw new Error(`the stream ended at ${got} of ${length} bytes`);
          return buffer;
        } catch (error) {
          if (stalled) throw new PeerFetchError(PeerFailureKind.PEER_FAILURE_KIND_STALLED, `no data for ${stallMs / 1000}s`);
          throw error;
        } finally {
          clearTimeout(timer);
          signal.removeEventListener('abort', onAbort);
        }
      };

      const land = async (index: number, data: Buffer, from: 'peer' | 'controller') => {
        const { offset } = chunkRange(manifest, index);
        await writeFully(context.device, data, offset);
        done[index] = 1;
        share.markServable(index);
        if (from === 'peer') fromPeers += data.length;
        else fromController += data.length;
        context.onChunk(index, data.length, from);
      };

      const fromPeer = async (peer: ChunkPeer, index: number): Promise<Buffer> => {
        if (peer.certificatePem === '' && !options.insecure) {
          throw new PeerFetchError(PeerFailureKind.PEER_FAILURE_KIND_ERROR, 'the controller has pinned no certificate for this peer');
        }
        if (peer.certificatePem !== '') new X509Certificate(peer.certificatePem); // a malformed PEM is the peer's failure, not ours
        const { length } = chunkRange(manifest, index);
        const client = clientFor(peer);
        const data = await receive(length, peerStallMs, (callSignal) =>
          mapData(
            client.readChunk(
              { image: context.image, chunk: index },
              { metadata: new Metadata({ authorization: `Bearer ${credential}` }), signal: callSignal },
            ),
          ),
        );
        if (!createHash('sha256').update(data).digest().equals(chunkDigest(manifest, index))) {
          throw new PeerFetchError(PeerFailureKind.PEER_FAILURE_KIND_CORRUPT, `chunk ${index} does not hash to the manifest's digest`);
        }
        return data;
      };

      const fromControllerChunk = async (index: number): Promise<Buffer> => {
        const { offset, length } = chunkRange(manifest, index);
        const data = await receive(length, context.stallTimeoutMs, (callSignal) =>
          mapControllerData(source.read(context.image, offset, callSignal, length), offset),
        );
        if (!createHash('sha256').update(data).digest().equals(chunkDigest(manifest, index))) {
          throw new Error(`chunk ${index} from the controller does not hash to the manifest's digest`);
        }
        return data;
      };

      const run = async (assignment: ChunkAssignment) => {
        const index = assignment.chunk;
        for (const peer of assignment.peers) {
          if (signal.aborted) return;
          const droppedAs = dropped.get(peer.nodeUuid);
          if (droppedAs !== undefined) {
            failures.push({ nodeUuid: peer.nodeUuid, chunk: index, kind: droppedAs, reason: 'dropped by this agent earlier in the wave' });
            continue;
          }
          try {
            const data = await fromPeer(peer, index);
            await land(index, data, 'peer');
            return;
          } catch (error) {
            if (signal.aborted) return;
            if (isDiskError(error)) throw error;
            const busy = error instanceof ClientError && error.code === Status.RESOURCE_EXHAUSTED;
            // A peer whose deploy moved on (FAILED_PRECONDITION: it serves no wave now) will not serve again either.
            const gone = error instanceof ClientError && error.code === Status.FAILED_PRECONDITION;
            const kind =
              error instanceof PeerFetchError
                ? error.kind
                : gone
                  ? PeerFailureKind.PEER_FAILURE_KIND_GONE
                  : PeerFailureKind.PEER_FAILURE_KIND_ERROR;
            const reason = describeError(error);
            if (!busy) {
              failures.push({ nodeUuid: peer.nodeUuid, chunk: index, kind, reason: reason.slice(0, 300) });
              if (kind !== PeerFailureKind.PEER_FAILURE_KIND_ERROR) dropped.set(peer.nodeUuid, kind);
            }
            logger.warn(
              { chunk: index, peer: peer.nodeUuid, address: peer.address, kind: PeerFailureKind[kind], reason, busy },
              busy ? 'peer busy; trying the next source' : 'a peer failed to serve a chunk; trying the next source',
            );
          }
        }
        // Every peer named was busy or failed: the chunk goes back to the tracker, which hears of the
        // failures at the next exchange and names other peers, or leases the chunk from the controller.
        // Reading it from the controller here, outside the tracker's leases, would split the
        // controller's link among every agent whose peer failed.
        if (signal.aborted || assignment.peers.length > 0) return;
        // Nobody holds it: the tracker leased it to this agent, and the controller serves it.
        try {
          const data = await fromControllerChunk(index);
          await land(index, data, 'controller');
          controllerFailures = 0;
        } catch (error) {
          if (signal.aborted) return;
          if (isDiskError(error)) throw error;
          controllerFailures++;
          source.failed(error);
          logger.warn(
            { chunk: index, reason: describeError(error), inARow: controllerFailures },
            'fetching a chunk from the controller failed',
          );
        }
      };

      let fatal: unknown;
      try {
        while (remaining() > 0 && !signal.aborted && fatal === undefined) {
          if (controllerFailures + exchangeFailures >= context.maxAttempts) {
            logger.warn(
              { attempts: controllerFailures + exchangeFailures },
              'the controller failed every call in a row; the plain transfer takes over with its backoff',
            );
            break;
          }
          if (controllerFailures > 0) {
            // A controller that failed a read (restarting, overloaded) is given a moment, as the plain transfer would.
            await sleep(Math.min(5000, 200 * 2 ** (controllerFailures - 1)) * (0.5 + Math.random()), undefined, { signal }).catch(() => {});
          }
          const free = options.parallel - fetching.size;
          let answer: ExchangeChunksResponse | undefined;
          if (free > 0 || Date.now() - lastExchangeAt >= EXCHANGE_AT_LEAST_EVERY_MS) {
            lastExchangeAt = Date.now();
            const held = Buffer.alloc(bytes);
            const busy = Buffer.alloc(bytes);
            for (let index = 0; index < count; index++) if (done[index]) setBit(held, index);
            for (const index of fetching.keys()) setBit(busy, index);
            const request: ExchangeChunksRequest = {
              image: context.image,
              heldChunks: held,
              fetchingChunks: busy,
              maxAssignments: Math.max(0, free),
              failures: failures.splice(0, failures.length),
              bytesFromPeers: fromPeers,
              bytesFromController: fromController,
            };
            try {
              answer = await exchange(request, signal);
              exchangeFailures = 0;
            } catch (error) {
              if (signal.aborted) break;
              failures.unshift(...request.failures);
              if (error instanceof ClientError && error.code === Status.UNIMPLEMENTED) {
                logger.info('the controller has no fan-out (ExchangeChunks unimplemented); reading every chunk from it');
                share.end('the controller has no fan-out');
                return;
              }
              exchangeFailures++;
              source.failed(error);
              logger.warn({ reason: describeError(error), inARow: exchangeFailures }, 'ExchangeChunks failed');
              await sleep(Math.min(5000, 200 * 2 ** (exchangeFailures - 1)) * (0.5 + Math.random()), undefined, { signal }).catch(() => {});
              continue;
            }
            if (!answer.enabled) {
              logger.info('fan-out is off for this deploy; reading every chunk from the controller');
              share.end('fan-out is off for this deploy');
              return;
            }
            credential = answer.waveCredential;
            share.setPolicy(answer.waveCredential, answer.maxUploads, answer.maxUploadBytesPerSecond);
            for (const assignment of answer.assignments) {
              const index = assignment.chunk;
              if (index >= count || done[index] || fetching.has(index)) continue;
              const task = run(assignment)
                .catch((error: unknown) => {
                  fatal ??= error;
                })
                .finally(() => fetching.delete(index));
              fetching.set(index, task);
            }
          }
          if (fetching.size === 0) {
            await sleep(Math.max(20, answer?.retryAfterMs ?? 100), undefined, { signal }).catch(() => {});
          } else if (free <= 0 || (answer && answer.assignments.length === 0)) {
            // Wait for a fetch to end (a slot frees up, and what this agent holds changed), or retry shortly.
            await Promise.race([...fetching.values(), sleep(Math.max(20, answer?.retryAfterMs ?? 250))]);
          }
        }
        await Promise.allSettled(fetching.values());
        if (fatal !== undefined) throw fatal;
        // One last exchange tells the tracker everything this agent now holds, and the failures not yet reported.
        if (remaining() === 0) {
          const held = Buffer.alloc(bytes, 0xff);
          await exchange(
            {
              image: context.image,
              heldChunks: held,
              fetchingChunks: Buffer.alloc(bytes),
              maxAssignments: 0,
              failures: failures.splice(0, failures.length),
              bytesFromPeers: fromPeers,
              bytesFromController: fromController,
            },
            signal,
          ).catch(() => {});
        }
        logger.info({ fromPeers, fromController, droppedPeers: [...dropped.keys()] }, 'fan-out phase ended');
      } finally {
        await Promise.allSettled(fetching.values());
        for (const { channel } of channels.values()) channel.close();
      }
    },
  };
}

async function* mapData(stream: AsyncIterable<{ data: Uint8Array }>): AsyncIterable<Uint8Array> {
  for await (const message of stream) yield message.data;
}

async function* mapControllerData(
  stream: AsyncIterable<{ offset: number; data: Uint8Array; zero: boolean; length: number }>,
  start: number,
): AsyncIterable<Uint8Array> {
  let offset = start;
  for await (const message of stream) {
    if (message.offset !== offset) throw new Error(`the controller sent bytes at ${message.offset} where ${offset} was expected`);
    const data = message.zero ? new Uint8Array(message.length) : message.data;
    offset += data.length;
    yield data;
  }
}
