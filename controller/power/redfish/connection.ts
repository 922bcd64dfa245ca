import { Agent as HttpAgent, type IncomingHttpHeaders, request as httpRequest } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../../../common/logging.js';
import { RedfishConnectionError, redfishErrorFrom } from './errors.js';

/** An answer from the BMC: any status; the caller decides what an error is. */
export interface RedfishResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

export interface RequestOptions {
  body?: unknown;
  headers?: Record<string, string>;
  timeoutMs: number;
  /** Tries in all, on connection errors and 5xx; 4xx is never retried. */
  attempts: number;
  signal?: AbortSignal;
}

/** Longest answer read from a BMC: Redfish resources are small; anything bigger is a fault. */
const MAX_BODY_BYTES = 4 * 1024 * 1024;
const MAX_REDIRECTS = 3;
/** Backoff between tries: doubling from this, with jitter, up to BACKOFF_MAX_MS. */
const BACKOFF_BASE_MS = 250;
const BACKOFF_MAX_MS = 4000;

/** A counting semaphore, fair (first come, first served). */
class Slots {
  private free: number;
  private readonly waiting: (() => void)[] = [];

  constructor(size: number) {
    this.free = size;
  }

  async take(signal?: AbortSignal): Promise<() => void> {
    if (this.free > 0) {
      this.free--;
      return () => this.give();
    }
    await new Promise<void>((resolve, reject) => {
      const wake = () => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      };
      const onAbort = () => {
        const index = this.waiting.indexOf(wake);
        if (index >= 0) this.waiting.splice(index, 1);
        reject(signal?.reason);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiting.push(wake);
    });
    return () => this.give();
  }

  private give(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.free++;
  }
}

/**
 * The HTTP(S) way to one BMC, shared by every driver instance that talks to
 * it: keep-alive connections (a TLS handshake is costly for a BMC), at most
 * `maxInFlight` requests at once (BMCs are small computers that fall over
 * under load), a timeout on every request from connect to the last byte,
 * redirects followed within the BMC (sushy-emulator answers a system's
 * name with 307 to its UUID), and retries with jittered exponential backoff
 * on connection errors and 5xx, never on 4xx. Bodies are never logged: a
 * session login carries the password.
 */
export class BmcConnection {
  private readonly agent: HttpAgent | HttpsAgent;
  private readonly slots: Slots;
  private readonly secure: boolean;

  constructor(
    /** scheme://host:port */
    readonly origin: string,
    tls: { verify: boolean; caPem: string | undefined },
    maxInFlight: number,
    private readonly logger: Logger,
  ) {
    this.secure = origin.startsWith('https:');
    const common = {
      keepAlive: true,
      keepAliveMsecs: 10_000,
      maxSockets: maxInFlight,
      maxFreeSockets: maxInFlight,
      scheduling: 'lifo' as const,
    };
    this.agent = this.secure
      ? new HttpsAgent({ ...common, rejectUnauthorized: tls.verify, ...(tls.caPem ? { ca: tls.caPem } : {}) })
      : new HttpAgent(common);
    this.slots = new Slots(maxInFlight);
  }

