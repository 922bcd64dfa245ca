import type { Logger } from '../../../common/logging.js';
import type { BmcConnection, RedfishResponse } from './connection.js';
import { RedfishError, redfishErrorFrom } from './errors.js';
import type { RedfishSettings } from './settings.js';

/** How requests are authenticated: a session token, or Basic with every request. */
export type Login = { kind: 'session'; token: string; location: string | undefined } | { kind: 'basic' };

/** The login of one user at one BMC, shared by every driver instance (a BMC has few session slots). */
export class LoginState {
  current: Login | undefined;
  pending: Promise<Login> | undefined;
}

/** The service root, where a client starts (DSP0266: it answers without credentials). */
export const SERVICE_ROOT = '/redfish/v1/';
const DEFAULT_SESSIONS = '/redfish/v1/SessionService/Sessions';

/** A resource as fetched: its JSON and the ETag to send back in If-Match. */
export interface Fetched {
  path: string;
  json: Record<string, unknown>;
  etag: string | undefined;
}

/** Credentials the BMC refused: retrying will not help, the operator must fix them. */
export class CredentialsRefused extends Error {
  override name = 'CredentialsRefused';
}

/**
 * Authenticated Redfish requests to one BMC. Logs in with SessionService
 * (POST Sessions, then X-Auth-Token on every request), falls back to Basic
 * when the BMC has no session service (power.redfish.auth=auto), and logs
 * in again once when a request answers 401 (the session expired or the BMC
 * rebooted). Any answer of 400 or above becomes a RedfishError carrying
 * what the BMC said.
 */
export class RedfishClient {
  constructor(
    readonly connection: BmcConnection,
    private readonly settings: RedfishSettings,
    private readonly login: LoginState,
    private readonly logger: Logger,
  ) {}

  get origin(): string {
    return this.connection.origin;
  }

  /** The service root, fetched without credentials. */
  async serviceRoot(): Promise<Fetched> {
    const response = await this.raw('GET', SERVICE_ROOT);
    if (response.status >= 400) throw redfishErrorFrom(this.origin, 'GET', SERVICE_ROOT, response.status, response.body);
    return fetched(SERVICE_ROOT, response);
  }

  async get(path: string): Promise<Fetched> {
    return fetched(path, await this.send('GET', path));
  }

  /** PATCH with If-Match when an ETag is known. */
  patch(path: string, body: unknown, etag?: string): Promise<RedfishResponse> {
    return this.send('PATCH', path, body, etag ? { 'if-match': etag } : undefined);
  }

  post(path: string, body: unknown): Promise<RedfishResponse> {
    return this.send('POST', path, body);
  }

  /** How this client is logged in now (after a request): for `node validate`. */
  get loginKind(): Login['kind'] | undefined {
    return this.login.current?.kind;
  }

