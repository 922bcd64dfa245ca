import { isAbortError } from 'abort-controller-x';
import type { Logger } from 'pino';
import { type CallContext, ClientError, type ServerMiddleware, ServerError, Status } from 'nice-grpc';

/**
 * Helpers that make the status-code mapping of STYLE.md the easy path:
 * handlers throw these, and {@link errorMappingMiddleware} turns anything
 * else into INTERNAL without leaking a stack trace to the caller.
 */
export const invalidArgument = (message: string) => new ServerError(Status.INVALID_ARGUMENT, message);
export const notFound = (message: string) => new ServerError(Status.NOT_FOUND, message);
export const alreadyExists = (message: string) => new ServerError(Status.ALREADY_EXISTS, message);
export const failedPrecondition = (message: string) => new ServerError(Status.FAILED_PRECONDITION, message);
export const aborted = (message: string) => new ServerError(Status.ABORTED, message);
export const unavailable = (message: string) => new ServerError(Status.UNAVAILABLE, message);
export const unauthenticated = (message: string) => new ServerError(Status.UNAUTHENTICATED, message);
export const permissionDenied = (message: string) => new ServerError(Status.PERMISSION_DENIED, message);
export const unimplemented = (message: string) => new ServerError(Status.UNIMPLEMENTED, message);
export const dataLoss = (message: string) => new ServerError(Status.DATA_LOSS, message);
export const resourceExhausted = (message: string) => new ServerError(Status.RESOURCE_EXHAUSTED, message);

/**
 * A domain error that knows which status it maps to, so that code below the
 * gRPC edge (the store, the state machine) need not import nice-grpc.
 */
export class MetalcastError extends Error {
  constructor(
    readonly status: Status,
    message: string,
  ) {
    super(message);
    this.name = 'MetalcastError';
  }
}

let callCounter = 0;

/**
 * Maps every error a handler throws to a status: ServerError and
 * MetalcastError keep theirs, aborts stay aborts, and anything else is a
 * bug: it is logged with its stack and the caller gets INTERNAL with a
 * reference to the log line, never the stack.
 */
export function errorMappingMiddleware(logger: Logger): ServerMiddleware {
  return async function* errorMapping(call, context: CallContext) {
    try {
      return yield* call.next(call.request, context);
    } catch (error) {
      if (error instanceof ServerError || isAbortError(error)) throw error;
      if (error instanceof MetalcastError) throw new ServerError(error.status, error.message);
      const ref = `e${Date.now().toString(36)}${(callCounter++).toString(36)}`;
      logger.error({ err: error, method: call.method.path, ref }, 'unexpected error in gRPC handler');
      throw new ServerError(Status.INTERNAL, `internal error (ref ${ref}); the controller log has the details`);
    }
  };
}

/** One line for a failed call or any other error: "UNAVAILABLE: details" for gRPC errors, else the message. */
export function describeError(error: unknown): string {
  if (error instanceof ClientError) return `${Status[error.code]}: ${error.details}`;
  return (error as Error)?.message ?? String(error);
}