  /**
   * One request, retried as the options say. Resolves with any status below
   * 500 (the caller maps 4xx); rejects with RedfishError for a 5xx that
   * outlasted the tries, RedfishConnectionError when no answer came.
   */
  async request(method: string, path: string, options: RequestOptions): Promise<RedfishResponse> {
    for (let attempt = 1; ; attempt++) {
      let failure: Error;
      try {
        const response = await this.withSlot(() => this.following(method, path, options), options.signal);
        if (response.status < 500) return response;
        failure = redfishErrorFrom(this.origin, method, path, response.status, response.body);
      } catch (error) {
        if (!(error instanceof RedfishConnectionError) || error.permanent) throw error;
        failure = error;
      }
      options.signal?.throwIfAborted();
      if (attempt >= options.attempts) {
        if (options.attempts > 1) failure.message += ` (after ${options.attempts} tries)`;
        throw failure;
      }
      const backoff = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (attempt - 1));
      const wait = Math.round(backoff / 2 + Math.random() * (backoff / 2));
      this.logger.debug({ bmc: this.origin, method, path, attempt, waitMs: wait, reason: failure.message }, 'BMC request failed; retrying');
      await sleep(wait, undefined, options.signal ? { signal: options.signal } : undefined);
    }
  }

  /** One try, following redirects that stay on this BMC. */
  private async following(method: string, path: string, options: RequestOptions): Promise<RedfishResponse> {
    let current = path;
    for (let hop = 0; ; hop++) {
      const response = await this.once(method, current, options);
      const location = response.headers.location;
      if (![301, 302, 303, 307, 308].includes(response.status) || !location) return response;
      const next = new URL(location, `${this.origin}${current}`);
      // Credentials go only to this BMC.
      if (next.origin !== this.origin)
        throw new RedfishConnectionError(method, current, `redirected to another host (${next.origin}); not following`, true);
      if (hop >= MAX_REDIRECTS) throw new RedfishConnectionError(method, path, `more than ${MAX_REDIRECTS} redirects`, true);
      current = next.pathname + next.search;
    }
  }

  private once(method: string, path: string, options: RequestOptions): Promise<RedfishResponse> {
    const payload = options.body === undefined ? undefined : Buffer.from(JSON.stringify(options.body));
    const headers: Record<string, string | number> = {
      accept: 'application/json',
      'odata-version': '4.0',
      ...options.headers,
    };
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = payload.length;
    }
    const started = Date.now();
    return new Promise<RedfishResponse>((resolve, reject) => {
      let settled = false;
      const fail = (error: RedfishConnectionError) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
        request.destroy();
        reject(error);
      };
      const request = (this.secure ? httpsRequest : httpRequest)(`${this.origin}${path}`, { method, headers, agent: this.agent }, (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > MAX_BODY_BYTES) fail(new RedfishConnectionError(method, path, `answer larger than ${MAX_BODY_BYTES} bytes`, true));
          else chunks.push(chunk);
        });
        res.on('end', () => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          options.signal?.removeEventListener('abort', onAbort);
          this.logger.debug({ bmc: this.origin, method, path, status: res.statusCode, ms: Date.now() - started }, 'BMC request');
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') });
        });
        res.on('error', (error) => fail(new RedfishConnectionError(method, path, `the connection broke mid-answer: ${error.message}`)));
        res.on('aborted', () => fail(new RedfishConnectionError(method, path, 'the connection broke mid-answer')));
      });
      const timer = setTimeout(
        () => fail(new RedfishConnectionError(method, path, `no complete answer within ${options.timeoutMs} ms`)),
        options.timeoutMs,
      );
      const onAbort = () => fail(new RedfishConnectionError(method, path, 'cancelled', true));
      options.signal?.addEventListener('abort', onAbort, { once: true });
      request.on('error', (error: NodeJS.ErrnoException) => fail(connectionError(method, path, error)));
      request.end(payload);
    });
  }

  /** Takes one of this BMC's request slots for the duration of `work`. */
  private async withSlot<T>(work: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    const release = await this.slots.take(signal);
    try {
      return await work();
    } finally {
      release();
    }
  }

  close(): void {
    this.agent.destroy();
  }
}

/** A transport error in words an operator acts on. */
function connectionError(method: string, path: string, error: NodeJS.ErrnoException): RedfishConnectionError {
  const code = error.code ?? '';
  if (/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ERR_TLS_CERT_ALTNAME/.test(code)) {
    return new RedfishConnectionError(
      method,
      path,
      `the BMC's TLS certificate is not trusted (${code}: ${error.message}); give its CA with power.redfish.ca_file, or (labs only) set power.redfish.verify_tls=false`,
      true,
    );
  }
  const what =
    code === 'ECONNREFUSED'
      ? 'connection refused (is the BMC address and port right, and its Redfish service on?)'
      : code === 'ECONNRESET' || error.message === 'socket hang up'
        ? 'the BMC closed the connection'
        : code === 'ENOTFOUND' || code === 'EAI_AGAIN'
          ? `cannot resolve the BMC's host name (${code})`
          : code === 'EHOSTUNREACH' || code === 'ENETUNREACH'
            ? `no route to the BMC (${code})`
            : `${code ? `${code}: ` : ''}${error.message}`;
  return new RedfishConnectionError(method, path, what);
}
