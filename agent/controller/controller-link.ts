import { type Channel, ClientError, createChannel, createClientFactory, Status } from 'nice-grpc';
import { deadlineMiddleware } from 'nice-grpc-client-middleware-deadline';
import { clientChannelOptions, type KeepaliveOptions } from '../../common/grpc-options.js';
import { describeError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { FastAgentGatewayServiceDefinition } from '../../common/read-image-codec.js';
import { diagnoseConnectionFailure, nothingAnswered } from '../../common/endpoint-probe.js';
import { tlsClient } from '../../common/tls.js';
import type { AgentGatewayServiceDefinition } from '../../gen/metalcast/v1/agent_gateway.js';
import type { LaneEndpoint } from '../imaging/lanes/lane-protocol.js';

const factory = createClientFactory().use(deadlineMiddleware);
type GatewayClient = ReturnType<typeof factory.create<typeof AgentGatewayServiceDefinition>>;

/** Errors that say "this controller cannot be reached", as opposed to an answer from it. */
export function isConnectionError(error: unknown): boolean {
  return error instanceof ClientError && (error.code === Status.UNAVAILABLE || error.code === Status.DEADLINE_EXCEEDED);
}

/** How the agent reaches its controllers: TLS verified against a CA bundle, or plaintext (--insecure). */
export interface ControllerLinkTls {
  /** PEM CA bundle the controllers' certificates must chain to. */
  caPem: string;
  /** Where it came from, for messages: "--ca /etc/metalcast/ca.pem". */
  source: string;
}

/** A TLS explanation is logged at most this often per controller address. */
const EXPLAIN_INTERVAL_MS = 60_000;

/**
 * The agent's way to its controllers: one channel per address, created when
 * first used; on connection errors the agent moves on to the next address,
 * so that one dead controller behind a list of several does not strand it.
 */
export class ControllerLink {
  private readonly channels = new Map<string, { channel: Channel; gateway: GatewayClient }>();
  private index: number;
  /** When each address last had its connection failure explained. */
  private readonly explained = new Map<string, number>();
  /** What the last explanation found, by address. */
  private readonly diagnoses = new Map<string, string>();

  constructor(
    private readonly addresses: readonly string[],
    private readonly keepalive: KeepaliveOptions,
    private readonly logger: Logger,
    /** Extra channel options; grpc-js shares one connection between channels whose options are equal. */
    private readonly extraChannelOptions: Record<string, string | number> = {},
    /** TLS to the controllers; undefined: plaintext (--insecure, benchmarks). */
    private readonly tls?: ControllerLinkTls,
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
      const tls = this.tls && tlsClient(this.address, { caPem: this.tls.caPem });
      const channel = createChannel(this.address, tls?.credentials, {
        ...clientChannelOptions(this.keepalive),
        ...tls?.channelOptions,
        ...this.extraChannelOptions,
      });
      entry = { channel, gateway: factory.create(FastAgentGatewayServiceDefinition, channel) };
      this.channels.set(this.address, entry);
    }
    return entry.gateway;
  }

  /** What a lane worker needs to open its own connection to the current controller (agent/imaging/lanes). */
  laneEndpoint(): LaneEndpoint {
    return { address: this.address, caPem: this.tls?.caPem, keepalive: this.keepalive };
  }

  /** Moves to the next controller address after a connection error. */
  next(reason: string): void {
    if (this.addresses.length < 2) return;
    const from = this.address;
    this.index = (this.index + 1) % this.addresses.length;
    this.logger.warn({ from, to: this.address, reason }, 'switching to the next controller address');
  }

  /**
   * Works out, and logs as an error an operator can act on, why a connection
   * failed when it is not simply "nothing listens there": the address is an
   * HTTP endpoint (the controller's metrics port, printed next to its gRPC
   * port), this agent and the controller disagree on TLS, or the controller's
   * certificate is not one this agent can trust. grpc-js says only "failed to
   * connect" when a plaintext client meets a TLS server, so the address is
   * asked what it speaks. Probes and logs at most once a minute per address;
   * the finding is kept for {@link diagnosis}, so that every lookup failure
   * says it instead of "cannot reach".
   */
  async explainConnectionFailure(error: unknown): Promise<void> {
    if (!isConnectionError(error)) return;
    const address = this.address;
    const details = describeError(error);
    if (nothingAnswered(details)) {
      // The plain "cannot reach" is right now, whatever was found before.
      this.diagnoses.delete(address);
      return;
    }
    const now = Date.now();
    if (now - (this.explained.get(address) ?? 0) < EXPLAIN_INTERVAL_MS) return;
    this.explained.set(address, now);
    const explanation = await diagnoseConnectionFailure(address, details, {
      tlsCaSource: this.tls?.source,
      flag: '--controller (metalcast.controller=)',
      plaintextToTls:
        ", and this agent runs with --insecure (plaintext): give the agent --ca (metalcast.ca= on the kernel command line) with the CA bundle that signed the controller's certificate",
    });
    if (explanation) {
      this.diagnoses.set(address, explanation);
      this.logger.error({ controller: address, reason: details }, explanation);
    } else {
      this.diagnoses.delete(address);
      this.explained.delete(address);
    }
  }

  /** Why connecting to `address` failed, when {@link explainConnectionFailure} found a reason other than "nothing there". */
  diagnosis(address: string): string | undefined {
    return this.diagnoses.get(address);
  }

  close(): void {
    for (const { channel } of this.channels.values()) channel.close();
    this.channels.clear();
  }
}
