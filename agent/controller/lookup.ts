import { ClientError, Status } from 'nice-grpc';
import pRetry, { AbortError } from 'p-retry';
import type { Logger } from '../../common/logging.js';
import type { LookupRequest, LookupResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import { type ControllerLink, isConnectionError } from './controller-link.js';
import { describeError } from '../../common/errors.js';
import { retryAfterMs } from '../../common/retry-after.js';
import { setTimeout as sleep } from 'node:timers/promises';

export interface LookupOptions {
  backoffStartMs: number;
  backoffMaxMs: number;
  budgetMs: number;
  callTimeoutMs: number;
  /** Randomise the backoff (default). Off only to measure what jitter buys (bench herd). */
  jitter?: boolean;
}

/** Thrown when lookups kept failing for the whole budget. */
export class LookupBudgetExhausted extends Error {
  /** `lastFailure`: the one sentence the last attempt was logged with; the raw error stays as the cause (for debug). */
  constructor(budgetMs: number, cause: unknown, lastFailure: string) {
    super(`no successful lookup within ${Math.round(budgetMs / 1000)}s; the last attempt: ${lastFailure}`, { cause });
    this.name = 'LookupBudgetExhausted';
  }
}

/** Thrown when the controller refuses the request itself; retrying cannot help. */
export class LookupRefused extends Error {
  override name = 'LookupRefused';
}

/** What an operator should check, by the controller's answer. */
function hint(error: unknown, link: ControllerLink, controller: string, macs: readonly string[]): string {
  if (isConnectionError(error))
    return (
      link.diagnosis(controller) ??
      `cannot reach the controller at ${controller}: check the address (--controller, metalcast.controller=) and the network`
    );
  if (error instanceof ClientError) {
    switch (error.code) {
      case Status.NOT_FOUND:
        return `the controller knows no node waiting for an agent with MACs ${macs.join(', ')}: enrol the node with these MACs and start inspect, provide or deploy (the same answer comes while an earlier agent of this node is still connected; it is retried until that one goes away)`;
      case Status.FAILED_PRECONDITION:
        return 'another agent is still connected for this node; retrying until it goes away';
      case Status.RESOURCE_EXHAUSTED:
        return 'the controller is rate-limiting lookups; backing off';
      default:
        return `the controller answered ${describeError(error)}`;
    }
  }
  return (error as Error).message;
}

/**
 * Looks the agent up at the controller with randomised exponential backoff,
 * so that a rack booting at once spreads its lookups out; gives up after the
 * budget with LookupBudgetExhausted (the service manager restarts the agent).
 */
export async function lookupWithBackoff(
  link: ControllerLink,
  request: LookupRequest,
  options: LookupOptions,
  logger: Logger,
  signal: AbortSignal,
): Promise<LookupResponse> {
  const started = Date.now();
  /** What the controller's last refusal asked for in `retry-after-ms`, bounded. */
  let retryAfter: number | undefined;
  let lastFailure = '';
  try {
    return await pRetry(
      async () => {
        retryAfter = undefined;
        try {
          return await link.gateway.lookup(request, {
            deadline: options.callTimeoutMs,
            signal,
            onTrailer: (trailer) => {
              retryAfter = retryAfterMs(trailer);
            },
          });
        } catch (error) {
          // Malformed requests will not get better by retrying.
          if (error instanceof ClientError && error.code === Status.INVALID_ARGUMENT) {
            throw new AbortError(new LookupRefused(`the controller refused the lookup request: ${error.details}`));
          }
          throw error;
        }
      },
      {
        retries: Number.POSITIVE_INFINITY,
        factor: 2,
        minTimeout: options.backoffStartMs,
        maxTimeout: options.backoffMaxMs,
        randomize: options.jitter !== false,
        maxRetryTime: options.budgetMs,
        signal,
        onFailedAttempt: async ({ error, attemptNumber }) => {
          const controller = link.address;
          if (isConnectionError(error)) {
            // Probing the address takes a moment, so that this very line can say a port is wrong or TLS disagrees.
            await link.explainConnectionFailure(error);
            link.next('lookup could not connect');
          }
          // A controller that is shedding load says how long to stay away; the jittered backoff
          // comes on top, so that the agents it refused together do not come back together.
          const wait = retryAfter === undefined ? 0 : Math.min(retryAfter, Math.max(0, options.budgetMs - (Date.now() - started)));
          lastFailure = hint(error, link, controller, request.macAddresses);
          logger.warn(
            {
              attempt: attemptNumber,
              controller,
              elapsedSeconds: Math.round((Date.now() - started) / 1000),
              ...(retryAfter === undefined ? {} : { retryAfterMs: wait }),
            },
            `lookup failed: ${lastFailure}${retryAfter === undefined ? '' : `; waiting ${wait} ms as the controller asked (retry-after-ms)`}`,
          );
          // The raw grpc-js text ("No connection established. Last error: …") only for debugging.
          logger.debug({ err: error }, 'lookup failure as gRPC reported it');
          if (wait > 0) await sleep(wait, undefined, { signal }).catch(() => {});
        },
      },
    );
  } catch (error) {
    if (signal.aborted || error instanceof LookupRefused) throw error;
    throw new LookupBudgetExhausted(options.budgetMs, error, lastFailure || (error as Error).message);
  }
}
