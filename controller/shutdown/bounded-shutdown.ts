import type { Logger } from '../../common/logging.js';

/** After calls are cancelled, how long they get to go before the controller stops waiting for them. */
export const CANCELLED_CALLS_GRACE_MS = 2000;
/** The longest one phase other than the calls may take (each also ends at the deadline). */
export const PHASE_LIMIT_MS = 5000;

/** Thrown by {@link BoundedShutdown.finish} when a phase did not finish: the process should exit non-zero. */
export class UncleanShutdownError extends Error {
  constructor(readonly abandoned: readonly string[]) {
    super(`shutdown abandoned what did not finish in time: ${abandoned.join(', ')}`);
    this.name = 'UncleanShutdownError';
  }
}

/**
 * A shutdown whose every phase is bounded, and the whole by a deadline.
 *
 * Once, a controller hung after SIGTERM: its calls were cancelled, then
 * something further down (a database that stopped answering, a connection
 * that never closed) never settled, and the process never exited. So no
 * phase is awaited for longer than its limit or past the deadline; one that
 * overruns is logged and left behind, and the next one starts. The caller
 * exits once `finish()` returns or throws.
 */
export class BoundedShutdown {
  private readonly deadline: number;
  private readonly abandoned: string[] = [];

  constructor(
    deadlineMs: number,
    private readonly logger: Logger,
    private readonly now: () => number = Date.now,
  ) {
    this.deadline = now() + deadlineMs;
  }

  /** Runs `work`, waiting at most `limitMs` (and never past the deadline); a failure or an overrun is logged, not thrown. */
  async phase(name: string, work: () => unknown, limitMs = PHASE_LIMIT_MS): Promise<void> {
    const waitMs = Math.max(0, Math.min(limitMs, this.deadline - this.now()));
    let timer: NodeJS.Timeout | undefined;
    const overrun = new Promise<'overrun'>((resolve) => {
      timer = setTimeout(() => resolve('overrun'), waitMs);
    });
    const done = Promise.resolve()
      .then(work)
      .then(
        () => 'done' as const,
        (error: unknown) => {
          this.logger.warn({ err: error, phase: name }, `shutdown: ${name} failed; going on`);
          return 'failed' as const;
        },
      );
    const outcome = await Promise.race([done, overrun]);
    clearTimeout(timer);
    if (outcome === 'overrun') {
      this.abandoned.push(name);
      this.logger.warn({ phase: name, waitedMs: waitMs }, `shutdown: ${name} did not finish within ${waitMs}ms; going on without it`);
    }
  }

  /** Logs the end; throws UncleanShutdownError when a phase was abandoned. */
  finish(): void {
    if (this.abandoned.length > 0) {
      this.logger.warn({ abandoned: this.abandoned }, 'controller stopped, abandoning what did not finish in time');
      throw new UncleanShutdownError(this.abandoned);
    }
    this.logger.info('controller stopped');
  }
}
