import { ClientError, Status } from 'nice-grpc';
import type { Logger } from '../../common/logging.js';
import { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { AgentClients, AgentHandle } from '../agent-client.js';
import type { AgentSessions } from '../agent-sessions.js';
import type { NodeRecord, Store } from '../store/store.js';
import type { Provisioner } from './provisioner.js';

/** How long the controller waits for an agent to report its inventory. */
const INVENTORY_TIMEOUT_MS = 60_000;

/**
 * Acts on heartbeats: when a node's agent checks in and the node is waiting
 * for it, the conductor takes the node's lock and performs the next step
 * (inspection now; deploy and clean with the provisioning work). Heartbeats
 * never wait for it: a node already being worked on is skipped, and a lock
 * held by someone else just means "next heartbeat".
 */
export class Conductor {
  private readonly working = new Map<string, Promise<void>>();
  private stopped = false;

  constructor(
    private readonly store: Store,
    private readonly sessions: AgentSessions,
    private readonly agents: AgentClients,
    private readonly provisioner: Provisioner,
    private readonly holder: string,
    private readonly logger: Logger,
  ) {}

  /** Called for every heartbeat; returns at once. */
  onHeartbeat(nodeUuid: string): void {
    if (this.stopped || this.working.has(nodeUuid)) return;
    const work = this.advance(nodeUuid)
      .catch((error: unknown) => this.logger.error({ err: error, node: nodeUuid }, 'acting on a heartbeat failed'))
      .finally(() => this.working.delete(nodeUuid));
    this.working.set(nodeUuid, work);
  }

  /** Waits for the steps under way; new heartbeats are ignored from now on. */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.allSettled(this.working.values());
  }

  private async advance(nodeUuid: string): Promise<void> {
    const node = await this.store.getNode(nodeUuid);
    if (!node || node.maintenance) return;
    if (node.provisionState !== 'inspect_wait') return;
    const endpoint = this.sessions.agentEndpoint(nodeUuid);
    if (!endpoint) return;
    if (!(await this.store.tryLock(node.uuid, this.holder, 'inspect'))) return;
    const log = this.logger.child({ node: node.uuid, nodeName: node.name, agent: endpoint.address });
    try {
      await this.inspect(node, this.agents.handle(node.uuid, endpoint.address, endpoint.token), log);
    } finally {
      await this.store.unlock(node.uuid, this.holder);
    }
  }

  private async inspect(node: NodeRecord, agent: AgentHandle, log: Logger): Promise<void> {
    log.info('inspecting: fetching the inventory from the agent');
    let inventory: Inventory;
    try {
      const response = await agent.client.getInventory({}, { ...agent.auth, deadline: INVENTORY_TIMEOUT_MS });
      if (!response.inventory) throw new Error('the agent returned no inventory');
      inventory = response.inventory;
    } catch (error) {
      await this.fail(node, `inspection failed: could not get the inventory from the agent at ${agent.address}: ${describe(error)}`, log);
      return;
    }
    const found = new Set(inventory.interfaces.map((nic) => nic.macAddress.toLowerCase()));
    const missing = node.macAddresses.filter((mac) => !found.has(mac));
    if (missing.length > 0) {
      await this.fail(
        node,
        `inspection failed: enrolled MAC ${missing.join(', ')} not found on the machine (it has ${[...found].join(', ') || 'no NICs'}); fix the node's ports`,
        log,
      );
      return;
    }
    const updated = await this.provisioner.move(
      node,
      'inspect_wait',
      'manageable',
      null,
      'controller',
      `inspection found ${inventory.disks.length} disks, ${inventory.interfaces.length} NICs, ${inventory.cpu?.count ?? 0} CPUs`,
      '',
      { inventoryJson: JSON.stringify(Inventory.toJSON(inventory)) },
    );
    log.info({ disks: inventory.disks.length, nics: inventory.interfaces.length, state: updated.provisionState }, 'inspection finished');
  }

  private async fail(node: NodeRecord, reason: string, log: Logger): Promise<void> {
    log.warn({ reason }, 'inspection failed');
    await this.provisioner.move(node, 'inspect_wait', 'inspect_failed', null, 'controller', 'inspect', reason);
  }
}

function describe(error: unknown): string {
  if (error instanceof ClientError) return `${Status[error.code]}: ${error.details}`;
  return (error as Error).message;
}
