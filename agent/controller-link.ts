import { type Channel, ClientError, createChannel, createClientFactory, Status } from 'nice-grpc';
import { deadlineMiddleware } from 'nice-grpc-client-middleware-deadline';
import { clientChannelOptions, type KeepaliveOptions } from '../common/grpc-options.js';
import type { Logger } from '../common/logging.js';
import { FastAgentGatewayServiceDefinition } from '../common/read-image-codec.js';
import type { AgentGatewayServiceDefinition } from '../gen/metalcast/v1/agent_gateway.js';

const factory = createClientFactory().use(deadlineMiddleware);
type GatewayClient = ReturnType<typeof factory.create<typeof AgentGatewayServiceDefinition>>;

/** Errors that say "this controller cannot be reached", as opposed to an answer from it. */
export function isConnectionError(error: unknown): boolean {
  return error instanceof ClientError && (error.code === Status.UNAVAILABLE || error.code === Status.DEADLINE_EXCEEDED);
}

/**
 * The agent's way to its controllers: one channel per address, created when
 * first used; on connection errors the agent moves on to the next address,
 * so that one dead controller behind a list of several does not strand it.
 */
export class ControllerLink {
  private readonly channels = new Map<string, { channel: Channel; gateway: GatewayClient }>();
  private index: number;

  constructor(
    private readonly addresses: readonly string[],
    private readonly keepalive: KeepaliveOptions,
    private readonly logger: Logger,
    /** Extra channel options; grpc-js shares one connection between channels whose options are equal. */
    private readonly extraChannelOptions: Record<string, string | number> = {},
  ) {
    // A fleet booted with the same list spreads over the controllers instead of all landing on the first.
    this.index = Math.floor(Math.random() * addresses.length);
  }

  get address(): string {
    return this.addresses[this.index] as string;
  }

  get gateway(): GatewayClient {
    let entry = this.channels.get(this.address);
    if (!entry) {
      const channel = createChannel(this.address, undefined, { ...clientChannelOptions(this.keepalive), ...this.extraChannelOptions });
      entry = { channel, gateway: factory.create(FastAgentGatewayServiceDefinition, channel) };
      this.channels.set(this.address, entry);
    }
    return entry.gateway;
  }

  /** Moves to the next controller address after a connection error. */
  next(reason: string): void {
    if (this.addresses.length < 2) return;
    const from = this.address;
    this.index = (this.index + 1) % this.addresses.length;
    this.logger.warn({ from, to: this.address, reason }, 'switching to the next controller address');
  }

  close(): void {
    for (const { channel } of this.channels.values()) channel.close();
    this.channels.clear();
  }
}
