import type { Logger } from '../../common/logging.js';
import type { ControllerMetrics } from '../observability/metrics.js';
import type { HeartbeatRecord, Store } from '../store/store.js';

/**
 * Collects heartbeats in memory and writes them in one transaction per
 * interval, so that the per-heartbeat path never waits on the database.
 * Memory is bounded by one entry per node: a newer heartbeat of the same
 * node replaces the pending one.
 */
export class HeartbeatRecorder {
  private pending = new Map<string, HeartbeatRecord>();
  private timer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> = Promise.resolve();

  constructor(
    private readonly store: Store,
    private readonly metrics: ControllerMetrics,
    private readonly logger: Logger,
    private readonly intervalMs: number,
    /** Called with the uuids of heartbeating nodes that no longer exist. */
    private readonly onMissingNodes: (uuids: string[]) => void,
  ) {}

  start(): void {
    this.timer = setInterval(() => void this.flush(), this.intervalMs);
    this.timer.unref();
  }

  record(heartbeat: HeartbeatRecord): void {
    const previous = this.pending.get(heartbeat.nodeUuid);
    // Keep the last progress seen even if the newest heartbeat carried none.
    this.pending.set(heartbeat.nodeUuid, {
      ...heartbeat,
      progressJson: heartbeat.progressJson ?? previous?.progressJson ?? null,
    });
  }

  get pendingCount(): number {
    return this.pending.size;
  }

  /** Writes what is pending. Flushes never overlap; a caller awaits every write before it. */
  flush(): Promise<void> {
    this.flushing = this.flushing.then(() => this.writePending());
    return this.flushing;
  }

  private async writePending(): Promise<void> {
    if (this.pending.size === 0) return;
    const batch = [...this.pending.values()];
    this.pending = new Map();
    const stop = this.metrics.heartbeatFlushDuration.startTimer();
    try {
      const missing = await this.store.recordHeartbeats(batch);
      if (missing.length > 0) this.onMissingNodes(missing);
    } catch (error) {
      // Put the batch back unless newer heartbeats arrived meanwhile; the next flush retries.
      for (const hb of batch) if (!this.pending.has(hb.nodeUuid)) this.pending.set(hb.nodeUuid, hb);
      this.logger.error({ err: error, heartbeats: batch.length }, 'writing heartbeats failed; will retry');
    } finally {
      stop();
    }
  }

  /** Stops the timer and writes what is left. */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.flush();
  }
}
