import { setTimeout as sleep } from 'node:timers/promises';
import type { Histogram } from 'prom-client';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../common/errors.js';
import type { Store } from './store/store.js';

/** A held lock; release() is idempotent and never throws. */
export interface HeldLock {
  release(): Promise<void>;
}

interface Waiter {
  wake: () => void;
}

/**
 * Node locks: a reservation stored with the node, taken by compare-and-set.
 *
 * An ordinary attempt fails fast with FAILED_PRECONDITION naming the holder.
 * A patient attempt (a hand-off to the worker that performs a node's next
 * step) waits its turn in arrival order; while anyone waits patiently for a
 * node, ordinary attempts on it fail too, so that a stream of short holders
 * can never starve the hand-off. Waiters are woken when a local holder
 * releases, and re-check at an interval for holders elsewhere.
 */
export class NodeLocks {
  private readonly queues = new Map<string, Waiter[]>();

  constructor(
    private readonly store: Store,
    private readonly holder: string,
    private readonly waitSeconds: Histogram<'kind'>,
    /** How often a patient waiter re-checks a lock held by another process. */
    private readonly recheckMs = 1000,
  ) {}

  /** Takes the lock now or fails with FAILED_PRECONDITION. */
  async lock(uuid: string, operation: string): Promise<HeldLock> {
    if ((this.queues.get(uuid)?.length ?? 0) > 0) {
      throw new MetalcastError(Status.FAILED_PRECONDITION, 'node has a hand-off waiting for its lock; retry in a moment');
    }
    if (await this.store.tryLock(uuid, this.holder, operation)) return this.held(uuid);
    const node = await this.store.getNode(uuid);
    if (!node) throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
    throw new MetalcastError(
      Status.FAILED_PRECONDITION,
      `node is locked by ${node.reservation ?? 'another operation'} for ${node.reservationOperation ?? 'an operation'}; retry when it finishes`,
    );
  }

  /**
   * Waits, in arrival order, until the lock is free and takes it. Throws
   * when the signal aborts or the node disappears.
   */
  async lockPatiently(uuid: string, operation: string, signal: AbortSignal): Promise<HeldLock> {
    const stopTimer = this.waitSeconds.startTimer({ kind: 'patient' });
    const queue = this.queues.get(uuid) ?? [];
    this.queues.set(uuid, queue);
    let wake: () => void = () => {};
    const waiter: Waiter = { wake: () => wake() };
    queue.push(waiter);
    try {
      while (true) {
        signal.throwIfAborted();
        if (queue[0] === waiter) {
          if (await this.store.tryLock(uuid, this.holder, operation)) {
            stopTimer();
            return this.held(uuid);
          }
          if (!(await this.store.getNode(uuid))) throw new MetalcastError(Status.NOT_FOUND, `node ${uuid} no longer exists`);
        }
        // Sleep until a local release wakes us, or re-check for a holder in another process.
        const woken = new Promise<void>((resolve) => {
          wake = resolve;
        });
        await Promise.race([woken, sleep(this.recheckMs, undefined, { signal })]);
      }
    } finally {
      const index = queue.indexOf(waiter);
      if (index >= 0) queue.splice(index, 1);
      if (queue.length === 0) this.queues.delete(uuid);
      else queue[0]?.wake();
    }
  }

  /** How many patient waiters a node has (for tests and logs). */
  waiting(uuid: string): number {
    return this.queues.get(uuid)?.length ?? 0;
  }

  private held(uuid: string): HeldLock {
    let released = false;
    return {
      release: async () => {
        if (released) return;
        released = true;
        await this.store.unlock(uuid, this.holder).catch(() => {});
        this.queues.get(uuid)?.[0]?.wake();
      },
    };
  }
}
