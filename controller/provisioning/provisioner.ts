import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { AgentSessions } from '../agent-sessions.js';
import type { NodeRecord, Store, Transition } from '../store/store.js';
import { ACTION_TRANSITIONS, allowedActions, isAgentState, type ProvisionAction, type ProvisionState } from './states.js';

const human = (state: ProvisionState) => state.replaceAll('_', ' ');

/**
 * Runs operator actions against the state table. Each step is a
 * compare-and-set on the provision state, so two operators racing on the
 * same node cannot both win.
 */
export class Provisioner {
  constructor(
    private readonly store: Store,
    private readonly sessions: AgentSessions,
    private readonly logger: Logger,
  ) {}

  async runAction(node: NodeRecord, action: ProvisionAction, actor: string): Promise<NodeRecord> {
    const step = ACTION_TRANSITIONS[action][node.provisionState];
    if (!step) {
      const allowed = allowedActions(node.provisionState);
      throw new MetalcastError(
        Status.FAILED_PRECONDITION,
        `cannot ${action} node '${node.name}' in state ${human(node.provisionState)}; allowed from ${human(node.provisionState)}: ${allowed.length ? allowed.join(', ') : 'no action'}`,
      );
    }
    if (node.maintenance && action !== 'abort') {
      throw new MetalcastError(
        Status.FAILED_PRECONDITION,
        `node '${node.name}' is in maintenance (${node.maintenanceReason}); take it out of maintenance first`,
      );
    }
    switch (action) {
      case 'manage':
        return this.move(node, node.provisionState, step.to, step.target === step.to ? null : step.target, actor, action, '');
      case 'inspect': {
        const inspecting = await this.move(node, node.provisionState, 'inspecting', 'manageable', actor, action, '');
        // Nothing to prepare before the agent boots yet (power control comes later): wait for it.
        return this.move(inspecting, 'inspecting', 'inspect_wait', 'manageable', 'controller', 'inspect');
      }
      case 'abort':
        return this.move(
          node,
          node.provisionState,
          step.to,
          null,
          actor,
          action,
          `aborted by ${actor} while in ${human(node.provisionState)}`,
        );
      default:
        throw new MetalcastError(Status.UNIMPLEMENTED, `the ${action} action is not implemented in this controller version yet`);
    }
  }

  /** One compare-and-set transition with its event; ABORTED if the node moved meanwhile. */
  async move(
    node: NodeRecord,
    from: ProvisionState,
    to: ProvisionState,
    target: ProvisionState | null,
    actor: string,
    reason: string,
    lastError?: string,
    also: Pick<Transition, 'inventoryJson' | 'deployJson'> = {},
  ): Promise<NodeRecord> {
    const keepAgentToken = isAgentState(to);
    const updated = await this.store.transition(node.uuid, {
      ...also,
      from: [from],
      to,
      target,
      lastError,
      keepAgentToken,
      event: {
        kind: 'transition',
        message: lastError ? `${human(from)} -> ${human(to)}: ${lastError}` : `${human(from)} -> ${human(to)} (${reason})`,
        actor,
        fromState: from,
        toState: to,
      },
    });
    if (!updated) {
      throw new MetalcastError(
        Status.ABORTED,
        `node '${node.name}' changed state while ${reason} was starting; look at it again and retry`,
      );
    }
    if (!keepAgentToken) {
      this.sessions.revoke(
        node.uuid,
        new MetalcastError(Status.UNAUTHENTICATED, `node left the agent states (now ${human(to)}); the agent token is no longer valid`),
      );
    }
    this.logger.info({ node: node.uuid, nodeName: node.name, from, to, actor }, 'provision state changed');
    return updated;
  }
}
