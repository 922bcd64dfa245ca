import type { Logger } from '../../common/logging.js';
import type { AgentSessions } from './agent-sessions.js';
import type { NodeRecord } from '../store/store.js';

/** How this controller may call agents. */
export interface AgentCallPolicy {
  /** --insecure: an agent without a pinned certificate (a plaintext agent) is called in plaintext. Otherwise it is not called at all. */
  allowPlaintext: boolean;
  logger: Logger;
}

/**
 * Where a node's agent is and whether it is alive, wherever its heartbeat
 * stream landed. With several controllers the owner of a node is often not
 * the controller holding the agent's stream, so the answers come from this
 * controller's own streams first and from the database (the address and
 * the API credential stored with the node, the time of the last recorded
 * heartbeat) otherwise.
 */
export class AgentDirectory {
  /** Nodes already logged as not callable yet (no pinned certificate), by the token hash they had then: one line per lookup. */
  private readonly refused = new Map<string, string | null>();

  constructor(
    private readonly sessions: AgentSessions,
    /** How recent a recorded heartbeat must be to count as alive: the longest heartbeat interval plus write-behind slack. */
    private readonly freshnessMs: number,
    private readonly policy: AgentCallPolicy,
  ) {}

  /**
   * How to call the node's agent: its address, the API credential, and the
   * certificate pinned for it (null: plaintext). Undefined when it cannot be
   * called yet: no address or credential, or no certificate pinned since the
   * lookup while this controller speaks only TLS (the agent's next heartbeat
   * pins it and moves the node on; the sweep fails the node if none comes).
   */
  endpoint(node: NodeRecord): { address: string; token: string; certificatePem: string | null } | undefined {
    const address = this.sessions.agentEndpoint(node.uuid)?.address || node.agentAddress;
    if (address === '' || node.agentApiToken === null) return undefined;
    if (node.agentCertificatePem === null && !this.policy.allowPlaintext) {
      // A heartbeat without a certificate is refused (FAILED_PRECONDITION, logged by the heartbeat service), so
      // no pinned certificate here means that the agent has not heartbeated since its lookup gave it this
      // token: its first heartbeat pins the certificate and moves the node on. Between the two, the node
      // waits; that is normal (an agent that looked up again), not a misconfigured agent, so it is no warning.
      if (this.refused.get(node.uuid) !== node.agentTokenHash) {
        this.refused.set(node.uuid, node.agentTokenHash);
        if (this.refused.size > 10_000) this.refused.clear();
        this.policy.logger.debug(
          { node: node.uuid, nodeName: node.name, agent: address },
          'agent not called yet: its first heartbeat since the lookup, which pins its certificate, has not come',
        );
      }
      return undefined;
    }
    return { address, token: node.agentApiToken, certificatePem: node.agentCertificatePem };
  }

  /** Whether the agent is heard from: a stream open here, or a recent heartbeat recorded by any controller. */
  isAlive(node: NodeRecord, now = Date.now()): boolean {
    if (this.sessions.isOpen(node.uuid)) return true;
    const heard = node.lastHeartbeatAt;
    if (heard === null || now - heard > this.freshnessMs) return false;
    // A stream that closed here after that heartbeat means the agent left (or moved; then a newer heartbeat shows it).
    return !this.sessions.closedSince(node.uuid, heard);
  }
}
