import type { Metadata } from 'nice-grpc-common';

/** The longest wait a controller may ask of an agent; a larger `retry-after-ms` is cut to it. */
export const MAX_RETRY_AFTER_MS = 60_000;

/**
 * The `retry-after-ms` a controller sent in a trailer with RESOURCE_EXHAUSTED
 * (or UNAVAILABLE), bounded to 0..`maxMs`: a controller that asks for an hour
 * (or a proxy that mangles the value) must not park an agent that long.
 * Undefined when the trailer is absent or not a number of milliseconds.
 */
export function retryAfterMs(trailer: Metadata | undefined, maxMs = MAX_RETRY_AFTER_MS): number | undefined {
  const value = trailer?.get('retry-after-ms');
  if (typeof value !== 'string' || !/^\d{1,12}$/.test(value.trim())) return undefined;
  return Math.min(Number(value.trim()), maxMs);
}
