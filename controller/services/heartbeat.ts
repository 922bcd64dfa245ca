import { abortable, isAbortError } from 'abort-controller-x';
import { type CallContext, ServerError, Status } from 'nice-grpc';
import { invalidArgument, MetalcastError, unauthenticated } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { truncate } from '../../common/mac.js';
import { CommandProgress } from '../../gen/metalcast/v1/command.js';
import { AgentStatus, type HeartbeatRequest, type HeartbeatResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import type { AgentSessions } from '../agent-sessions.js';
import type { HeartbeatRecorder } from '../heartbeat-recorder.js';
import type { ControllerMetrics } from '../metrics.js';
import type { Store } from '../store/store.js';
import { agentTokenMatches } from '../tokens.js';
import { authenticateAgent } from './agent-auth.js';

export interface HeartbeatDeps {
  store: Store;
  sessions: AgentSessions;
  recorder: HeartbeatRecorder;
  metrics: ControllerMetrics;
  logger: Logger;
  heartbeat: { intervalMinMs: number; intervalMaxMs: number };
  /** Told about every heartbeat after it is recorded; must not block. */
  onHeartbeat: (nodeUuid: string) => void;
}

const AGENT_ADDRESS = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):\d{1,5}$/;

/**
 * The heartbeat stream: authenticated once when it opens and bound to its
 * node; every heartbeat is recorded in memory (written in batches) and
 * acknowledged at once with a jittered next interval, so that nothing on
 * the per-heartbeat path waits on the database.
 */
export function createHeartbeatHandler(deps: HeartbeatDeps) {
  const { store, sessions, recorder, metrics, heartbeat } = deps;

  function nextIntervalMs(): number {
    const { intervalMinMs: min, intervalMaxMs: max } = heartbeat;
    return Math.round(min + Math.random() * (max - min));
  }

  return async function* heartbeatStream(
    requests: AsyncIterable<HeartbeatRequest>,
    context: CallContext,
  ): AsyncGenerator<HeartbeatResponse> {
    const { node, token } = await authenticateAgent(context, store, deps.logger);

    const log = deps.logger.child({ node: node.uuid, nodeName: node.name, peer: context.peer });
    const stop = new AbortController();
    const onCallAborted = () => stop.abort();
    context.signal.addEventListener('abort', onCallAborted);
    let endReason: MetalcastError | undefined;
    const sessionId = sessions.open(node.uuid, context.peer, token, (reason) => {
      endReason = reason;
      stop.abort();
    });
    // A lookup may have replaced the token between the check above and the
    // registration: it ended the streams it saw, not this one. Check again.
    const current = await store.getNode(node.uuid);
    if (!current || !agentTokenMatches(current.agentTokenHash, token)) {
      sessions.close(node.uuid, sessionId);
      context.signal.removeEventListener('abort', onCallAborted);
      throw unauthenticated('the agent token was replaced while the stream opened; look up again');
    }
    log.info('heartbeat stream opened');
    const iterator = requests[Symbol.asyncIterator]();
    let count = 0;
    try {
      while (true) {
        const next = await abortable(stop.signal, iterator.next());
        if (next.done) {
          log.info({ heartbeats: count }, 'agent closed its heartbeat stream');
          return;
        }
        const hb = next.value;
        if (hb.agentAddress !== '' && (hb.agentAddress.length > 260 || !AGENT_ADDRESS.test(hb.agentAddress))) {
          throw invalidArgument(`agent_address: '${truncate(hb.agentAddress)}' is not of the form host:port`);
        }
        if (hb.agentVersion.length > 128) throw invalidArgument('agent_version: at most 128 characters');
        count++;
        metrics.heartbeats.inc();
        const progress = hb.command?.progress;
        recorder.record({
          nodeUuid: node.uuid,
          time: Date.now(),
          agentAddress: hb.agentAddress,
          agentVersion: hb.agentVersion,
          agentStatus: hb.status === AgentStatus.AGENT_STATUS_BUSY ? 'busy' : hb.status === AgentStatus.AGENT_STATUS_IDLE ? 'idle' : '',
          progressJson: progress ? JSON.stringify(CommandProgress.toJSON(progress)) : null,
        });
        sessions.setAgentAddress(node.uuid, sessionId, hb.agentAddress);
        deps.onHeartbeat(node.uuid);
        log.debug({ sequence: hb.sequence }, 'heartbeat');
        yield { sequence: hb.sequence, nextIntervalMs: nextIntervalMs(), config: { logLevel: '' } };
      }
    } catch (error) {
      if (endReason) {
        log.info({ reason: endReason.message }, 'heartbeat stream ended by the controller');
        throw new ServerError(endReason.status, endReason.message);
      }
      if (isAbortError(error)) {
        log.info({ heartbeats: count }, 'heartbeat stream cancelled or connection lost');
      }
      throw error;
    } finally {
      context.signal.removeEventListener('abort', onCallAborted);
      sessions.close(node.uuid, sessionId);
      void iterator.return?.();
    }
  };
}

export const SHUTTING_DOWN = new MetalcastError(Status.UNAVAILABLE, 'the controller is shutting down; reconnect shortly');
