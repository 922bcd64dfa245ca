import { abortable, isAbortError } from 'abort-controller-x';
import { type CallContext, ServerError, Status } from 'nice-grpc';
import type { X509Certificate } from 'node:crypto';
import { failedPrecondition, invalidArgument, MetalcastError, unauthenticated } from '../../common/errors.js';
import { fingerprint, parseCertificates } from '../../common/tls.js';
import type { Logger } from '../../common/logging.js';
import { CommandProgress, CommandState } from '../../gen/metalcast/v1/command.js';
import { AgentStatus, type HeartbeatRequest, type HeartbeatResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import type { AgentSessions } from '../agents/agent-sessions.js';
import type { HeartbeatRecorder } from '../agents/heartbeat-recorder.js';
import type { ControllerMetrics } from '../observability/metrics.js';
import type { Store } from '../store/store.js';
import { agentTokenMatches, hashAgentToken } from '../agents/agent-tokens.js';
import { validateHeartbeat } from './validation.js';
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
  /**
   * Refuse a stream whose first heartbeat carries no agent_certificate_pem:
   * a controller with TLS calls agents only over TLS, pinned to that
   * certificate, so such an agent could never be given a command.
   */
  requireAgentCertificate?: boolean;
}

/** Why a stream without a certificate is refused, for the agent (the gRPC status) and the operator (the node's last_error). */
export const NO_AGENT_CERTIFICATE =
  'heartbeat without agent_certificate_pem: this controller serves TLS and calls agents only over TLS, pinned to the certificate each agent sends with the first heartbeat of its stream; run the agent with --ca (metalcast.ca= on the kernel command line) so that it serves TLS and sends its certificate';

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
    /** The last sequence number accepted on this stream; 0 before the first heartbeat. */
    let lastSequence = 0;
    /** Fingerprint of the agent certificate this stream pinned or found pinned; later ones must match it. */
    let pinned: string | undefined;
    try {
      while (true) {
        const next = await abortable(stop.signal, iterator.next());
        if (next.done) {
          log.info({ heartbeats: count }, 'agent closed its heartbeat stream');
          return;
        }
        const hb = next.value;
        validateHeartbeat(hb);
        checkSequence(hb.sequence, lastSequence);
        lastSequence = hb.sequence;
        if (count === 0 && hb.agentCertificatePem === '' && deps.requireAgentCertificate) {
          // Before, this was accepted and the node waited for its heartbeat timeout, explained only in
          // the controller's log; the agent now hears why at once (and can say so in its own log).
          log.warn({ agentVersion: hb.agentVersion }, 'refused a heartbeat stream without an agent certificate');
          throw failedPrecondition(NO_AGENT_CERTIFICATE);
        }
        if (hb.agentCertificatePem !== '') pinned = await pinCertificate(hb.agentCertificatePem, pinned);
        count++;
        metrics.heartbeats.inc();
        // Progress belongs to the running command only: a finished command's last progress is history
        // (an agent keeps reporting its last command, e.g. "erasing sda 100 %" long after the clean).
        const running = hb.command?.state === CommandState.COMMAND_STATE_RUNNING;
        const progress = running ? hb.command?.progress : undefined;
        recorder.record({
          nodeUuid: node.uuid,
          time: Date.now(),
          agentAddress: hb.agentAddress,
          agentVersion: hb.agentVersion,
          agentStatus: hb.status === AgentStatus.AGENT_STATUS_BUSY ? 'busy' : hb.status === AgentStatus.AGENT_STATUS_IDLE ? 'idle' : '',
          progressJson: progress ? JSON.stringify(CommandProgress.toJSON(progress)) : hb.command && !running ? '' : null,
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

    /**
     * The agent's certificate: pinned for the node by the first heartbeat
     * that carries one after a lookup (compare-and-set on the token, so
     * that of two streams with one token only one pins), and after that
     * every certificate presented, in this stream or a later one with the
     * same token, must be that one.
     */
    async function pinCertificate(pem: string, streamPin: string | undefined): Promise<string> {
      const certificate = agentCertificate(pem);
      const presented = fingerprint(certificate);
      if (streamPin !== undefined) {
        if (presented !== streamPin) refuseCertificate(presented, streamPin);
        return streamPin;
      }
      const outcome = await store.pinAgentCertificate(node.uuid, hashAgentToken(token), certificate.toString());
      if (outcome === 'stale') throw unauthenticated('the agent token was replaced by a newer lookup; look up again');
      if (outcome === 'different') {
        const stored = (await store.getNode(node.uuid))?.agentCertificatePem;
        refuseCertificate(presented, stored ? fingerprint(agentCertificate(stored)) : 'none');
      }
      if (outcome === 'pinned') {
        log.info(
          { fingerprint: presented, subject: certificate.subject, validTo: certificate.validTo },
          'agent certificate pinned for this node',
        );
      }
      return presented;
    }

    function refuseCertificate(presented: string, expected: string): never {
      log.warn({ presented, pinned: expected }, 'agent certificate differs from the one pinned for this node');
      throw unauthenticated(
        'this agent certificate differs from the one pinned for the node since its lookup; an agent that made a new key must look up again',
      );
    }
  };
}

/**
 * The sequence contract (proto HeartbeatRequest.sequence): a stream starts at
 * 1 and only goes up; gaps are allowed, repeats and steps back are not. A
 * heartbeat that breaks it is refused with INVALID_ARGUMENT, which ends the
 * stream before anything of it is recorded.
 */
export function checkSequence(sequence: number, last: number): void {
  if (last === 0 && sequence !== 1) {
    throw invalidArgument(`sequence: the first heartbeat of a stream is 1, got ${sequence}; open a new stream and number it from 1`);
  }
  if (last !== 0 && sequence <= last) {
    throw invalidArgument(
      `sequence: ${sequence} after ${last}; the heartbeats of a stream are numbered upwards without repeats; open a new stream and number it from 1`,
    );
  }
}

/** Largest agent certificate accepted: a self-signed P-256 certificate is well under 1 KiB. */
const MAX_AGENT_CERTIFICATE_BYTES = 8 * 1024;

/** The one X.509 certificate in an agent's agent_certificate_pem, or INVALID_ARGUMENT saying what is wrong with it. */
export function agentCertificate(pem: string): X509Certificate {
  if (Buffer.byteLength(pem) > MAX_AGENT_CERTIFICATE_BYTES) {
    throw invalidArgument(`agent_certificate_pem: at most ${MAX_AGENT_CERTIFICATE_BYTES} bytes`);
  }
  if (/PRIVATE KEY-----/.test(pem)) throw invalidArgument('agent_certificate_pem: holds a private key; send the certificate only');
  let certificates: X509Certificate[];
  try {
    certificates = parseCertificates(pem, 'agent_certificate_pem');
  } catch (error) {
    throw invalidArgument((error as Error).message);
  }
  if (certificates.length !== 1) throw invalidArgument(`agent_certificate_pem: one certificate expected, got ${certificates.length}`);
  const certificate = certificates[0] as X509Certificate;
  if (Date.parse(certificate.validTo) < Date.now()) {
    throw invalidArgument(`agent_certificate_pem: the certificate expired on ${certificate.validTo}; restart the agent to make a new one`);
  }
  return certificate;
}

export const SHUTTING_DOWN = new MetalcastError(Status.UNAVAILABLE, 'the controller is shutting down; reconnect shortly');
