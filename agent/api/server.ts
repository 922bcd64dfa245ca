import { timingSafeEqual } from 'node:crypto';
import { type CallContext, createServer, type Server, type ServerMiddleware } from 'nice-grpc';
import { HealthDefinition, HealthServiceImpl, HealthState } from 'nice-grpc-server-health';
import { agentApiToken } from '../../common/agent-credentials.js';
import { bearerToken } from '../../common/agent-metadata.js';
import { errorMappingMiddleware, notFound, unauthenticated, unavailable } from '../../common/errors.js';
import { serverChannelOptions } from '../../common/grpc-options.js';
import {
  AGENT_REQUEST_LIMIT_BYTES,
  guardRequestDecoding,
  HEALTH_REQUEST_LIMIT_BYTES,
  rejectUndecodableRequests,
} from '../../common/request-decoding.js';
import type { Logger } from '../../common/logging.js';
import { type ServerIdentity, tlsServerCredentials } from '../../common/tls.js';
import { AgentServiceDefinition, type AgentServiceImplementation } from '../../gen/metalcast/v1/agent.js';
import type { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { CommandRunner } from '../commands/runner.js';
import type { ChunkShare } from '../fanout/chunk-share.js';
import { PeerChunkServiceDefinition } from '../../gen/metalcast/v1/fanout.js';

export interface AgentServerDeps {
  runner: CommandRunner;
  /** The current agent token; undefined until the first lookup. */
  currentToken: () => string | undefined;
  inventory: () => Promise<Inventory>;
  logger: Logger;
  /** Fan-out: the chunks this agent serves to the peers of its deploy wave. */
  share?: ChunkShare;
}

function tokensEqual(expected: string, presented: string): boolean {
  const a = Buffer.from(expected);
  const b = Buffer.from(presented);
  return a.length === b.length && timingSafeEqual(a, b);
}

/**
 * Every call to the agent must carry the API credential derived from the
 * node's current agent token: the provisioning network is shared, and only
 * the controllers that handed the token out may drive this machine (any of
 * them: the derived credential is stored with the node, so whichever
 * controller owns the node can call). Health checks stay open.
 */
function agentTokenMiddleware(deps: AgentServerDeps): ServerMiddleware {
  return async function* checkToken(call, context: CallContext) {
    if (call.method.path.startsWith('/grpc.health.v1.Health/')) return yield* call.next(call.request, context);
    // Peers of a deploy wave present the wave's credential instead, which the chunk share checks (agent/fanout/chunk-share.ts).
    if (call.method.path.startsWith('/metalcast.v1.PeerChunkService/')) return yield* call.next(call.request, context);
    const token = deps.currentToken();
    if (token === undefined) throw unavailable('the agent has not looked up its node yet; retry shortly');
    const expected = agentApiToken(token);
    const presented = bearerToken(context.metadata);
    if (presented === '' || !tokensEqual(expected, presented)) {
      deps.logger.warn({ peer: context.peer, method: call.method.path }, 'call refused: wrong or missing agent token');
      throw unauthenticated("this call needs the node's current agent API credential ('authorization: Bearer <credential>')");
    }
    return yield* call.next(call.request, context);
  };
}

function createAgentService(deps: AgentServerDeps): AgentServiceImplementation {
  const { runner } = deps;
  return {
    async getInventory() {
      return { inventory: await deps.inventory() };
    },
    async runCommand(request) {
      return { command: runner.start(request.requestId, request.parameters) };
    },
    async *watchCommand(request, context) {
      for await (const command of runner.watch(request.id, context.signal)) yield { command };
    },
    async getCommand(request) {
      const command = runner.get(request.id);
      if (!command) throw notFound(`no command ${request.id.slice(0, 64)} on this agent; ListCommands shows the recent ones`);
      return { command };
    },
    async listCommands() {
      return { commands: runner.list() };
    },
  };
}

/**
 * Starts the agent's gRPC server, over TLS with `tls` (the agent's
 * self-signed identity, which the controller pins) or in plaintext without
 * it; returns it with the port actually bound.
 */
export async function startAgentServer(
  listen: string,
  keepalive: { timeMs: number; timeoutMs: number },
  deps: AgentServerDeps,
  tls?: ServerIdentity,
): Promise<{ server: Server; port: number }> {
  const health = HealthState();
  // Requests to the agent are small (a command's parameters, an id); responses (inventory, history) may not be.
  const server = createServer(serverChannelOptions(keepalive, undefined, AGENT_REQUEST_LIMIT_BYTES))
    .use(errorMappingMiddleware(deps.logger))
    .use(agentTokenMiddleware(deps))
    .use(rejectUndecodableRequests());
  server.add(guardRequestDecoding(AgentServiceDefinition, AGENT_REQUEST_LIMIT_BYTES), createAgentService(deps));
  server.add(guardRequestDecoding(HealthDefinition, HEALTH_REQUEST_LIMIT_BYTES), HealthServiceImpl(health));
  if (deps.share) server.add(guardRequestDecoding(PeerChunkServiceDefinition, AGENT_REQUEST_LIMIT_BYTES), deps.share.service());
  const port = await server.listen(listen, tls && tlsServerCredentials(tls));
  health.setStatus('healthy');
  return { server, port };
}
