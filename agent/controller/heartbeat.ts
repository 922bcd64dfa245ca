import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import { agentMetadata } from '../../common/agent-metadata.js';
import { AsyncQueue } from '../../common/async-queue.js';
import { retryAfterMs } from '../../common/retry-after.js';
import type { Logger } from '../../common/logging.js';
import type { HeartbeatRequest } from '../../gen/metalcast/v1/agent_gateway.js';
import { type ControllerLink, isConnectionError } from './controller-link.js';

export interface HeartbeatOptions {
  /** Base delay before reopening a failed stream; multiplied by U(1, 2). */
  reconnectDelayMs: number;
  /** A forced heartbeat never follows the previous one sooner than this. */
  minGapMs: number;
  /** An ack later than the asked interval plus this means the stream is stuck. */
  ackTimeoutMs: number;
  /** Spread reconnects randomly (default). Off only to measure what jitter buys (bench herd). */
  jitter?: boolean;
  /** PEM of the certificate the agent's API serves TLS with: sent on the first heartbeat of every stream, for the controller to pin. */
  certificatePem?: string;
}

export interface HeartbeatIdentity {
  nodeUuid: string;
  token: string;
}

/** The heartbeat without sequence number and certificate: what the agent reports about itself. */
export type HeartbeatBody = Omit<HeartbeatRequest, 'sequence' | 'agentCertificatePem'>;

/**
 * Keeps one heartbeat stream open to the controller: the first heartbeat at
 * once, then at the interval each ack asks for. A broken stream is reopened
 * after 5 s × U(1, 2), so that a fleet that lost its controller together does
 * not come back together. When the controller says the token is no longer
 * valid, the agent looks itself up again before reconnecting.
 */
export class HeartbeatLoop {
  private readonly stopped = new AbortController();
  private running: Promise<void> | undefined;
  private streamControl: { force: () => void } | undefined;
  /** `retry-after-ms` from the trailer of the stream that just ended, bounded; undefined when none. */
  private retryAfter: number | undefined;
  /** Counts streams opened, for tests and logs. */
  streamsOpened = 0;

  constructor(
    private readonly link: ControllerLink,
    private readonly identity: () => HeartbeatIdentity,
    private readonly body: () => HeartbeatBody,
    private readonly relookup: () => Promise<void>,
    private readonly options: HeartbeatOptions,
    private readonly logger: Logger,
  ) {}

  /** Starts the loop; the promise settles when it stops, or rejects when a re-lookup fails for good. */
  start(): Promise<void> {
    this.running ??= this.loop();
    return this.running;
  }

  /** Sends a heartbeat soon (a command finished), respecting the minimum gap. */
  forceSoon(): void {
    this.streamControl?.force();
  }

  async stop(): Promise<void> {
    this.stopped.abort();
    await this.running?.catch(() => {});
  }

  private async loop(): Promise<void> {
    const signal = this.stopped.signal;
    while (!signal.aborted) {
      let relookup = false;
      this.retryAfter = undefined;
      try {
        await this.runStream();
        this.logger.info('controller ended the heartbeat stream; reconnecting');
      } catch (error) {
        if (signal.aborted) break;
        if (error instanceof ClientError && (error.code === Status.UNAUTHENTICATED || error.code === Status.NOT_FOUND)) {
          this.logger.warn({ reason: error.details }, 'controller no longer accepts this agent token; looking up again');
          relookup = true;
        } else {
          if (isConnectionError(error)) {
            void this.link.explainConnectionFailure(error);
            this.link.next('heartbeat stream failed');
          }
          this.logger.warn({ err: error, controller: this.link.address }, 'heartbeat stream failed; reconnecting after a jittered delay');
        }
      }
      if (signal.aborted) break;
      if (relookup) {
        try {
          await this.relookup();
          continue;
        } catch (error) {
          if (signal.aborted) break;
          throw error;
        }
      }
      const jittered = this.options.reconnectDelayMs * (this.options.jitter === false ? 1 : 1 + Math.random());
      // A controller shedding load says how long to stay away (bounded by common/retry-after.ts); never sooner than the usual delay.
      const delay = Math.max(jittered, this.retryAfter ?? 0);
      if (this.retryAfter !== undefined) {
        this.logger.info(
          { delayMs: Math.round(delay), retryAfterMs: this.retryAfter },
          'waiting as the controller asked (retry-after-ms) before reconnecting',
        );
      }
      await sleep(delay, undefined, { signal }).catch(() => {});
    }
  }

  /** One stream, from open to its end; resolves on a clean end, throws on failure. */
  private async runStream(): Promise<void> {
    const { nodeUuid, token } = this.identity();
    const requests = new AsyncQueue<HeartbeatRequest>(4);
    const streamAbort = new AbortController();
    const onStop = () => streamAbort.abort();
    this.stopped.signal.addEventListener('abort', onStop);
    let sequence = 0;
    let lastSentAt = 0;
    let nextAt = 0;
    let timer: NodeJS.Timeout | undefined;
    let ackWatchdog: NodeJS.Timeout | undefined;
    let acked = false;

    const send = () => {
      sequence += 1;
      lastSentAt = Date.now();
      // Only the first heartbeat of a stream carries the certificate: the controller pins it, or checks it against the pin.
      requests.push({ sequence, ...this.body(), agentCertificatePem: sequence === 1 ? (this.options.certificatePem ?? '') : '' });
      clearTimeout(ackWatchdog);
      // Keepalive catches a dead link; this catches a controller that is alive but stuck.
      ackWatchdog = setTimeout(() => {
        this.logger.warn({ sequence, controller: this.link.address }, 'no ack for a heartbeat in time; reopening the stream');
        streamAbort.abort();
      }, this.options.ackTimeoutMs);
    };
    const schedule = (inMs: number) => {
      clearTimeout(timer);
      nextAt = Date.now() + inMs;
      timer = setTimeout(send, inMs);
    };
    this.streamControl = {
      force: () => {
        const at = Math.max(Date.now(), lastSentAt + this.options.minGapMs);
        if (nextAt === 0 || at < nextAt) schedule(at - Date.now());
      },
    };

    try {
      const responses = this.link.gateway.heartbeat(requests, {
        metadata: agentMetadata(nodeUuid, token),
        signal: streamAbort.signal,
        onTrailer: (trailer) => {
          this.retryAfter = retryAfterMs(trailer);
        },
      });
      this.streamsOpened += 1;
      send();
      for await (const ack of responses) {
        clearTimeout(ackWatchdog);
        if (!acked) {
          acked = true;
          this.logger.info({ controller: this.link.address, nextIntervalMs: ack.nextIntervalMs }, 'heartbeat stream established');
        }
        if (ack.sequence === sequence) schedule(Math.max(100, ack.nextIntervalMs));
      }
    } catch (error) {
      if (streamAbort.signal.aborted && !this.stopped.signal.aborted) {
        throw new ClientError('/metalcast.v1.AgentGatewayService/Heartbeat', Status.DEADLINE_EXCEEDED, 'heartbeat ack timed out');
      }
      throw error;
    } finally {
      this.streamControl = undefined;
      clearTimeout(timer);
      clearTimeout(ackWatchdog);
      requests.end();
      streamAbort.abort();
      this.stopped.signal.removeEventListener('abort', onStop);
    }
  }
}
