import { X509Certificate } from 'node:crypto';
import { type Channel, createChannel, createClientFactory, Status } from 'nice-grpc';
import { deadlineMiddleware } from 'nice-grpc-client-middleware-deadline';
import { retryMiddleware } from 'nice-grpc-client-middleware-retry';
import { agentMetadata } from '../../common/agent-metadata.js';
import { clientChannelOptions, type KeepaliveOptions } from '../../common/grpc-options.js';
import type { Logger } from '../../common/logging.js';
import { pinnedTlsClient } from '../../common/tls.js';
import { AgentServiceDefinition } from '../../gen/metalcast/v1/agent.js';

const factory = createClientFactory().use(retryMiddleware).use(deadlineMiddleware);
/** How grpc-js reports a peer whose certificate is not the pinned one (chain verification fails first for another self-signed one). */
const PIN_FAILURE = /self[- ]signed certificate|unable to verify|not the one pinned|certificate/i;
export type AgentServiceClient = ReturnType<typeof factory.create<typeof AgentServiceDefinition>>;

/** The calls the controller makes on an agent, with the node's token already attached. */
export interface AgentHandle {
  address: string;
  /** SHA-256 fingerprint of the pinned certificate the channel trusts; undefined on a plaintext channel (--insecure). */
  fingerprint: string | undefined;
  client: AgentServiceClient;
  /** Call options carrying the token; spread into each call with its own deadline. */
  auth: { metadata: ReturnType<typeof agentMetadata> };
}

/**
 * Channels to agents, one per agent address and pinned certificate, reused
 * across calls. A node with a pinned certificate is called over TLS that
 * trusts exactly that certificate (common/tls.ts pinnedTlsClient); one
 * without is called in plaintext, which AgentDirectory allows only when
 * the controller runs with --insecure. Every call has a deadline;
 * idempotent calls retry on UNAVAILABLE with jittered backoff
 * (nice-grpc-client-middleware-retry), so that a blip on the provisioning
 * network does not fail a deploy.
 */
export class AgentClients {
  /** By address and fingerprint ("" for plaintext). */
  private readonly channels = new Map<string, { address: string; channel: Channel; client: AgentServiceClient }>();

  constructor(
    private readonly keepalive: KeepaliveOptions,
    private readonly callTimeoutMs: number,
    private readonly logger: Logger,
  ) {}

  handle(nodeUuid: string, address: string, token: string, certificatePem: string | null): AgentHandle {
    const fingerprint = certificatePem === null ? undefined : new X509Certificate(certificatePem).fingerprint256;
    const key = `${address} ${fingerprint ?? ''}`;
    let entry = this.channels.get(key);
    if (!entry) {
      // An agent that restarted at this address made a new key: the channel trusting its old one is of no more use.
      for (const [other, old] of this.channels) {
        if (old.address !== address) continue;
        old.channel.close();
        this.channels.delete(other);
      }
      const tls = certificatePem === null ? undefined : pinnedTlsClient(certificatePem);
      const channel = createChannel(address, tls?.credentials, { ...clientChannelOptions(this.keepalive), ...tls?.channelOptions });
      entry = {
        address,
        channel,
        client: factory.create(AgentServiceDefinition, channel, {
          '*': {
            deadline: this.callTimeoutMs,
            retry: true,
            retryMaxAttempts: 4,
            retryBaseDelayMs: 500,
            retryMaxDelayMs: 5000,
            retryableStatuses: [Status.UNAVAILABLE],
            onRetryableError: (error, attempt, delayMs) => {
              // A TLS failure with a pinned certificate: something other than the node's agent answers at its address.
              if (fingerprint !== undefined && PIN_FAILURE.test(error.details)) {
                this.logger.warn(
                  { node: nodeUuid, agent: address, pinned: fingerprint, reason: error.details },
                  'refusing to call the agent: it did not present the certificate pinned for its node',
                );
              } else {
                this.logger.warn(
                  { node: nodeUuid, agent: address, attempt, delayMs, reason: error.details },
                  'agent call failed; retrying',
                );
              }
            },
          },
        }),
      };
      this.channels.set(key, entry);
    }
    return { address, fingerprint, client: entry.client, auth: { metadata: agentMetadata(nodeUuid, token) } };
  }

  /** Forgets the channels to an address (the agent went away). */
  drop(address: string): void {
    for (const [key, entry] of this.channels) {
      if (entry.address !== address) continue;
      entry.channel.close();
      this.channels.delete(key);
    }
  }

  closeAll(): void {
    for (const { channel } of this.channels.values()) channel.close();
    this.channels.clear();
  }
}