  /** An authenticated request; RedfishError for 400 and above, CredentialsRefused when no login works. */
  async send(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<RedfishResponse> {
    let login = await this.loggedIn();
    let response = await this.raw(method, path, body, { ...headers, ...this.authHeaders(login) });
    if (response.status === 401 && login.kind === 'session') {
      this.logger.info({ bmc: this.origin, method, path }, 'the BMC answered 401: the session expired; logging in again');
      if (this.login.current === login) this.login.current = undefined;
      login = await this.loggedIn();
      response = await this.raw(method, path, body, { ...headers, ...this.authHeaders(login) });
    }
    if (response.status === 401 || response.status === 403) {
      const error = redfishErrorFrom(this.origin, method, path, response.status, response.body);
      if (response.status === 401) {
        if (this.login.current === login) this.login.current = undefined;
        throw new CredentialsRefused(`${this.refusedMessage()}: ${error.message}`);
      }
      throw error;
    }
    if (response.status >= 400) throw redfishErrorFrom(this.origin, method, path, response.status, response.body);
    return response;
  }

  private raw(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<RedfishResponse> {
    return this.connection.request(method, path, {
      body,
      headers,
      timeoutMs: this.settings.requestTimeoutMs,
      attempts: this.settings.attempts,
    });
  }

  private authHeaders(login: Login): Record<string, string> {
    if (login.kind === 'session') return { 'x-auth-token': login.token };
    return { authorization: `Basic ${Buffer.from(`${this.settings.username}:${this.settings.password}`).toString('base64')}` };
  }

  private refusedMessage(): string {
    return `the BMC refused the credentials of user '${this.settings.username}' (check power.redfish.username and the secret power.redfish.password)`;
  }

  /** The current login, or a new one; concurrent callers share one attempt. */
  private loggedIn(): Promise<Login> {
    if (this.login.current) return Promise.resolve(this.login.current);
    this.login.pending ??= this.logIn()
      .then((login) => {
        this.login.current = login;
        return login;
      })
      .finally(() => {
        this.login.pending = undefined;
      });
    return this.login.pending;
  }

  private async logIn(): Promise<Login> {
    if (this.settings.auth === 'basic') return { kind: 'basic' };
    let sessions: string | undefined;
    try {
      const root = (await this.serviceRoot()).json;
      sessions = odataId((root.Links as Record<string, unknown> | undefined)?.Sessions);
      const service = odataId(root.SessionService);
      if (!sessions && service) sessions = `${service.replace(/\/$/, '')}/Sessions`;
    } catch (error) {
      // A root that wants credentials breaks DSP0266; try the standard place, as sushy does.
      if (!(error instanceof RedfishError) || error.status !== 401) throw error;
      sessions = DEFAULT_SESSIONS;
    }
    if (!sessions) {
      if (this.settings.auth === 'session')
        throw new Error('the BMC has no SessionService (power.redfish.auth=session); set power.redfish.auth=auto or basic');
      this.logger.info({ bmc: this.origin }, 'the BMC has no session service; using Basic authentication');
      return { kind: 'basic' };
    }
    const response = await this.raw('POST', sessions, { UserName: this.settings.username, Password: this.settings.password });
    const token = response.headers['x-auth-token'];
    if (response.status < 300 && typeof token === 'string' && token !== '') {
      const location = response.headers.location;
      this.logger.debug({ bmc: this.origin, user: this.settings.username }, 'logged in to the BMC (session)');
      return { kind: 'session', token, location: typeof location === 'string' ? new URL(location, this.origin).pathname : undefined };
    }
    if (response.status === 401 || response.status === 403) {
      const error = redfishErrorFrom(this.origin, 'POST', sessions, response.status, response.body);
      throw new CredentialsRefused(`${this.refusedMessage()}: ${error.message}`);
    }
    const why =
      response.status < 300
        ? `POST ${sessions} answered ${response.status} without an X-Auth-Token`
        : redfishErrorFrom(this.origin, 'POST', sessions, response.status, response.body).message;
    if (this.settings.auth === 'session') throw new Error(`cannot open a session: ${why}`);
    this.logger.info({ bmc: this.origin, reason: why }, 'cannot open a session with the BMC; using Basic authentication');
    return { kind: 'basic' };
  }

  /** Ends the session, if any (best effort: the BMC also ends it after its SessionTimeout). */
  async logOut(): Promise<void> {
    const login = this.login.current;
    this.login.current = undefined;
    if (login?.kind !== 'session' || !login.location) return;
    try {
      await this.connection.request('DELETE', login.location, {
        headers: { 'x-auth-token': login.token },
        timeoutMs: Math.min(this.settings.requestTimeoutMs, 3000),
        attempts: 1,
      });
    } catch (error) {
      this.logger.debug({ bmc: this.origin, reason: (error as Error).message }, 'ending the BMC session failed');
    }
  }
}

/** The @odata.id of a link object, or undefined. */
export function odataId(link: unknown): string | undefined {
  const id = (link as { '@odata.id'?: unknown } | undefined)?.['@odata.id'];
  return typeof id === 'string' && id !== '' ? id : undefined;
}

function fetched(path: string, response: RedfishResponse): Fetched {
  let json: unknown;
  try {
    json = JSON.parse(response.body);
  } catch {
    throw new RedfishError('', 'GET', path, response.status, '', 'the answer is not JSON', []);
  }
  if (!json || typeof json !== 'object' || Array.isArray(json))
    throw new RedfishError('', 'GET', path, response.status, '', 'the answer is not a JSON object', []);
  const header = response.headers.etag;
  const bodyTag = (json as Record<string, unknown>)['@odata.etag'];
  const etag = typeof header === 'string' && header !== '' ? header : typeof bodyTag === 'string' && bodyTag !== '' ? bodyTag : undefined;
  return { path, json: json as Record<string, unknown>, etag };
}
