import { type Channel, createChannel, createClientFactory, Status } from 'nice-grpc';
import { deadlineMiddleware } from 'nice-grpc-client-middleware-deadline';
import { retryMiddleware } from 'nice-grpc-client-middleware-retry';
import { agentMetadata } from '../common/agent-metadata.js';
import { clientChannelOptions, type KeepaliveOptions } from '../common/grpc-options.js';
import type { Logger } from '../common/logging.js';
import { AgentServiceDefinition } from '../gen/metalcast/v1/agent.js';

const factory = createClientFactory().use(retryMiddleware).use(deadlineMiddleware);
export type AgentServiceClient = ReturnType<typeof factory.create<typeof AgentServiceDefinition>>;

/** The calls the controller makes on an agent, with the node's token already attached. */
export interface AgentHandle {
  address: string;
  client: AgentServiceClient;
  /** Call options carrying the token; spread into each call with its own deadline. */
  auth: { metadata: ReturnType<typeof agentMetadata> };
}

/**
 * Channels to agents, one per agent address, reused across calls. Every
 * call has a deadline; idempotent calls retry on UNAVAILABLE with jittered
 * backoff (nice-grpc-client-middleware-retry), so that a blip on the
 * provisioning network does not fail a deploy.
 */
export class AgentClients {
  private readonly channels = new Map<string, { channel: Channel; client: AgentServiceClient }>();

  constructor(
    private readonly keepalive: KeepaliveOptions,
    private readonly callTimeoutMs: number,
    private readonly logger: Logger,
  ) {}

  handle(nodeUuid: string, address: string, token: string): AgentHandle {
    let entry = this.channels.get(address);
    if (!entry) {
      const channel = createChannel(address, undefined, clientChannelOptions(this.keepalive));
      entry = {
        channel,
        client: factory.create(AgentServiceDefinition, channel, {
          '*': {
            deadline: this.callTimeoutMs,
            retry: true,
            retryMaxAttempts: 4,
            retryBaseDelayMs: 500,
            retryMaxDelayMs: 5000,
            retryableStatuses: [Status.UNAVAILABLE],
            onRetryableError: (error, attempt, delayMs) =>
              this.logger.warn({ node: nodeUuid, agent: address, attempt, delayMs, reason: error.details }, 'agent call failed; retrying'),
          },
        }),
      };
      this.channels.set(address, entry);
    }
    return { address, client: entry.client, auth: { metadata: agentMetadata(nodeUuid, token) } };
  }

  /** Forgets the channel to an address (the agent went away). */
  drop(address: string): void {
    this.channels.get(address)?.channel.close();
    this.channels.delete(address);
  }

  closeAll(): void {
    for (const { channel } of this.channels.values()) channel.close();
    this.channels.clear();
  }
}
