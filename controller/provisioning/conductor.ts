import { setTimeout as sleep } from 'node:timers/promises';
import { ClientError, Status } from 'nice-grpc';
import { pickDisk } from '../../common/disk-hints.js';
import type { Logger } from '../../common/logging.js';
import { type Command, CommandState, EraseMode } from '../../gen/metalcast/v1/command.js';
import { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { AgentClients, AgentHandle } from '../agent-client.js';
import type { AgentSessions } from '../agent-sessions.js';
import type { HeldLock, NodeLocks } from '../locks.js';
import type { NodeFeed } from '../node-feed.js';
import type { NodeRecord, Store } from '../store/store.js';
import type { Admission } from './admission.js';
import type { DeploySpecRecord, Provisioner } from './provisioner.js';
import { describeError as describe } from '../../common/errors.js';

/** How long the controller waits for an agent to report its inventory. */
const INVENTORY_TIMEOUT_MS = 60_000;
/** A WatchCommand stream is renewed after this, so that no call runs unbounded. */
const WATCH_DEADLINE_MS = 10 * 60_000;
/** Polling interval when the watch stream broke. */
const POLL_INTERVAL_MS = 2000;

export interface ConductorOptions {
  holder: string;
  finalPower: 'reboot' | 'power_off' | 'none';
  verifyReadback: boolean;
  stallTimeoutMs: number;
  transferAttempts: number;
  cleanMode: 'quick' | 'full';
  deploys: Admission;
  cleans: Admission;
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
 * Every command carries a request id derived from the node's current wait,
 * so a controller that restarts or loses track of a command and sends it
 * again gets the command already running instead of a second one.
 */
export class Conductor {
  private readonly working = new Map<string, Promise<void>>();
  private readonly stopping = new AbortController();

  constructor(
    private readonly store: Store,
    private readonly sessions: AgentSessions,
    private readonly agents: AgentClients,
    private readonly provisioner: Provisioner,
    private readonly locks: NodeLocks,
    private readonly feed: NodeFeed,
    private readonly options: ConductorOptions,
    private readonly logger: Logger,
  ) {}

  /** Called for every heartbeat; returns at once. */
  onHeartbeat(nodeUuid: string): void {
    if (this.stopping.signal.aborted || this.working.has(nodeUuid)) return;
    const work = this.advance(nodeUuid)
      .catch((error: unknown) => {
        if (!this.stopping.signal.aborted) this.logger.error({ err: error, node: nodeUuid }, 'acting on a heartbeat failed');
      })
      .finally(() => this.working.delete(nodeUuid));
    this.working.set(nodeUuid, work);
  }

  /** Stops following agents (they carry on; a restarted controller picks them up) and releases the locks. */
  async stop(): Promise<void> {
    this.stopping.abort();
    await Promise.allSettled(this.working.values());
  }

  private async advance(nodeUuid: string): Promise<void> {
    const seen = await this.store.getNode(nodeUuid);
    if (!seen || seen.maintenance) return;
    const step = { inspect_wait: 'inspect', deploy_wait: 'deploy', clean_wait: 'clean' }[seen.provisionState as string] as
      | 'inspect'
      | 'deploy'
      | 'clean'
      | undefined;
    if (!step) return;
    const signal = this.stopping.signal;
    const admission = step === 'deploy' ? this.options.deploys : step === 'clean' ? this.options.cleans : undefined;
    const leave = admission ? await admission.enter(signal) : () => {};
    let lock: HeldLock | undefined;
    try {
      lock = await this.locks.lockPatiently(nodeUuid, step, signal);
      // The node may have moved while we waited: act on what it is now.
      const node = await this.store.getNode(nodeUuid);
      const endpoint = this.sessions.agentEndpoint(nodeUuid);
      if (!node || node.maintenance || node.provisionState !== seen.provisionState || !endpoint) return;
      const agent = this.agents.handle(node.uuid, endpoint.address, endpoint.token);
      const log = this.logger.child({ node: node.uuid, nodeName: node.name, agent: endpoint.address, step });
      if (step === 'inspect') await this.inspect(node, agent, log);
      else if (step === 'deploy') await this.deploy(node, agent, log);
      else await this.clean(node, agent, log);
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
      const response = await agent.client.getInventory({}, { ...agent.auth, deadline: INVENTORY_TIMEOUT_MS, signal: this.stopping.signal });
      if (!response.inventory) throw new Error('the agent returned no inventory');
      inventory = response.inventory;
    } catch (error) {
      this.rethrowIfGone(node, error);
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
      'controller',
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
        { ...agent.auth, deadline: INVENTORY_TIMEOUT_MS, signal: this.stopping.signal },
      );
      devicePath = pickDisk(inventory?.disks ?? [], spec.target, image.sizeBytes).devicePath;
    } catch (error) {
      this.rethrowIfGone(node, error);
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
    if (final.state !== CommandState.COMMAND_STATE_SUCCEEDED) {
      await this.fail(node, 'deploy_wait', 'deploy_failed', `write_image failed: ${final.error}`, log);
      return;
    }
    const written = final.result?.result?.$case === 'writeImage' ? final.result.result.value : undefined;
    if (this.options.finalPower !== 'none') {
      const command =
        this.options.finalPower === 'reboot' ? { $case: 'reboot' as const, value: {} } : { $case: 'powerOff' as const, value: {} };
      try {
        await agent.client.runCommand(
          { requestId: `${requestId}:final-power`, parameters: { command } },
          { ...agent.auth, signal: this.stopping.signal },
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
      'controller',
      `image written to ${devicePath}`,
    );
    await this.provisioner.move(
      deploying,
      'deploying',
      'active',
      null,
      'controller',
      `deployed ${image.name} to ${devicePath}: ${written?.writtenBytes ?? image.sizeBytes} bytes, sha256 ${image.sha256.slice(0, 12)}…, ${written?.resumes ?? 0} resumes; final power: ${this.options.finalPower}`,
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
    const cleaning = await this.provisioner.move(
      node,
      'clean_wait',
      'cleaning',
      'available',
      'controller',
      `${this.options.cleanMode} erase of ${erased.join(', ')}`,
    );
    await this.provisioner.move(cleaning, 'cleaning', 'available', null, 'controller', 'cleaning finished', '', { deployJson: null });
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
    const signal = this.stopping.signal;
    let started: Command | undefined;
    try {
      started = (await agent.client.runCommand({ requestId, parameters: { command } }, { ...agent.auth, signal })).command;
    } catch (error) {
      this.rethrowIfGone(node, error);
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
        if (!this.sessions.isOpen(node.uuid)) throw new AgentGone('the agent heartbeat stream closed');
        try {
          const { command: current } = await agent.client.getCommand({ id: started.id }, { ...agent.auth, signal, deadline: 10_000 });
          if (current && current.state !== CommandState.COMMAND_STATE_RUNNING) return current;
          if (current?.progress) this.feed.publish({ node, progress: current.progress });
        } catch (error) {
          signal.throwIfAborted();
          this.rethrowIfGone(node, error);
        }
        await sleep(POLL_INTERVAL_MS, undefined, { signal });
      }
    }
  }

  /** Transport failures with the agent's stream gone mean "agent gone", not "step failed". */
  private rethrowIfGone(node: NodeRecord, error: unknown): void {
    if (this.stopping.signal.aborted) throw error;
    const transport =
      error instanceof ClientError &&
      [Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED, Status.UNAUTHENTICATED].includes(error.code);
    if (transport && !this.sessions.isOpen(node.uuid)) throw new AgentGone(describe(error));
  }

  private async fail(
    node: NodeRecord,
    from: 'inspect_wait' | 'deploy_wait' | 'clean_wait',
    to: 'inspect_failed' | 'deploy_failed' | 'clean_failed',
    reason: string,
    log: Logger,
  ): Promise<void> {
    log.warn({ reason }, `${to.replace('_', ' ')}`);
    await this.provisioner.move(node, from, to, null, 'controller', reason, reason);
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
