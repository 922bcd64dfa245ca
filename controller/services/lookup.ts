import type { CallContext } from 'nice-grpc';
import { notFound } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { normaliseMacList, truncate } from '../../common/mac.js';
import type { LookupRequest, LookupResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import type { AgentSessions } from '../agents/agent-sessions.js';
import type { ControllerMetrics } from '../observability/metrics.js';
import { isAgentState } from '../provisioning/states.js';
import type { Store } from '../store/store.js';
import { agentApiToken } from '../../common/agent-credentials.js';
import { generateAgentToken, hashAgentToken } from '../agents/agent-tokens.js';
import { validateLookup } from './validation.js';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';

export interface LookupDeps {
  store: Store;
  sessions: AgentSessions;
  metrics: ControllerMetrics;
  logger: Logger;
  heartbeat: { intervalMinMs: number; intervalMaxMs: number; timeoutMs: number };
}

/**
 * Lookup: an agent that just booted asks which node it is, by its MACs.
 * Every failed lookup of well-formed MACs (unknown MACs, a node in a state
 * that expects no agent, MACs of several nodes, a node whose agent is still
 * alive) gets the same NOT_FOUND, so that a stranger learns nothing about
 * the fleet; the log and metalcast_lookups_total{result} tell them apart.
 */
export function createLookupHandler(deps: LookupDeps) {
  const { store, sessions, metrics, heartbeat } = deps;
  return async function lookup(request: LookupRequest, context: CallContext): Promise<LookupResponse> {
    const log = deps.logger.child({ call: 'Lookup', peer: context.peer });
    let macs: string[];
    try {
      macs = normaliseMacList(request.macAddresses);
      validateLookup(request);
    } catch (error) {
      metrics.lookups.inc({ result: 'invalid' });
      throw error;
    }

    const candidates = (await store.findNodesByMacs(macs)).filter((node) => isAgentState(node.provisionState));
    const notFoundError = notFound(
      `no node waiting for an agent has any of the MAC addresses ${macs.join(', ')}; check that the node is enrolled with these MACs (metalcast node show) and that inspect, provide or deploy was started on it`,
    );
    if (candidates.length === 0) {
      metrics.lookups.inc({ result: 'not_found' });
      log.info({ macs }, 'lookup found no node waiting for an agent');
      throw notFoundError;
    }
    if (candidates.length > 1) {
      metrics.lookups.inc({ result: 'not_found' });
      log.warn({ macs, nodes: candidates.map((n) => n.name) }, 'lookup MACs match several nodes; fix their ports');
      throw notFoundError;
    }
    const node = candidates[0] as (typeof candidates)[0];
    const nodeLog = log.child({ node: node.uuid, nodeName: node.name });

    // An agent that is alive keeps its token: a second token would strand it.
    // One whose stream closed after its last heartbeat is gone, and its
    // replacement (the same machine, restarted) gets a fresh token.
    const streamOpen = sessions.isOpen(node.uuid);
    const recentlyHeard =
      node.lastHeartbeatAt !== null &&
      Date.now() - node.lastHeartbeatAt < heartbeat.intervalMaxMs &&
      !sessions.closedSince(node.uuid, node.lastHeartbeatAt);
    if (node.agentTokenHash !== null && (streamOpen || recentlyHeard)) {
      metrics.lookups.inc({ result: 'agent_alive' });
      // The operator sees who holds the node in the log; the caller gets the same NOT_FOUND as for an
      // unknown MAC, so that asking with a neighbour's MACs tells a stranger neither that the node exists,
      // nor its name, nor where its agent runs.
      nodeLog.warn(
        { agentPeer: sessions.peer(node.uuid), streamOpen },
        'lookup refused: the node already has a live agent; a second agent is refused until that one disconnects or times out',
      );
      throw notFoundError;
    }

    const token = generateAgentToken();
    await store.setAgentToken(node.uuid, hashAgentToken(token), agentApiToken(token));
    // A stream still bound to the old token must not outlive it.
    sessions.revoke(node.uuid, new MetalcastError(Status.UNAUTHENTICATED, 'the agent token was replaced by a newer lookup; look up again'));
    metrics.lookups.inc({ result: 'found' });
    nodeLog.info({ agentVersion: truncate(request.agentVersion), state: node.provisionState }, 'agent looked up its node');
    return {
      nodeUuid: node.uuid,
      agentToken: token,
      heartbeatIntervalMinMs: heartbeat.intervalMinMs,
      heartbeatIntervalMaxMs: heartbeat.intervalMaxMs,
      heartbeatTimeoutMs: heartbeat.timeoutMs,
      config: { logLevel: '' },
    };
  };
}
