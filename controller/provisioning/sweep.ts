import type { Logger } from '../../common/logging.js';
import type { ControllerMetrics } from '../observability/metrics.js';
import type { HeartbeatRecorder } from '../agents/heartbeat-recorder.js';
import type { HashRange, Store, TimedOutNode } from '../store/store.js';

export interface SweepOptions {
  intervalMs: number;
  heartbeatTimeoutMs: number;
  /** No node is failed before this time: agents reconnecting after a controller restart. */
  graceUntil: number;
  /** This controller's share of the nodes (ring hash ranges); every node when absent. */
  share?: () => readonly HashRange[];
}

/**
 * Periodically fails nodes in a wait state whose agent went silent for
 * longer than the heartbeat timeout. The work is one indexed statement in
 * the store; this class only schedules it, honours the start-up grace and
 * reports what it did.
 */
export class Sweep {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<unknown> = Promise.resolve();
  private graceLogged = false;

  constructor(
    private readonly store: Store,
    private readonly recorder: HeartbeatRecorder,
    private readonly metrics: ControllerMetrics,
    private readonly logger: Logger,
    private readonly options: SweepOptions,
    /** Told about each failed node, for example to end its heartbeat stream. */
    private readonly onTimedOut: (node: TimedOutNode) => void,
  ) {}

  start(): void {
    this.timer = setInterval(() => {
      this.running = this.running.then(() => this.runOnce());
    }, this.options.intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.running;
  }

  /** One sweep; returns the nodes it failed. Never throws. */
  async runOnce(now = Date.now()): Promise<TimedOutNode[]> {
    if (now < this.options.graceUntil) {
      if (!this.graceLogged) {
        this.logger.info(
          { graceUntil: new Date(this.options.graceUntil).toISOString() },
          'sweep waits for agents to reconnect after start-up',
        );
        this.graceLogged = true;
      }
      this.metrics.sweepRuns.inc({ result: 'grace' });
      return [];
    }
    const stop = this.metrics.sweepDuration.startTimer();
    try {
      // Heartbeats still in memory are evidence too: write them first.
      await this.recorder.flush();
      const timedOut = await this.store.sweepTimedOut(
        now,
        now - this.options.heartbeatTimeoutMs,
        this.options.heartbeatTimeoutMs,
        this.options.share?.(),
      );
      for (const node of timedOut) {
        this.metrics.heartbeatTimeouts.inc({ provision_state: node.fromState });
        this.logger.warn(
          { node: node.uuid, nodeName: node.name, from: node.fromState, to: node.toState, reason: node.lastError },
          'agent timed out',
        );
        this.onTimedOut(node);
      }
      this.metrics.sweepRuns.inc({ result: 'ok' });
      return timedOut;
    } catch (error) {
      this.metrics.sweepRuns.inc({ result: 'error' });
      this.logger.error({ err: error }, 'sweep failed; will try again at the next interval');
      return [];
    } finally {
      stop();
    }
  }
}
