import { createHmac } from 'node:crypto';

/**
 * The credential a controller presents when it calls an agent, derived from
 * the agent token the agent got at lookup. The agent token itself is stored
 * only as a hash (it proves the agent to the controller); this derived one
 * is stored as it is, so that whichever controller owns the node can call
 * the agent, not only the one holding its heartbeat stream. Knowing it does
 * not let anyone pose as the agent, because the token cannot be recovered
 * from it.
 */
export function agentApiToken(agentToken: string): string {
  return createHmac('sha256', agentToken).update('metalcast agent api v1').digest('base64url');
}
