import type { CallContext } from 'nice-grpc';
import { bearerToken, NODE_UUID_KEY } from '../../common/agent-metadata.js';
import { unauthenticated } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { UUID_PATTERN } from '../../common/input.js';
import { truncate } from '../../common/mac.js';
import type { NodeRecord, Store } from '../store/store.js';
import { agentTokenMatches } from '../agents/agent-tokens.js';

export interface AuthenticatedAgent {
  node: NodeRecord;
  token: string;
}

const CHECKED = Symbol('authenticated agent');

/** Checks the call's agent credential and returns the context carrying the result, for the handlers' authenticateAgent; throws as that does. */
export async function withAuthenticatedAgent(context: CallContext, store: Store, logger: Logger): Promise<CallContext> {
  const agent = await authenticateAgent(context, store, logger);
  return { ...context, [CHECKED]: agent } as CallContext;
}

/**
 * Checks an agent call's node uuid and token against the stored hash; the
 * same UNAUTHENTICATED answer for an unknown node and a wrong token. A peer
 * that fails this check too often is refused for a while before it gets
 * here (agentGatewayRateLimits in controller/auth/rate-limit.ts runs this
 * check before the request is decoded, and counts the UNAUTHENTICATED answers). The token is never logged (common/logging.ts
 * redacts it too, as a safety net).
 */
export async function authenticateAgent(context: CallContext, store: Store, logger: Logger): Promise<{ node: NodeRecord; token: string }> {
  // Checked already for this call by the gateway's middleware (agentGatewayRateLimits), before its request was decoded.
  const checked = (context as CallContext & { [CHECKED]?: AuthenticatedAgent })[CHECKED];
  if (checked) return checked;
  const nodeUuid = context.metadata.get(NODE_UUID_KEY) ?? '';
  const token = bearerToken(context.metadata);
  if (nodeUuid === '' || token === '') {
    throw unauthenticated(`this call needs '${NODE_UUID_KEY}' and 'authorization: Bearer <token>' metadata from Lookup; look up first`);
  }
  // Node uuids are lower-case v4 uuids: anything else cannot match, and costs no database read.
  const node = UUID_PATTERN.test(nodeUuid) ? await store.getNode(nodeUuid) : undefined;
  if (!node || !agentTokenMatches(node.agentTokenHash, token)) {
    logger.warn({ node: truncate(nodeUuid), peer: context.peer }, 'agent call refused: agent token not valid');
    throw unauthenticated(`the agent token is not valid for node ${truncate(nodeUuid)}; look up again`);
  }
  return { node, token };
}
