import type { Logger } from '../../common/logging.js';
import { inRanges, ringHash } from '../cluster/hash-ring.js';
import type { ControllerMetrics } from '../observability/metrics.js';
import type { HashRange, NodeRecord, PowerStatusRecord, Store } from '../store/store.js';
import { POWER_DRIVER_PROPERTY, type PowerDrivers } from './drivers.js';
import type { PowerDriver, PowerState } from './power-driver.js';

/**
 * Power state sync, like Ironic's periodic power sync: every interval, the
 * power state of each node that has a power driver and is in this
 * controller's share of the hash ring is read through its BMC. Reads are
 * spread evenly over the interval (a thousand BMCs are not all asked at the
 * same second) with at most `concurrency` at once; nodes someone holds the
 * lock of are left alone (their power is changing on purpose).
 *
 * What it records (store: node_power): the state read, when, and the reads
 * that failed in a row. A state that differs from what the controller last
 * knew (set by its own power actions, or read at the previous round) is a
 * power_state_changed event and metalcast_power_state_changes_total: someone
 * switched the machine outside metalcast. After `maxFailures` failed reads in
 * a row the node goes into maintenance with a reason that starts with "BMC
 * unreachable:" and says what the BMC answered; it is then read less often
 * (2, 4, … up to 16 intervals apart) instead of being hammered forever, and
 * leaves that maintenance by itself when the BMC answers again. Maintenance
 * an operator set for another reason is never touched.
 */

/** The start of the maintenance reason the sync sets, and clears only when it sees it. */
export const BMC_UNREACHABLE = 'BMC unreachable:';

export interface PowerSyncOptions {
  /** Round length; 0 disables the sync. */
  intervalMs: number;
  /** Most reads at once. */
  concurrency: number;
  /** Failed reads in a row before the node is marked. */
  maxFailures: number;
  /** This controller's id: the actor of events. */
  holder: string;
  /** The ring ranges this controller owns now. */
  share: () => readonly HashRange[];
  /** Longest one read may take, whatever the driver does (default: the interval, at most 60 s, at least 5 s). */
  readTimeoutMs?: number;
}

/** What one round did, for tests and logs. */
export interface PowerSyncRound {
  checked: number;
  changed: string[];
  failed: string[];
  marked: string[];
  cleared: string[];
  skipped: number;
}

const PAGE = 500;
const MAX_BACKOFF_ROUNDS = 16;

export class PowerSync {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<unknown> | undefined;
  private readonly stopping = new AbortController();

  constructor(
    private readonly store: Store,
    private readonly drivers: PowerDrivers,
    private readonly metrics: Pick<
      ControllerMetrics,
      'powerSyncChecks' | 'powerStateChanges' | 'bmcUnreachableNodes' | 'powerSyncRoundDuration'
    >,
    private readonly logger: Logger,
    private readonly options: PowerSyncOptions,
    /** Called with the node after the sync changed its maintenance, for watchers. */
    private readonly onNodeChanged: (node: NodeRecord) => void = () => {},
  ) {}

  /** Starts the rounds (the first after one interval); nothing when the interval is 0. */
  start(): void {
    if (this.options.intervalMs <= 0) return;
    const loop = () => {
      if (this.stopping.signal.aborted) return;
      const started = Date.now();
      this.running = this.runRound({ spread: true })
        .catch((error: unknown) => this.logger.error({ err: error }, 'power sync round failed'))
        .finally(() => {
          if (this.stopping.signal.aborted) return;
          this.timer = setTimeout(loop, Math.max(0, started + this.options.intervalMs - Date.now()));
          this.timer.unref();
        });
    };
    this.timer = setTimeout(loop, this.options.intervalMs);
    this.timer.unref();
  }

  /** Stops; waits for the round in progress to wind down (reads in flight end at their timeout). */
  async stop(): Promise<void> {
    this.stopping.abort();
    clearTimeout(this.timer);
    await this.running;
  }

