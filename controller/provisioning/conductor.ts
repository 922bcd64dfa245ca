import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import { pickDisk } from '../../common/disk-hints.js';
import type { Logger } from '../../common/logging.js';
import { type Command, CommandState, EraseMode, type WriteImageResult } from '../../gen/metalcast/v1/command.js';
import { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { AgentClients, AgentHandle } from '../agents/agent-client.js';
import type { AgentDirectory } from '../agents/agent-directory.js';
import type { AgentSessions } from '../agents/agent-sessions.js';
import type { HashRange } from '../store/store.js';
import { MetalcastError } from '../../common/errors.js';
import { Status as GrpcStatus } from 'nice-grpc-common';
import type { HeldLock, NodeLocks } from './locks.js';
import type { NodeFeed } from './node-feed.js';
import type { NodeHeartbeatView, NodeRecord, Store } from '../store/store.js';
import type { Admission } from './admission.js';
import { type DeploySpecRecord, diskBytesNeeded, type Provisioner } from './provisioner.js';
import { CONFIG_DRIVE_PARTITION_BYTES } from '../configdrive/config-drive.js';
import { describeError as describe } from '../../common/errors.js';
import { PowerDrivers } from '../power/drivers.js';
import type { PowerDriver, PowerState } from '../power/power-driver.js';
import { bootMethodOf } from '../boot/virtual-media.js';

const DEFAULT_POWER_DRIVERS = new PowerDrivers();

/** How long the controller waits for an agent to report its inventory. */
const INVENTORY_TIMEOUT_MS = 60_000;
/** A WatchCommand stream is renewed after this, so that no call runs unbounded. */
const WATCH_DEADLINE_MS = 10 * 60_000;
/** Polling interval when the watch stream broke. */
const POLL_INTERVAL_MS = 2000;
/** A non-owner tells the owner about a due node at most this often per node. */
const DUE_NOTICE_INTERVAL_MS = 2000;
/** The wait states the conductor acts in, and the step each calls for. */
const STEPS = { inspect_wait: 'inspect', deploy_wait: 'deploy', clean_wait: 'clean' } as const;
type Step = (typeof STEPS)[keyof typeof STEPS];

export interface ConductorOptions {
  holder: string;
  finalPower: 'reboot' | 'power_off' | 'none';
  verifyReadback: boolean;
  stallTimeoutMs: number;
  transferAttempts: number;
  cleanMode: 'quick' | 'full';
  deploys: Admission;
  cleans: Admission;
  /** How often the owner looks for due nodes whose heartbeats landed elsewhere (a safety net for lost notices). */
  dueScanIntervalMs: number;
  /**
   * Heartbeats are acted on in batches: the nodes heard from within this
   * window are read in one query. 0 reads each heartbeat's whole node on its own.
   */
  heartbeatCheckWindowMs: number;
  /** How recent a recorded heartbeat must be for the due scan to act on it. */
  freshnessMs: number;
  /** Power drivers by name (default: the built-in ones); a node with power.driver is rebooted into its disk and powered off through it. */
  power?: PowerDrivers;
  /** Told of every image written (the metrics count the bytes delta re-imaging saved). */
  onImageWritten?: (result: WriteImageResult) => void;
  /**
   * Told when a node's agent stops serving its fan-out wave: its write_image
   * failed, or a next command (the config drive, the final power) follows at
   * once and ends its serving. The tracker stops naming it rather than let
   * its peers find out one failed fetch at a time.
   */
  onWaveLeft?: (nodeUuid: string) => void;
}

/** Which nodes this controller drives (the ring, controller/cluster/membership.ts). */
export interface Ownership {
  owns(nodeUuid: string): boolean;
  ranges(): readonly HashRange[];
}

/** The agent went away while we followed its command: let go, a later heartbeat resumes. */
class AgentGone extends Error {
  override name = 'AgentGone';
}

/**
 * Acts on heartbeats: when a node's agent checks in and the node waits for
 * it, the conductor hands the node to a worker that takes the node's lock
 * patiently (in arrival order, never starved by short holders) and performs
 * the next step: inspection, writing the image, or erasing the disks.
 * Heartbeats never wait for any of it.
 *
 * With several controllers only the node's owner (by the hash ring) acts.
 * A heartbeat that lands on another controller becomes a notice to the
 * owner ('node_due'), and the owner also scans for due nodes now and then,
 * in case a notice was lost or the ring moved.
 *
 * Every command carries a request id derived from the node's current wait,
 * so a controller that restarts or loses track of a command and sends it
 * again gets the command already running instead of a second one.
 */
export class Conductor {
  private readonly working = new Map<string, Promise<void>>();
  /** Heartbeats whose node is being read; a burst for one node reads it once. */
  private readonly checking = new Set<string>();
  /** When this controller last told the owner about each due node. */
  private readonly noticed = new Map<string, number>();
  private readonly stopping = new AbortController();
  /** The running step of each node this controller works on; aborted by stop() or by an operator's abort. */
  private readonly steps = new Map<string, AbortController>();
  /** Nodes an operator is aborting: no step starts on them until the abort is done. */
  private readonly interrupting = new Set<string>();
  private unlisten: (() => void) | undefined;
  private scanTimer: NodeJS.Timeout | undefined;
  /** Nodes heard from since the last batched read (see checkHeard). */
  private heard = new Set<string>();
  private checkTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly store: Store,
    private readonly sessions: AgentSessions,
    private readonly directory: AgentDirectory,
    private readonly ownership: Ownership,
    private readonly agents: AgentClients,
    private readonly provisioner: Provisioner,
    private readonly locks: NodeLocks,
    private readonly feed: NodeFeed,
    private readonly options: ConductorOptions,
    private readonly logger: Logger,
  ) {}

  /** Listens for notices from other controllers and starts the due scan. */
  start(): void {
    this.unlisten = this.store.listen('node_due', (uuid) => {
      if (this.ownership.owns(uuid)) this.dispatch(uuid);
    });
    this.scanTimer = setInterval(() => void this.scanDue(), this.options.dueScanIntervalMs);
    this.scanTimer.unref();
  }

  /** Called for every heartbeat this controller receives; returns at once. */
  onHeartbeat(nodeUuid: string): void {
    if (this.stopping.signal.aborted || this.checking.has(nodeUuid) || this.working.has(nodeUuid)) return;
    if (this.options.heartbeatCheckWindowMs === 0) {
      this.checkOne(nodeUuid);
      return;
    }
    // Bounded by the number of nodes: a node heard from twice in a window is read once.
    this.heard.add(nodeUuid);
    this.checkTimer ??= setTimeout(() => void this.checkHeard(), this.options.heartbeatCheckWindowMs);
  }

  /** Without a check window: the whole node, read at once for this heartbeat. */
  private checkOne(nodeUuid: string): void {
    this.checking.add(nodeUuid);
    this.store
      .getNode(nodeUuid)
      .then((node) => node && this.consider(node, node))
      .catch((error: unknown) => {
        if (!this.stopping.signal.aborted) this.logger.error({ err: error, node: nodeUuid }, 'acting on a heartbeat failed');
      })
      .finally(() => this.checking.delete(nodeUuid));
  }

  /**
   * The nodes heard from in the last window, read in one narrow query: at
   * high heartbeat rates a full read per heartbeat was the controller's
   * largest cost. Nothing is cached between windows, because another
   * controller may change a node (its state, its token) at any time.
   */
  private async checkHeard(): Promise<void> {
    this.checkTimer = undefined;
    const batch = [...this.heard];
    this.heard = new Set();
    for (const uuid of batch) this.checking.add(uuid);
    try {
      const views = await this.store.getHeartbeatViews(batch);
      const outcomes = await Promise.allSettled(views.map((view) => this.consider(view)));
      for (const [i, outcome] of outcomes.entries()) {
        if (outcome.status === 'rejected' && !this.stopping.signal.aborted) {
          this.logger.error({ err: outcome.reason, node: views[i]?.uuid }, 'acting on a heartbeat failed');
        }
      }
    } catch (error) {
      // The next heartbeat of each node tries again; the due scan is the safety net meanwhile.
      if (!this.stopping.signal.aborted) {
        this.logger.error({ err: error, nodes: batch.length }, 'reading the nodes of a batch of heartbeats failed');
      }
    } finally {
      for (const uuid of batch) this.checking.delete(uuid);
    }
  }

  /** Stops following agents (they carry on; another controller or a restarted one picks them up) and releases the locks. */
  async stop(): Promise<void> {
    this.stopping.abort();
    this.unlisten?.();
    clearInterval(this.scanTimer);
    clearTimeout(this.checkTimer);
    this.heard.clear();
    await Promise.allSettled(this.working.values());
  }

  /** What a heartbeat means for its node, as the node is now; `record` is the whole node when the caller read it. */
  private async consider(node: NodeHeartbeatView, record?: NodeRecord): Promise<void> {
    // Another controller may have replaced or wiped the token; only it could end streams it held itself.
    if (this.sessions.holdsStaleToken(node.uuid, node.agentTokenHash)) {
      this.sessions.revoke(
        node.uuid,
        new MetalcastError(
          GrpcStatus.UNAUTHENTICATED,
          node.agentTokenHash === null
            ? `the node is now ${node.provisionState.replaceAll('_', ' ')}; the agent token is no longer valid`
            : 'the agent token was replaced by a newer lookup; look up again',
        ),
      );
      return;
    }
    if (node.maintenance || !(node.provisionState in STEPS)) return;
    if (this.ownership.owns(node.uuid)) {
      this.dispatch(node.uuid, record);
      return;
    }
    const now = Date.now();
    if (now - (this.noticed.get(node.uuid) ?? 0) < DUE_NOTICE_INTERVAL_MS) return;
    this.noticed.set(node.uuid, now);
    if (this.noticed.size > 10_000) this.noticed.clear();
    await this.store.notify('node_due', node.uuid);
  }

  /** Starts the node's next step in the background unless one is under way here; `seen` saves a read when the caller has the node. */
  private dispatch(nodeUuid: string, seen?: NodeRecord): void {
    if (this.stopping.signal.aborted || this.working.has(nodeUuid) || this.interrupting.has(nodeUuid)) return;
    const work = this.advance(nodeUuid, seen)
      .catch((error: unknown) => {
        if (!this.stopping.signal.aborted) this.logger.error({ err: error, node: nodeUuid }, 'acting on a heartbeat failed');
      })
      .finally(() => this.working.delete(nodeUuid));
    this.working.set(nodeUuid, work);
  }

  /** The owner's safety net: due nodes in its share heard from recently, whatever controller heard them. */
  private async scanDue(): Promise<void> {
    if (this.stopping.signal.aborted) return;
    try {
      const due = await this.store.listDueNodes(
        Object.keys(STEPS) as (keyof typeof STEPS)[],
        Date.now() - this.options.freshnessMs,
        this.ownership.ranges(),
        500,
      );
      for (const uuid of due) this.dispatch(uuid);
    } catch (error) {
      this.logger.error({ err: error }, 'looking for due nodes failed; will try again');
    }
  }

  /**
   * Stops this controller's step on the node, if one runs (an operator
   * aborts it), waits until the step let go of the node's lock (at most
   * `timeoutMs`), and keeps new steps off the node until the returned
   * function is called. The agent's command is not cancelled: the abort
   * powers the machine off, which ends it.
   */
  async interrupt(nodeUuid: string, timeoutMs = 15_000): Promise<() => void> {
    this.interrupting.add(nodeUuid);
    const done = () => {
      this.interrupting.delete(nodeUuid);
    };
    const work = this.working.get(nodeUuid);
    if (!work) return done;
    this.steps.get(nodeUuid)?.abort(new Error('the step was aborted by an operator'));
    const timer = new AbortController();
    await Promise.race([work, sleep(timeoutMs, undefined, { signal: timer.signal }).catch(() => {})]);
    timer.abort();
    return done;
  }

  /**
   * Asks the node's agent, if it is alive, to power the machine off (after
   * an abort, for a node without a power driver). Undefined when there is no
   * agent to ask; otherwise what happened, for the node's history.
   */
  async powerOffThroughAgent(node: NodeRecord): Promise<string | undefined> {
    const endpoint = this.directory.endpoint(node);
    if (!endpoint || !this.directory.isAlive(node)) return undefined;
    const agent = this.agents.handle(node.uuid, endpoint.address, endpoint.token, endpoint.certificatePem);
    try {
      await agent.client.runCommand(
        { requestId: `abort:${node.uuid}:${node.provisionUpdatedAt}:power-off`, parameters: { command: { $case: 'powerOff', value: {} } } },
        { ...agent.auth, deadline: 10_000 },
      );
      return `asked its agent at ${agent.address} to power the machine off`;
    } catch (error) {
      // The machine may go down before it answers.
      if (error instanceof ClientError && [Status.UNAVAILABLE, Status.CANCELLED].includes(error.code)) {
        return `asked its agent at ${agent.address} to power the machine off (it went away before answering)`;
      }
      throw new Error(`asking its agent at ${agent.address} to power the machine off failed: ${describe(error)}`);
    }
  }

  private async advance(nodeUuid: string, known?: NodeRecord): Promise<void> {
    const seen = known ?? (await this.store.getNode(nodeUuid));
    if (!seen || seen.maintenance) return;
    const step: Step | undefined = STEPS[seen.provisionState as keyof typeof STEPS];
    if (!step) return;
    // Aborted when the controller stops, or when an operator aborts this step (interrupt()).
    const stepAbort = new AbortController();
    const onStop = () => stepAbort.abort(this.stopping.signal.reason);
    this.stopping.signal.addEventListener('abort', onStop, { once: true });
    if (this.stopping.signal.aborted) stepAbort.abort();
    this.steps.set(nodeUuid, stepAbort);
    try {
      await this.runStep(nodeUuid, seen, step, stepAbort.signal);
    } finally {
      this.stopping.signal.removeEventListener('abort', onStop);
      if (this.steps.get(nodeUuid) === stepAbort) this.steps.delete(nodeUuid);
    }
  }

  /** The signal of the node's running step (the controller's own when none runs). */
  private signalFor(nodeUuid: string): AbortSignal {
    return this.steps.get(nodeUuid)?.signal ?? this.stopping.signal;
  }

  private async runStep(nodeUuid: string, seen: NodeRecord, step: Step, signal: AbortSignal): Promise<void> {
    const admission = step === 'deploy' ? this.options.deploys : step === 'clean' ? this.options.cleans : undefined;
    const leave = admission ? await admission.enter(signal) : () => {};
    let lock: HeldLock | undefined;
    try {
      lock = await this.locks.lockPatiently(nodeUuid, step, signal);
      // The node may have moved while we waited: act on what it is now.
      const node = await this.store.getNode(nodeUuid);
      if (!node || node.maintenance || node.provisionState !== seen.provisionState) return;
      const endpoint = this.directory.endpoint(node);
      if (!endpoint || !this.directory.isAlive(node)) return;
      const agent = this.agents.handle(node.uuid, endpoint.address, endpoint.token, endpoint.certificatePem);
      const log = this.logger.child({
        node: node.uuid,
        nodeName: node.name,
        agent: endpoint.address,
        tls: agent.fingerprint !== undefined,
        step,
      });
      // The history shows who drove each step, so that overlaps between controllers would be visible.
      await this.store.addEvent(node.uuid, {
        kind: 'step_started',
        message: `${step} driven by ${this.options.holder}`,
        actor: this.options.holder,
        fromState: node.provisionState,
        toState: null,
      });
      try {
        if (step === 'inspect') await this.inspect(node, agent, log);
        else if (step === 'deploy') await this.deploy(node, agent, log);
        else await this.clean(node, agent, log);
      } finally {
        await this.store
          .addEvent(node.uuid, {
            kind: 'step_ended',
            message: `${step} by ${this.options.holder} ended`,
            actor: this.options.holder,
            fromState: null,
            toState: null,
          })
          .catch(() => {});
      }
    } catch (error) {
      if (error instanceof AgentGone) {
        this.logger.warn(
          { node: nodeUuid, step, reason: error.message },
          'lost the agent mid-step; its next heartbeat resumes, or the sweep fails the node',
        );
        return;
      }
      if (signal.aborted) return;
      throw error;
    } finally {
      await lock?.release();
      leave();
    }
  }

  private async inspect(node: NodeRecord, agent: AgentHandle, log: Logger): Promise<void> {
    log.info('inspecting: fetching the inventory from the agent');
    let inventory: Inventory;
    try {
      const response = await agent.client.getInventory(
        {},
        { ...agent.auth, deadline: INVENTORY_TIMEOUT_MS, signal: this.signalFor(node.uuid) },
      );
      if (!response.inventory) throw new Error('the agent returned no inventory');
      inventory = response.inventory;
    } catch (error) {
      await this.rethrowIfGone(node, error);
      await this.fail(
        node,
        'inspect_wait',
        'inspect_failed',
        `inspection failed: could not get the inventory from the agent at ${agent.address}: ${describe(error)}`,
        log,
      );
      return;
    }
    const found = new Set(inventory.interfaces.map((nic) => nic.macAddress.toLowerCase()));
    const missing = node.macAddresses.filter((mac) => !found.has(mac));
    if (missing.length > 0) {
      await this.fail(
        node,
        'inspect_wait',
        'inspect_failed',
        `inspection failed: enrolled MAC ${missing.join(', ')} not found on the machine (it has ${[...found].join(', ') || 'no NICs'}); fix the node's ports`,
        log,
      );
      return;
    }
    await this.provisioner.move(
      node,
      'inspect_wait',
      'manageable',
      null,
      this.options.holder,
      `inspection found ${inventory.disks.length} disks, ${inventory.interfaces.length} NICs, ${inventory.cpu?.count ?? 0} CPUs`,
      '',
      { inventoryJson: JSON.stringify(Inventory.toJSON(inventory)) },
    );
    log.info({ disks: inventory.disks.length, nics: inventory.interfaces.length }, 'inspection finished');
  }

  private async deploy(node: NodeRecord, agent: AgentHandle, log: Logger): Promise<void> {
    const spec = JSON.parse(node.deployJson ?? '{}') as DeploySpecRecord;
    const image = spec.image ? await this.store.getImage(spec.image) : undefined;
    if (image?.state !== 'ready') {
      await this.fail(node, 'deploy_wait', 'deploy_failed', `deploy failed: image '${spec.image}' is ${image ? image.state : 'gone'}`, log);
      return;
    }
    let devicePath: string;
    try {
      const { inventory } = await agent.client.getInventory(
        {},
        { ...agent.auth, deadline: INVENTORY_TIMEOUT_MS, signal: this.signalFor(node.uuid) },
      );
      devicePath = pickDisk(
        inventory?.disks ?? [],
        spec.target,
        diskBytesNeeded(image.sizeBytes, spec.configDrive !== undefined),
      ).devicePath;
    } catch (error) {
      await this.rethrowIfGone(node, error);
      await this.fail(node, 'deploy_wait', 'deploy_failed', `deploy failed: ${describe(error)}`, log);
      return;
    }
    const requestId = `deploy:${node.uuid}:${node.provisionUpdatedAt}`;
    log.info({ image: image.name, device: devicePath, requestId }, 'deploying: sending write_image');
    const final = await this.runToEnd(node, agent, requestId, log, {
      $case: 'writeImage',
      value: {
        image: image.name,
        target: { devicePath },
        sha256: image.sha256,
        sizeBytes: image.sizeBytes,
        verifyReadback: this.options.verifyReadback,
        diskIsZeroed: false,
        stallTimeoutMs: this.options.stallTimeoutMs,
        maxAttempts: this.options.transferAttempts,
        timeLimitMs: 0,
      },
    });
    // With no config drive to write and no final power, the agent lingers as a peer (--fanout-linger).
    if (final.state !== CommandState.COMMAND_STATE_SUCCEEDED || spec.configDrive || this.options.finalPower !== 'none') {
      this.options.onWaveLeft?.(node.uuid);
    }
    if (final.state !== CommandState.COMMAND_STATE_SUCCEEDED) {
      await this.fail(node, 'deploy_wait', 'deploy_failed', `write_image failed: ${final.error}`, log);
      return;
    }
    const written = final.result?.result?.$case === 'writeImage' ? final.result.result.value : undefined;
    if (written) this.options.onImageWritten?.(written);
    const chunkNote =
      written && written.chunksSkipped + written.chunksFetched > 0
        ? `, chunks: ${written.chunksSkipped} already on the disk, ${written.chunksFetched} fetched, ${written.chunksRefetched} fetched again`
        : '';
    // Where the bytes came from (fan-out, docs/fanout.md): node show and the events say it.
    const sourceNote =
      written && written.bytesFromPeers > 0
        ? `; bytes from peers ${written.bytesFromPeers}, from the controller ${written.bytesFromController}`
        : '';
    let configDriveNote = '';
    if (spec.configDrive) {
      log.info({ device: devicePath, configDrive: spec.configDrive.sha256 }, 'deploying: sending write_config_drive');
      const drive = await this.runToEnd(node, agent, `${requestId}:config-drive`, log, {
        $case: 'writeConfigDrive',
        value: {
          target: { devicePath },
          sha256: spec.configDrive.sha256,
          sizeBytes: spec.configDrive.sizeBytes,
          partitionSizeBytes: CONFIG_DRIVE_PARTITION_BYTES,
        },
      });
      if (drive.state !== CommandState.COMMAND_STATE_SUCCEEDED) {
        await this.fail(node, 'deploy_wait', 'deploy_failed', `write_config_drive failed: ${drive.error}`, log);
        return;
      }
      const where = drive.result?.result?.$case === 'writeConfigDrive' ? drive.result.result.value : undefined;
      configDriveNote = where ? `; config drive in partition ${where.partitionNumber} (${where.partitionTable})` : '';
    }
    const finalState = this.options.finalPower === 'power_off' ? 'off' : this.options.finalPower === 'reboot' ? 'on' : undefined;
    const driven = await this.powerThroughDriver(
      node,
      log,
      async (driver) => {
        // The agent ISO out before the machine restarts into its disk.
        if (bootMethodOf(node) === 'virtual-media') await driver.ejectMedia?.();
        await driver.setBootDevice('disk');
        if (this.options.finalPower === 'reboot') await driver.reset();
        else if (this.options.finalPower === 'power_off') await driver.powerOff();
      },
      finalState,
    );
    if (driven === 'failed') {
      return;
    }
    if (driven === 'no driver' && this.options.finalPower !== 'none') {
      const command =
        this.options.finalPower === 'reboot' ? { $case: 'reboot' as const, value: {} } : { $case: 'powerOff' as const, value: {} };
      try {
        await agent.client.runCommand(
          { requestId: `${requestId}:final-power`, parameters: { command } },
          { ...agent.auth, signal: this.signalFor(node.uuid) },
        );
      } catch (error) {
        // The machine may go down before it answers; only a refusal is a failure.
        if (error instanceof ClientError && ![Status.UNAVAILABLE, Status.CANCELLED, Status.DEADLINE_EXCEEDED].includes(error.code)) {
          await this.fail(node, 'deploy_wait', 'deploy_failed', `final ${this.options.finalPower} failed: ${describe(error)}`, log);
          return;
        }
      }
    }
    const deploying = await this.provisioner.move(
      node,
      'deploy_wait',
      'deploying',
      'active',
      this.options.holder,
      `image written to ${devicePath}`,
    );
    await this.provisioner.move(
      deploying,
      'deploying',
      'active',
      null,
      this.options.holder,
      `deployed ${image.name} to ${devicePath}: ${written?.writtenBytes ?? image.sizeBytes} bytes, sha256 ${image.sha256.slice(0, 12)}…, ${written?.resumes ?? 0} resumes${chunkNote}${sourceNote}${configDriveNote}; final power: ${this.options.finalPower}`,
      '',
    );
    log.info({ image: image.name, device: devicePath, resumes: written?.resumes }, 'deploy finished');
  }

  private async clean(node: NodeRecord, agent: AgentHandle, log: Logger): Promise<void> {
    const requestId = `clean:${node.uuid}:${node.provisionUpdatedAt}`;
    log.info({ mode: this.options.cleanMode, requestId }, 'cleaning: sending erase_disks');
    const final = await this.runToEnd(node, agent, requestId, log, {
      $case: 'eraseDisks',
      value: { mode: this.options.cleanMode === 'full' ? EraseMode.ERASE_MODE_FULL : EraseMode.ERASE_MODE_QUICK, devicePaths: [] },
    });
    if (final.state !== CommandState.COMMAND_STATE_SUCCEEDED) {
      await this.fail(node, 'clean_wait', 'clean_failed', `erase_disks failed: ${final.error}`, log);
      return;
    }
    const erased = final.result?.result?.$case === 'eraseDisks' ? final.result.result.value.devicePaths : [];
    const powered = await this.powerThroughDriver(
      node,
      log,
      async (driver) => {
        if (bootMethodOf(node) === 'virtual-media') await driver.ejectMedia?.();
        await driver.powerOff();
      },
      'off',
    );
    if (powered === 'failed') return;
    const cleaning = await this.provisioner.move(
      node,
      'clean_wait',
      'cleaning',
      'available',
      this.options.holder,
      `${this.options.cleanMode} erase of ${erased.join(', ')}`,
    );
    await this.provisioner.move(cleaning, 'cleaning', 'available', null, this.options.holder, 'cleaning finished', '', {
      deployJson: null,
    });
    // The user data in it may be secret: nothing of the deploy is kept past cleaning.
    await this.store.deleteConfigDrive(node.uuid);
    log.info({ erased }, 'cleaning finished');
  }

  /**
   * Starts a command (idempotently, by request id) and follows it to its
   * end: WatchCommand while it holds, GetCommand polling when it breaks,
   * AgentGone when the agent's heartbeat stream is gone.
   */
  private async runToEnd(
    node: NodeRecord,
    agent: AgentHandle,
    requestId: string,
    log: Logger,
    command: NonNullable<Parameters<AgentHandle['client']['runCommand']>[0]['parameters']>['command'],
  ): Promise<Command> {
    const signal = this.signalFor(node.uuid);
    let started: Command | undefined;
    try {
      started = (await agent.client.runCommand({ requestId, parameters: { command } }, { ...agent.auth, signal })).command;
    } catch (error) {
      await this.rethrowIfGone(node, error);
      return failedCommand(`the agent refused the command: ${describe(error)}`);
    }
    if (!started) return failedCommand('the agent returned no command');
    while (true) {
      signal.throwIfAborted();
      try {
        for await (const update of agent.client.watchCommand(
          { id: started.id },
          { ...agent.auth, signal, deadline: WATCH_DEADLINE_MS, retry: false },
        )) {
          const current = update.command;
          if (!current) continue;
          if (current.progress) this.feed.publish({ node, progress: current.progress });
          if (current.state !== CommandState.COMMAND_STATE_RUNNING) return current;
        }
      } catch (error) {
        signal.throwIfAborted();
        if (error instanceof ClientError && error.code === Status.NOT_FOUND)
          return failedCommand(`the agent no longer knows command ${started.id}`);
        log.warn({ reason: describe(error) }, 'watching the command broke; polling instead');
      }
      // Poll until it ends, the agent goes, or it is time to try watching again.
      for (let polls = 0; polls < 15; polls++) {
        await this.throwIfGone(node, 'the agent stopped heartbeating', agent);
        try {
          const { command: current } = await agent.client.getCommand({ id: started.id }, { ...agent.auth, signal, deadline: 10_000 });
          if (current && current.state !== CommandState.COMMAND_STATE_RUNNING) return current;
          if (current?.progress) this.feed.publish({ node, progress: current.progress });
        } catch (error) {
          signal.throwIfAborted();
          await this.rethrowIfGone(node, error, agent);
        }
        await sleep(POLL_INTERVAL_MS, undefined, { signal });
      }
    }
  }

  /**
   * The final power action of a deploy or clean through the node's power
   * driver, if it has one; a failure fails the node (deploy_wait or
   * clean_wait) with a last_error naming the driver.
   */
  private async powerThroughDriver(
    node: NodeRecord,
    log: Logger,
    action: (driver: PowerDriver) => Promise<void>,
    /** The power state the action leaves, for the power sync to expect; undefined: unchanged. */
    leaves?: PowerState,
  ): Promise<'done' | 'no driver' | 'failed'> {
    const step = node.provisionState === 'deploy_wait' ? 'deploy' : 'clean';
    const [from, to] = step === 'deploy' ? (['deploy_wait', 'deploy_failed'] as const) : (['clean_wait', 'clean_failed'] as const);
    const what = step === 'deploy' ? `final ${this.options.finalPower}` : 'power off after cleaning';
    let driver: PowerDriver | undefined;
    try {
      driver = (this.options.power ?? DEFAULT_POWER_DRIVERS).forNode(node);
      if (!driver) return 'no driver';
      await action(driver);
      if (leaves) await this.store.savePowerStatus(node.uuid, { powerState: leaves, checkedAt: Date.now(), failures: 0, error: '' });
      log.info({ driver: driver.name }, `${what} through the power driver`);
      return 'done';
    } catch (error) {
      const reason = driver ? `${what} through ${driver.name} failed: ${describe(error)}` : `${what} failed: ${describe(error)}`;
      await this.fail(node, from, to, reason, log);
      return 'failed';
    } finally {
      driver?.close();
    }
  }

  /** Transport failures with the agent's heartbeats gone mean "agent gone", not "step failed". */
  private async rethrowIfGone(node: NodeRecord, error: unknown, agent?: AgentHandle): Promise<void> {
    if (this.signalFor(node.uuid).aborted) throw error;
    const transport =
      error instanceof ClientError &&
      [Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED, Status.UNAUTHENTICATED].includes(error.code);
    if (transport) await this.throwIfGone(node, describe(error), agent);
  }

  /**
   * AgentGone when no controller hears the node's agent any more, or when
   * the agent heard is another process (restarted: a new token from a new
   * lookup). Following the old one's command would wait forever; letting go
   * gives the new agent the step again, and write_image resumes through its
   * delta scan (docs/chunk-manifest.md).
   */
  private async throwIfGone(node: NodeRecord, reason: string, agent?: AgentHandle): Promise<void> {
    const current = await this.store.getNode(node.uuid);
    if (!current || !this.directory.isAlive(current)) throw new AgentGone(reason);
    if (agent && current.agentApiToken !== null && current.agentApiToken !== node.agentApiToken) {
      throw new AgentGone(`the agent restarted (${reason})`);
    }
  }

  private async fail(
    node: NodeRecord,
    from: 'inspect_wait' | 'deploy_wait' | 'clean_wait',
    to: 'inspect_failed' | 'deploy_failed' | 'clean_failed',
    reason: string,
    log: Logger,
  ): Promise<void> {
    log.warn({ reason }, `${to.replace('_', ' ')}`);
    await this.provisioner.move(node, from, to, null, this.options.holder, reason, reason);
  }
}

function failedCommand(error: string): Command {
  return {
    id: '',
    name: '',
    requestId: '',
    state: CommandState.COMMAND_STATE_FAILED,
    error,
    startedAt: undefined,
    finishedAt: undefined,
    progress: undefined,
    result: undefined,
  };
}
