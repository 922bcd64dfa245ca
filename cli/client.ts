import type { Command } from 'commander';
import { type Channel, createChannel, createClientFactory } from 'nice-grpc';
import { deadlineMiddleware } from 'nice-grpc-client-middleware-deadline';
import { clientChannelOptions } from '../common/grpc-options.js';
import { ImageServiceDefinition } from '../gen/metalcast/v1/image.js';
import { reportError } from './output.js';
import { NodeServiceDefinition } from '../gen/metalcast/v1/node.js';

/** Clients for the operator API, with a deadline on every call unless a call sets its own. */
export function connectOperator(address: string, timeoutMs: number) {
  const channel: Channel = createChannel(address, undefined, clientChannelOptions({ timeMs: 30_000, timeoutMs: 10_000 }));
  const factory = createClientFactory().use(deadlineMiddleware);
  const defaults = { '*': { deadline: timeoutMs } };
  return {
    channel,
    nodes: factory.create(NodeServiceDefinition, channel, defaults),
    images: factory.create(ImageServiceDefinition, channel, defaults),
    close: () => channel.close(),
  };
}

export type OperatorClients = ReturnType<typeof connectOperator>;

/** The options every operator command group takes (see addOperatorOptions in cli/main.ts). */
export interface OperatorOptions {
  controller: string;
  timeout: number;
  json?: boolean;
}

/** Runs one operator command with connected clients; reports a failure as one line and sets the exit code. */
export async function withClient(
  command: Command,
  fn: (clients: OperatorClients, options: OperatorOptions) => Promise<void>,
): Promise<void> {
  const options = command.optsWithGlobals<OperatorOptions>();
  const clients = connectOperator(options.controller, options.timeout);
  try {
    await fn(clients, options);
  } catch (error) {
    process.exitCode = reportError(error, options.controller);
  } finally {
    clients.close();
  }
}