  /**
   * One round over this controller's share. With `spread`, the reads are
   * spaced evenly over the interval; without, they start as fast as the
   * concurrency allows (tests, and a round that is due at once).
   */
  async runRound(options: { spread?: boolean; now?: () => number } = {}): Promise<PowerSyncRound> {
    const now = options.now ?? Date.now;
    const startedAt = now();
    const round: PowerSyncRound = { checked: 0, changed: [], failed: [], marked: [], cleared: [], skipped: 0 };
    const ranges = this.options.share();
    const nodes = (await this.listPowered()).filter((node) => inRanges(ringHash(node.uuid), ranges));
    const statuses = await this.store.getPowerStatuses(nodes.map((node) => node.uuid));
    const due = nodes.filter((node) => {
      if (node.reservation !== null) return false;
      const status = statuses.get(node.uuid);
      if (!status || status.failures < this.options.maxFailures || status.checkedAt === null) return true;
      // A node marked unreachable is read 2, 4, … up to 16 intervals apart.
      const rounds = Math.min(2 ** (status.failures - this.options.maxFailures + 1), MAX_BACKOFF_ROUNDS);
      return now() >= status.checkedAt + (rounds - 0.5) * this.options.intervalMs;
    });
    round.skipped = nodes.length - due.length;

    const spacing = options.spread && due.length > 0 ? this.options.intervalMs / due.length : 0;
    let next = 0;
    const worker = async () => {
      for (;;) {
        const index = next++;
        const node = due[index];
        if (!node || this.stopping.signal.aborted) return;
        const wait = startedAt + index * spacing - now();
        if (wait > 0) await sleep(wait, this.stopping.signal);
        if (this.stopping.signal.aborted) return;
        await this.check(node, statuses.get(node.uuid), round, now);
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.options.concurrency, due.length) }, worker));

    let unreachable = 0;
    for (const status of (await this.store.getPowerStatuses(nodes.map((node) => node.uuid))).values()) {
      if (status.failures >= this.options.maxFailures) unreachable++;
    }
    this.metrics.bmcUnreachableNodes.set(unreachable);
    this.metrics.powerSyncRoundDuration.observe((now() - startedAt) / 1000);
    if (round.changed.length + round.failed.length + round.marked.length + round.cleared.length > 0) {
      this.logger.info(
        { checked: round.checked, changed: round.changed, failed: round.failed, marked: round.marked, cleared: round.cleared },
        'power sync round done',
      );
    }
    return round;
  }

  /** Every node with a power driver, by pages. */
  private async listPowered(): Promise<NodeRecord[]> {
    const found: NodeRecord[] = [];
    let afterName: string | undefined;
    for (;;) {
      const page = await this.store.listNodes({ afterName, limit: PAGE });
      for (const node of page) if (node.properties[POWER_DRIVER_PROPERTY]) found.push(node);
      if (page.length < PAGE) return found;
      afterName = page.at(-1)?.name;
    }
  }

  private async check(node: NodeRecord, previous: PowerStatusRecord | undefined, round: PowerSyncRound, now: () => number): Promise<void> {
    const log = this.logger.child({ node: node.uuid, nodeName: node.name });
    const before: PowerStatusRecord = previous ?? { powerState: '', checkedAt: null, failures: 0, error: '' };
    let driver: PowerDriver | undefined;
    let state: PowerState;
    try {
      driver = this.drivers.forNode(node);
      if (!driver) return;
      state = await withTimeout(
        driver.state(),
        this.readTimeoutMs(),
        `${driver.name} did not say the power state within ${this.readTimeoutMs() / 1000} s`,
      );
    } catch (error) {
      await this.failed(node, before, (error as Error).message, round, now, log);
      return;
    } finally {
      driver?.close();
    }
    round.checked++;
    this.metrics.powerSyncChecks.inc({ result: state });
    await this.store.savePowerStatus(node.uuid, { powerState: state, checkedAt: now(), failures: 0, error: '' });
    if (before.powerState !== '' && before.powerState !== state) {
      round.changed.push(node.name);
      this.metrics.powerStateChanges.inc({ power_state: state });
      const message = `power is ${state}, but metalcast last knew it ${before.powerState}: it was switched outside metalcast (at the BMC or the machine)`;
      log.warn({ found: state, expected: before.powerState }, message);
      await this.store.addEvent(node.uuid, {
        kind: 'power_state_changed',
        message,
        actor: this.options.holder,
        fromState: null,
        toState: null,
      });
    }
    if (before.failures >= this.options.maxFailures) {
      round.cleared.push(node.name);
      log.info({ failures: before.failures }, 'the BMC answers again');
      const current = await this.store.getNode(node.uuid);
      if (current?.maintenance && current.maintenanceReason.startsWith(BMC_UNREACHABLE)) {
        const updated = await this.store.setMaintenance(node.uuid, false, '', {
          kind: 'maintenance',
          message: `maintenance off: the BMC answers again (power is ${state})`,
          actor: this.options.holder,
          fromState: null,
          toState: null,
        });
        if (updated) this.onNodeChanged(updated);
      } else {
        await this.store.addEvent(node.uuid, {
          kind: 'bmc_reachable',
          message: `the BMC answers again (power is ${state})`,
          actor: this.options.holder,
          fromState: null,
          toState: null,
        });
      }
    }
  }

  private async failed(
    node: NodeRecord,
    before: PowerStatusRecord,
    error: string,
    round: PowerSyncRound,
    now: () => number,
    log: Logger,
  ): Promise<void> {
    const failures = before.failures + 1;
    round.failed.push(node.name);
    this.metrics.powerSyncChecks.inc({ result: 'failed' });
    await this.store.savePowerStatus(node.uuid, { powerState: before.powerState, checkedAt: now(), failures, error });
    log.warn({ failures, maxFailures: this.options.maxFailures, problem: error }, 'reading the power state failed');
    if (failures !== this.options.maxFailures) return;
    round.marked.push(node.name);
    const reason = `${BMC_UNREACHABLE} ${error} (${failures} power state reads in a row failed; metalcast reads it less often now and ends this maintenance when the BMC answers)`;
    const current = await this.store.getNode(node.uuid);
    if (current && !current.maintenance) {
      const updated = await this.store.setMaintenance(node.uuid, true, reason, {
        kind: 'maintenance',
        message: `maintenance on: ${reason}`,
        actor: this.options.holder,
        fromState: null,
        toState: null,
      });
      if (updated) this.onNodeChanged(updated);
    } else if (current) {
      await this.store.addEvent(node.uuid, {
        kind: 'bmc_unreachable',
        message: reason,
        actor: this.options.holder,
        fromState: null,
        toState: null,
      });
    }
  }

  private readTimeoutMs(): number {
    return this.options.readTimeoutMs ?? Math.max(5000, Math.min(this.options.intervalMs, 60_000));
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(message)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}
