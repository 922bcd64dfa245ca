import type { Logger } from '../../common/logging.js';
import type { Store, TakeoverResult } from '../store/store.js';
import type { HashRange } from '../store/store.js';
import { HashRing } from './hash-ring.js';

export interface MembershipOptions {
  /** This controller's id (its lock holder name). */
  id: string;
  /** How often this controller touches its row and re-reads the others. */
  touchIntervalMs: number;
  /** A controller not seen for this long is dead: its nodes are taken over. */
  deadAfterMs: number;
  /**
   * This controller's own clock (default Date.now), used only to measure
   * time that passed here (is this controller's last touch recent enough?).
   * Everything other controllers read or compare is stamped with the
   * database's clock (Store.clock). Tests offset it by ±60 s.
   */
  now?: () => number;
}

/**
 * This controller's place among the controllers sharing the database.
 *
 * Each controller keeps a row that it touches every `touchIntervalMs`;
 * rows not touched for `deadAfterMs` belong to dead controllers, whose
 * locks and queued hand-offs any survivor releases (failing the nodes they
 * left half-way through a step) before deleting the row. The live rows make
 * a consistent hash ring that says which controller sweeps and drives each
 * node; every controller computes the same ring from the same rows.
 *
 * Times in the registry come from the database's clock (Store.clock), not
 * the controllers': their clocks may disagree by minutes, and a controller
 * whose clock ran 60 s behind would otherwise stamp itself dead at every
 * touch (or, ahead, find every other controller dead).
 *
 * A controller that cannot touch its row owns nothing until it can again:
 * the others will soon call it dead and take its nodes, and it must not
 * act on them meanwhile (the reservation check in every transition backs
 * this up if it tries).
 */
export class Membership {
  private ring = new HashRing([]);
  private myRanges: HashRange[] = [];
  private lastTouchAt = 0;
  private timer: NodeJS.Timeout | undefined;
  private refreshing: Promise<void> | undefined;
  private unlisten: (() => void) | undefined;
  private stopped = false;
  /** host:port other controllers reach this one at; known once the server listens. */
  private address = '';
  private readonly now: () => number;

  constructor(
    private readonly store: Store,
    private readonly options: MembershipOptions,
    private readonly logger: Logger,
    /** Told about every takeover this controller performed. */
    private readonly onTakeover: (deadId: string, result: TakeoverResult) => void = () => {},
    /** Told when the ring changed (a controller joined or left). */
    private readonly onRingChange: (members: readonly string[]) => void = () => {},
  ) {
    this.now = options.now ?? Date.now;
  }

  get id(): string {
    return this.options.id;
  }

  /** The live controllers, as of the last refresh. */
  get members(): readonly string[] {
    return this.ring.members;
  }

  /** Registers this controller under the address others reach it at, and builds the first ring. */
  async start(address: string): Promise<void> {
    this.address = address;
    const touchedAt = this.now();
    await this.store.registerController(this.options.id, address, await this.store.clock());
    this.lastTouchAt = touchedAt;
    this.unlisten = this.store.listen('membership', () => void this.refresh());
    await this.refresh();
    void this.store.notify('membership', this.options.id);
    this.timer = setInterval(() => void this.tick(), this.options.touchIntervalMs);
    this.timer.unref();
  }

  /** Leaves the ring: the others take this controller's share at once instead of after deadAfter. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    this.unlisten?.();
    await this.refreshing;
    try {
      await this.store.removeController(this.options.id, Number.MAX_SAFE_INTEGER);
      await this.store.notify('membership', this.options.id);
    } catch (error) {
      this.logger.warn({ err: error }, 'could not remove this controller from the registry; the others will time it out');
    }
  }

  /** Whether this controller drives and sweeps the node. */
  owns(nodeUuid: string): boolean {
    return this.fresh() && this.ring.ownerOf(nodeUuid) === this.options.id;
  }

  /** The ring hash ranges this controller owns; none while it cannot prove it is alive. */
  ranges(): HashRange[] {
    return this.fresh() ? this.myRanges : [];
  }

  /** Touches this controller's row, then refreshes; never throws. */
  private async tick(): Promise<void> {
    try {
      // Measured here before asking, so that a slow database errs on the side of owning nothing.
      const touchedAt = this.now();
      const now = await this.store.clock();
      if (!(await this.store.touchController(this.options.id, now))) {
        this.logger.warn(
          { controllerId: this.options.id },
          'the other controllers declared this one dead (it was not seen in time); rejoining the ring',
        );
        await this.store.registerController(this.options.id, this.address, now);
        void this.store.notify('membership', this.options.id);
      }
      this.lastTouchAt = touchedAt;
    } catch (error) {
      this.logger.error({ err: error }, 'could not touch this controller in the registry; it owns no node until it can');
    }
    await this.refresh();
  }

  /** Re-reads the registry, takes over dead controllers and rebuilds the ring. Never throws. */
  refresh(): Promise<void> {
    this.refreshing ??= this.refreshOnce().finally(() => {
      this.refreshing = undefined;
    });
    return this.refreshing;
  }

  private async refreshOnce(): Promise<void> {
    if (this.stopped) return;
    try {
      const now = await this.store.clock();
      const cutoff = now - this.options.deadAfterMs;
      const controllers = await this.store.listControllers();
      const live = controllers.filter((c) => c.lastSeenAt >= cutoff).map((c) => c.id);
      for (const dead of controllers.filter((c) => c.lastSeenAt < cutoff && c.id !== this.options.id)) {
        await this.takeOver(dead.id, dead.lastSeenAt, cutoff, now);
      }
      if (this.fresh() && !live.includes(this.options.id)) live.push(this.options.id);
      this.rebuild(live);
    } catch (error) {
      this.logger.error({ err: error }, 'could not read the controller registry; keeping the last ring');
    }
  }

  private async takeOver(deadId: string, lastSeenAt: number, cutoff: number, now: number): Promise<void> {
    const silentS = Math.round((now - lastSeenAt) / 1000);
    const reason = `controller ${deadId} stopped (not seen for ${silentS}s) while it held the node; taken over by ${this.options.id}`;
    const result = await this.store.releaseHolder(deadId, reason, now);
    // Conditional: a controller that came back meanwhile keeps its row.
    const removed = await this.store.removeController(deadId, cutoff);
    // Several survivors may race here; the one that released or removed something reports it.
    if (result.released === 0 && result.failed.length === 0 && !removed) return;
    this.logger.warn(
      { deadController: deadId, silentS, releasedLocks: result.released, failedNodes: result.failed.map((n) => n.name) },
      'took over a dead controller',
    );
    if (removed) void this.store.notify('membership', deadId);
    this.onTakeover(deadId, result);
  }

  private rebuild(live: string[]): void {
    const before = this.ring.members.join(',');
    const ring = new HashRing(live);
    this.ring = ring;
    this.myRanges = ring.rangesOf(this.options.id);
    if (ring.members.join(',') !== before) {
      this.logger.info({ members: ring.members, controllerId: this.options.id }, 'controller ring changed');
      this.onRingChange(ring.members);
    }
  }

  /** Whether this controller touched its row recently enough that the others still count it alive. */
  private fresh(): boolean {
    return this.now() - this.lastTouchAt < this.options.deadAfterMs - this.options.touchIntervalMs;
  }
}
