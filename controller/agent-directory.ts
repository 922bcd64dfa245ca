import type { AgentSessions } from './agent-sessions.js';
import type { NodeRecord } from './store/store.js';

/**
 * Where a node's agent is and whether it is alive, wherever its heartbeat
 * stream landed. With several controllers the owner of a node is often not
 * the controller holding the agent's stream, so the answers come from this
 * controller's own streams first and from the database (the address and
 * the API credential stored with the node, the time of the last recorded
 * heartbeat) otherwise.
 */
export class AgentDirectory {
  constructor(
    private readonly sessions: AgentSessions,
    /** How recent a recorded heartbeat must be to count as alive: the longest heartbeat interval plus write-behind slack. */
    private readonly freshnessMs: number,
  ) {}

  /** How to call the node's agent; undefined when it cannot be called (no address or credential yet). */
  endpoint(node: NodeRecord): { address: string; token: string } | undefined {
    const address = this.sessions.agentEndpoint(node.uuid)?.address || node.agentAddress;
    if (address === '' || node.agentApiToken === null) return undefined;
    return { address, token: node.agentApiToken };
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
