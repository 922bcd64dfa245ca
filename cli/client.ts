import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import { type Channel, createChannel, createClientFactory } from 'nice-grpc';
import { deadlineMiddleware } from 'nice-grpc-client-middleware-deadline';
import { ConfigError } from '../common/config.js';
import { clientChannelOptions } from '../common/grpc-options.js';
import { loadCaBundle, loadClientIdentity, type ServerIdentity, tlsClient } from '../common/tls.js';
import { ADMIN_TOKEN_FILE, operatorMetadata } from '../controller/auth/operator-auth.js';
import { debugText, describeFailure } from './errors.js';
import { EXIT } from '../common/exit-codes.js';
import { FastImageServiceDefinition } from '../common/upload-image-codec.js';
import { NodeServiceDefinition } from '../gen/metalcast/v1/node.js';

/**
 * How the CLI reaches the controller: TLS verifying the controller with
 * `caPem` (Node's bundled CAs when undefined), optionally with a client
 * certificate (operator mTLS). No OperatorTls at all is plaintext.
 */
export interface OperatorTls {
  caPem: string | undefined;
  client?: ServerIdentity;
}

/**
 * Clients for the operator API, with a deadline on every call unless a call sets its own, and the operator token if given;
 * over TLS when `tls` is given, else in plaintext.
 */
export function connectOperator(address: string, timeoutMs: number, token?: string, tls?: OperatorTls) {
  const secure = tls && tlsClient(address, tls);
  const channel: Channel = createChannel(address, secure?.credentials, {
    ...clientChannelOptions({ timeMs: 30_000, timeoutMs: 10_000 }),
    ...secure?.channelOptions,
  });
  const factory = createClientFactory().use(deadlineMiddleware);
  const defaults = { '*': { deadline: timeoutMs, ...(token ? { metadata: operatorMetadata(token) } : {}) } };
  return {
    channel,
    nodes: factory.create(NodeServiceDefinition, channel, defaults),
    // The upload codec reads file data straight into gRPC frames (common/upload-image-codec.ts).
    images: factory.create(FastImageServiceDefinition, channel, defaults),
    close: () => channel.close(),
  };
}

export type OperatorClients = ReturnType<typeof connectOperator>;

/** The options every operator command group takes (see addOperatorOptions in cli/program.ts). */
export interface OperatorOptions {
  controller: string;
  timeout: number;
  /** Operator token (--token, METALCAST_TOKEN); else readTokenFile() looks for one. */
  token?: string;
  /** PEM CA bundle to verify the controller with (--ca, METALCAST_CA); default: Node's bundled CAs. */
  ca?: string;
  /** Client certificate and key for operator mTLS (--cert/--key, METALCAST_CERT/METALCAST_KEY). */
  cert?: string;
  key?: string;
  /** Plaintext, no TLS (--insecure, METALCAST_INSECURE). */
  insecure?: boolean;
  json?: boolean;
  /** Print the raw gRPC error too (--debug, METALCAST_DEBUG). */
  debug?: boolean;
}

/** The TLS settings the operator options ask for (undefined: --insecure); ConfigError naming the option when a file is unusable. */
export function operatorTls(options: Pick<OperatorOptions, 'ca' | 'cert' | 'key' | 'insecure'>): OperatorTls | undefined {
  if (options.insecure) {
    const given = (['ca', 'cert', 'key'] as const).filter((name) => options[name]);
    if (given.length > 0) {
      throw new ConfigError([
        `--insecure contradicts ${given.map((name) => `--${name}`).join(', ')}: connect with TLS or in plaintext, not both`,
      ]);
    }
    return undefined;
  }
  if (Boolean(options.cert) !== Boolean(options.key)) throw new ConfigError(['--cert and --key go together: give both, or neither']);
  // A controller started here with --tls-generate and the default --data-dir left its CA here.
  const ca = options.ca || (existsSync(DEFAULT_CA_FILE) ? DEFAULT_CA_FILE : undefined);
  return {
    caPem: ca ? loadCaBundle(ca, '--ca') : undefined,
    client:
      options.cert && options.key
        ? loadClientIdentity({ cert: options.cert, key: options.key }, { cert: '--cert', key: '--key' })
        : undefined,
  };
}

/** Where a controller with the default --data-dir and --tls-generate leaves its CA. */
export const DEFAULT_CA_FILE = join('metalcast-data', 'tls', 'ca.pem');

/** Where the first start of a controller with the default --data-dir leaves the first admin token. */
export const DEFAULT_TOKEN_FILE = join('metalcast-data', ADMIN_TOKEN_FILE);

/**
 * The token in a token file (by default ./metalcast-data/admin.token, which
 * a controller started here with the default --data-dir writes at its first
 * start), or undefined when there is no such file.
 */
export function readTokenFile(path = DEFAULT_TOKEN_FILE): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

/** Runs one operator command with connected clients; reports a failure as one line and sets the exit code. */
export async function withClient(
  command: Command,
  fn: (clients: OperatorClients, options: OperatorOptions) => Promise<void>,
): Promise<void> {
  const options = command.optsWithGlobals<OperatorOptions>();
  let tls: OperatorTls | undefined;
  try {
    tls = operatorTls(options);
  } catch (error) {
    process.stderr.write(`error: ${(error as Error).message}\n`);
    process.exitCode = EXIT.USAGE;
    return;
  }
  const clients = connectOperator(options.controller, options.timeout, options.token || readTokenFile(), tls);
  try {
    await fn(clients, options);
  } catch (error) {
    const caSource = options.ca ? `--ca ${options.ca}` : tls?.caPem ? DEFAULT_CA_FILE : "Node's bundled CAs (give --ca)";
    const { line, code } = await describeFailure(
      error,
      { controller: options.controller, tls: tls !== undefined, caSource },
      options.timeout,
    );
    process.stderr.write(`error: ${line}\n`);
    if (options.debug) process.stderr.write(`${debugText(error)}\n`);
    process.exitCode = code;
  } finally {
    clients.close();
  }
}
