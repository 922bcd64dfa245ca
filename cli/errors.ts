import { ClientError, Status } from 'nice-grpc';
import { ConfigError } from '../common/config.js';
import { diagnoseConnectionFailure } from '../common/endpoint-probe.js';
import { EXIT, type ExitCode, exitCodeFor } from '../common/exit-codes.js';

/**
 * How a failed operator command is told to the user: one line that says what
 * happened and what to do, and an exit code from the one mapping of
 * docs/exit-codes.md. grpc-js's own wording ("No connection established. Last
 * error: Error: connect ECONNREFUSED … Resolution note: ") is kept for --debug.
 */

/** A failure the CLI itself finds, with its exit code: `throw new CliFailure('file.img is empty', EXIT.USAGE)`. */
export class CliFailure extends Error {
  constructor(
    message: string,
    readonly exitCode: ExitCode,
  ) {
    super(message);
    this.name = 'CliFailure';
  }
}

/** Where the command tried to go and how, to explain a connection failure. */
export interface FailureContext {
  controller: string;
  /** Whether the command used TLS (false: --insecure). */
  tls: boolean;
  /** Where the CA came from, for messages: "--ca ca.pem" or "Node's bundled CAs (give --ca)". */
  caSource: string;
}

/** Details grpc-js writes when it never got a working connection, as opposed to an UNAVAILABLE the controller itself answered. */
const CONNECTION_FAILURE =
  /No connection established|Connection dropped|Failed to connect|connect E[A-Z]+|getaddrinfo|Name resolution failed|ECONNRESET|EHOSTUNREACH|ENETUNREACH|ETIMEDOUT|Protocol error|Received HTTP status|ssl|tls|certificate|handshake|read ECONN/i;

export function isConnectionFailure(error: unknown): boolean {
  return error instanceof ClientError && error.code === Status.UNAVAILABLE && CONNECTION_FAILURE.test(error.details);
}

/** Why a connection failed, in a few words, from grpc-js's details. */
function connectReason(details: string): string {
  if (/ECONNREFUSED/.test(details)) return 'connection refused: nothing listens there';
  if (/ENOTFOUND|EAI_AGAIN|getaddrinfo|Name resolution failed/.test(details)) return 'the host name does not resolve';
  if (/EHOSTUNREACH|ENETUNREACH/.test(details)) return 'no route to the host';
  if (/ETIMEDOUT/.test(details)) return 'the connection timed out';
  if (/ECONNRESET|Connection dropped/.test(details)) return 'the connection was reset';
  return 'no connection';
}

/** The one line (without "error: ") for a connection failure, probing the address to tell a wrong port or a TLS mismatch from a controller that is down. */
export async function explainConnectionFailure(details: string, context: FailureContext): Promise<string> {
  const diagnosis = await diagnoseConnectionFailure(context.controller, details, {
    tlsCaSource: context.tls ? context.caSource : undefined,
    flag: '--controller',
    plaintextToTls: ': leave out --insecure (METALCAST_INSECURE) and give --ca with its CA bundle',
  });
  return (
    diagnosis ??
    `cannot reach the controller at ${context.controller} (${connectReason(details)}): is the controller running, and is --controller (METALCAST_CONTROLLER) its gRPC address?`
  );
}

/** The line to print and the exit code for an error a command failed with. */
export async function describeFailure(
  error: unknown,
  context: FailureContext,
  timeoutMs?: number,
): Promise<{ line: string; code: ExitCode }> {
  if (error instanceof ClientError) {
    if (isConnectionFailure(error)) return { line: await explainConnectionFailure(error.details, context), code: EXIT.UNAVAILABLE };
    if (error.code === Status.DEADLINE_EXCEEDED) {
      const within = timeoutMs ? ` within ${timeoutMs >= 1000 ? `${timeoutMs / 1000}s` : `${timeoutMs}ms`}` : ' in time';
      return {
        line: `the controller at ${context.controller} did not answer${within}: raise --timeout, or look at the controller's load and log`,
        code: EXIT.UNAVAILABLE,
      };
    }
    return { line: `${Status[error.code]}: ${error.details}`, code: exitCodeFor(error.code) };
  }
  if (error instanceof CliFailure) return { line: error.message, code: error.exitCode };
  if (error instanceof ConfigError) return { line: error.problems.join('; '), code: EXIT.USAGE };
  return { line: (error as Error)?.message ?? String(error), code: EXIT.FAILED };
}

/** The raw error for --debug: status, details and the cause chain as grpc-js gave them. */
export function debugText(error: unknown): string {
  if (error instanceof ClientError) return `debug: ${error.path} ${Status[error.code]} (${error.code}): ${error.details}`;
  return `debug: ${(error as Error)?.stack ?? String(error)}`;
}
