import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { hashAgentToken } from './agent-tokens.js';

interface Session {
  id: number;
  peer: string;
  /** The agent token the stream authenticated with, kept in memory only: the controller presents it when it calls the agent. */
  token: string;
  /** Its hash, to notice cheaply when the stored token changed under the stream. */
  tokenHash: string;
  /** host:port of the agent's API, from its latest heartbeat. */
  agentAddress: string;
  /** Aborting ends the heartbeat stream with the reason's status. */
  abort: (reason: MetalcastError) => void;
}

/**
 * The heartbeat streams open on this controller, one per node. It answers
 * "is this node's agent alive?" for lookup, and lets lookup, token rotation
 * and shutdown end a stream from outside its handler.
 */
export class AgentSessions {
  private readonly sessions = new Map<string, Session>();
  /** When the last stream of a node closed; tells lookup that agent is gone. */
  private readonly closedAt = new Map<string, number>();
  private nextId = 1;
  /** Set by revokeAll: a stream that authenticates after it is ended at once (shutdown must not wait for it). */
  private refusing: MetalcastError | undefined;

  get size(): number {
    return this.sessions.size;
  }

  /** Registers a stream; an older stream of the same node is ended (the agent reconnected). */
  open(nodeUuid: string, peer: string, token: string, abort: Session['abort']): number {
    const previous = this.sessions.get(nodeUuid);
    previous?.abort(new MetalcastError(Status.ABORTED, 'a newer heartbeat stream for this node replaced this one'));
    const id = this.nextId++;
    this.sessions.set(nodeUuid, { id, peer, token, tokenHash: hashAgentToken(token), agentAddress: '', abort });
    this.closedAt.delete(nodeUuid);
    if (this.refusing) abort(this.refusing);
    return id;
  }

  close(nodeUuid: string, id: number): void {
    if (this.sessions.get(nodeUuid)?.id !== id) return;
    this.sessions.delete(nodeUuid);
    this.closedAt.set(nodeUuid, Date.now());
    // Bounded: forget old closures once many have piled up.
    if (this.closedAt.size > 100_000) {
      const oldest = this.closedAt.keys().next().value;
      if (oldest !== undefined) this.closedAt.delete(oldest);
    }
  }

  /** Records the agent's advertised address from a heartbeat. */
  setAgentAddress(nodeUuid: string, id: number, address: string): void {
    const session = this.sessions.get(nodeUuid);
    if (session?.id === id && address !== '') session.agentAddress = address;
  }

  /** How to call a node's agent: its address and token, while its stream is open. */
  agentEndpoint(nodeUuid: string): { address: string; token: string } | undefined {
    const session = this.sessions.get(nodeUuid);
    return session && session.agentAddress !== '' ? { address: session.agentAddress, token: session.token } : undefined;
  }

  /**
   * True when a stream is open here with a token that is no longer the
   * node's: another controller replaced or wiped it, and could not end this
   * stream itself.
   */
  holdsStaleToken(nodeUuid: string, currentHash: string | null): boolean {
    const session = this.sessions.get(nodeUuid);
    return session !== undefined && session.tokenHash !== currentHash;
  }

  isOpen(nodeUuid: string): boolean {
    return this.sessions.has(nodeUuid);
  }

  peer(nodeUuid: string): string | undefined {
    return this.sessions.get(nodeUuid)?.peer;
  }

  /** True when this controller saw the node's stream close after `since`. */
  closedSince(nodeUuid: string, since: number): boolean {
    const closed = this.closedAt.get(nodeUuid);
    return closed !== undefined && closed >= since;
  }

  /** Ends a node's stream, for example because its token was replaced or wiped. */
  revoke(nodeUuid: string, reason: MetalcastError): void {
    this.sessions.get(nodeUuid)?.abort(reason);
  }

  /**
   * Ends every stream, and every stream opened from now on; used on shutdown
   * so that server.shutdown() is not held open, not even by a stream that was
   * still authenticating when this ran.
   */
  revokeAll(reason: MetalcastError): void {
    this.refusing = reason;
    for (const session of [...this.sessions.values()]) session.abort(reason);
  }
}
