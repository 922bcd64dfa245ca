import assert from 'node:assert/strict';
import { ClientError, Status } from 'nice-grpc-common';

/** Asserts that `error` is a ClientError with `code`, and that its details match `details` when given. */
export function assertClientError(error: unknown, code: Status, details?: RegExp): ClientError {
  assert.ok(
    error instanceof ClientError,
    `expected a gRPC error ${Status[code]}, got ${error instanceof Error ? error.stack : String(error)}`,
  );
  assert.equal(Status[error.code], Status[code], `expected ${Status[code]}, got ${Status[error.code]}: ${error.details}`);
  if (details) assert.match(error.details, details);
  return error;
}

/** Asserts that the call fails with `code` (and details matching `details`); returns the error. */
export async function assertRejectsWith(call: Promise<unknown>, code: Status, details?: RegExp): Promise<ClientError> {
  try {
    await call;
  } catch (error) {
    return assertClientError(error, code, details);
  }
  assert.fail(`expected the call to fail with ${Status[code]}, but it succeeded`);
}
