import { X509Certificate } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { caPin, pemBlocks, pinnedCertificate } from '../../common/ca-pin.js';
import type { Logger } from '../../common/logging.js';

/**
 * TLS from the first packet: a network-booted agent has no CA bundle baked
 * in, only what its kernel command line says (metalcast.ca_url and
 * metalcast.ca_fingerprint, put there by the controller's iPXE script or
 * virtual-media ISO). It fetches the CA from the URL over plain HTTP, keeps
 * the one certificate whose SHA-256 is the pinned fingerprint, and refuses
 * anything else: whoever answers the URL cannot make the agent trust a CA
 * of their own. The kept certificate is the agent's --ca.
 */

/** The fetched CA did not match the pin: never retried, the agent refuses to start. */
export class CaPinMismatch extends Error {
  override name = 'CaPinMismatch';
}

/** The CA could not be fetched after every try. */
export class CaFetchFailed extends Error {
  override name = 'CaFetchFailed';
}

export interface FetchPinnedCaOptions {
  url: string;
  /** sha256:<64 lowercase hex> of the CA certificate's DER. */
  fingerprint: string;
  /** Tries before giving up on a URL that does not answer (default 10). */
  attempts?: number;
  /** Wait after the first failed try, doubled after each further one up to 10 s (default 1 s). */
  backoffMs?: number;
  /** Longest one fetch may take (default 10 s). */
  timeoutMs?: number;
  logger?: Logger;
}

/** Largest answer taken: a CA bundle is a few KiB. */
const MAX_BYTES = 1024 * 1024;

/** Fetches the CA and returns the pinned certificate as PEM; CaPinMismatch or CaFetchFailed otherwise. */
export async function fetchPinnedCa(options: FetchPinnedCaOptions): Promise<string> {
  const attempts = Math.max(1, options.attempts ?? 10);
  const timeoutMs = options.timeoutMs ?? 10_000;
  let delay = options.backoffMs ?? 1000;
  let lastProblem = '';
  for (let attempt = 1; attempt <= attempts; attempt++) {
    let body: string;
    try {
      const response = await fetch(options.url, { signal: AbortSignal.timeout(timeoutMs), redirect: 'error' });
      if (!response.ok) throw new Error(`HTTP ${response.status} ${response.statusText}`);
      const bytes = Buffer.from(await response.arrayBuffer());
      if (bytes.length > MAX_BYTES) throw new Error(`the answer is ${bytes.length} bytes, more than a CA bundle's ${MAX_BYTES}`);
      body = bytes.toString('utf8');
    } catch (error) {
      lastProblem = describeFetchError(error);
      options.logger?.warn({ url: options.url, attempt, attempts, problem: lastProblem }, 'fetching the controller CA failed');
      if (attempt < attempts) {
        await sleep(delay);
        delay = Math.min(delay * 2, 10_000);
      }
      continue;
    }
    const pinned = pinnedCertificate(body, options.fingerprint);
    if (!pinned) {
      const found = pemBlocks(body).flatMap((block) => {
        try {
          return [caPin(new X509Certificate(block))];
        } catch {
          return [];
        }
      });
      throw new CaPinMismatch(
        `refusing the CA from ${options.url}: ${found.length === 0 ? 'it holds no PEM certificate' : `it holds ${found.join(', ')}`}, not the pinned ${options.fingerprint} (metalcast.ca_fingerprint). Either something else answers that address, or the controller's CA changed after this machine was told to boot: boot it again`,
      );
    }
    options.logger?.info(
      { url: options.url, fingerprint: options.fingerprint, subject: pinned.certificate.subject.replaceAll('\n', ', ') },
      'fetched the controller CA and checked it against the pinned fingerprint',
    );
    return pinned.pem;
  }
  throw new CaFetchFailed(
    `cannot fetch the controller CA from ${options.url} (metalcast.ca_url) after ${attempts} tries: ${lastProblem}; check that the controller's HTTP endpoint (--metrics-listen) is reachable from this machine`,
  );
}

function describeFetchError(error: unknown): string {
  const err = error as Error & { cause?: { code?: string; message?: string } };
  if (err.name === 'TimeoutError') return 'no answer in time';
  return err.cause?.code ?? err.cause?.message ?? err.message;
}
