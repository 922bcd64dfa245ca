import { setTimeout as sleep } from 'node:timers/promises';
import type { Histogram } from 'prom-client';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import type { Store } from '../store/store.js';

/** A held lock; release() is idempotent and never throws. */
export interface HeldLock {
  release(): Promise<void>;
}

/**
 * Node locks: a reservation stored with the node, taken by compare-and-set,
 * so that they hold across every controller sharing the database.
 *
 * An ordinary attempt fails fast with FAILED_PRECONDITION naming the holder.
 * A patient attempt (a hand-off to the worker that performs a node's next
 * step) takes a ticket in the node's queue, which lives in the database, so
 * waiters on different controllers are served in the order they arrived;
 * while any ticket waits, ordinary attempts fail, so that a stream of short
 * holders can never starve a hand-off. Waiters sleep until a release is
 * announced (a store notification, which crosses controllers on
 * PostgreSQL) and re-check on a slow timer only in case a notification was
 * lost: nobody polls the database in a loop.
 */
export class NodeLocks {
  /** Wake-ups of this process's waiters, by node. */
  private readonly sleepers = new Map<string, Set<() => void>>();
  private readonly unlisten: () => void;

  constructor(
    private readonly store: Store,
    private readonly holder: string,
    private readonly waitSeconds: Histogram<'kind'>,
    /** How often a waiter re-checks without being told, in case a notification was lost. */
    private readonly recheckMs = 5000,
  ) {
    this.unlisten = store.listen('lock_released', (uuid) => this.wake(uuid));
  }

  /** Takes the lock now or fails with FAILED_PRECONDITION. */
  async lock(uuid: string, operation: string): Promise<HeldLock> {
    if (await this.store.tryLock(uuid, this.holder, operation)) return this.held(uuid);
    const node = await this.store.getNode(uuid);
    if (!node) throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
    if (node.reservation === null) {
      throw new MetalcastError(Status.FAILED_PRECONDITION, 'node has a hand-off waiting for its lock; retry in a moment');
    }
    throw new MetalcastError(
      Status.FAILED_PRECONDITION,
      `node is locked by ${node.reservation} for ${node.reservationOperation ?? 'an operation'}; retry when it finishes`,
    );
  }

  /**
   * Waits, in arrival order across every controller, until the lock is free
   * and takes it. Throws when the signal aborts or the node disappears.
   */
  async lockPatiently(uuid: string, operation: string, signal: AbortSignal): Promise<HeldLock> {
    signal.throwIfAborted();
    const stopTimer = this.waitSeconds.startTimer({ kind: 'patient' });
    const ticket = await this.store.enqueueLockWaiter(uuid, this.holder, operation);
    let acquired = false;
    let wake: () => void = () => {};
    const sleeper = () => wake();
    const sleepers = this.sleepers.get(uuid) ?? new Set();
    this.sleepers.set(uuid, sleepers);
    sleepers.add(sleeper);
    try {
      while (true) {
        signal.throwIfAborted();
        // Arm the wake-up before looking, so that a release between the look and the sleep is not missed.
        const woken = new Promise<void>((resolve) => {
          wake = resolve;
        });
        if (await this.store.tryLockWithTicket(uuid, ticket)) {
          acquired = true;
          stopTimer();
          return this.held(uuid);
        }
        if (!(await this.store.getNode(uuid))) throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
        await Promise.race([woken, sleep(this.recheckMs, undefined, { signal })]);
      }
    } finally {
      sleepers.delete(sleeper);
      if (sleepers.size === 0) this.sleepers.delete(uuid);
      if (!acquired) {
        // Leaving the queue may make someone else first: tell them.
        await this.store.dequeueLockWaiter(ticket).catch(() => {});
        void this.store.notify('lock_released', uuid);
      }
    }
  }

  /** How many patient waiters of this controller a node has (for tests and logs). */
  waiting(uuid: string): number {
    return this.sleepers.get(uuid)?.size ?? 0;
  }

  close(): void {
    this.unlisten();
  }

  private wake(uuid: string): void {
    for (const sleeper of this.sleepers.get(uuid) ?? []) sleeper();
  }

  private held(uuid: string): HeldLock {
    let released = false;
    return {
      release: async () => {
        if (released) return;
        released = true;
        await this.store.unlock(uuid, this.holder).catch(() => {});
        await this.store.notify('lock_released', uuid);
      },
    };
  }
}
