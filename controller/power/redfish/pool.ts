import { createHash } from 'node:crypto';
import type { Logger } from '../../../common/logging.js';
import { LoginState, RedfishClient } from './client.js';
import { BmcConnection } from './connection.js';
import type { RedfishSettings } from './settings.js';

const digest = (text: string) => createHash('sha256').update(text).digest('hex').slice(0, 16);

/**
 * What the redfish driver keeps between actions, per BMC: one connection
 * (keep-alive sockets and the in-flight limit) and one login per user, so
 * that a power sync and a deploy on the same BMC share both, and a BMC
 * does not run out of session slots. One per controller; close() ends the
 * sessions and the sockets.
 */
export class RedfishConnections {
  private readonly connections = new Map<string, BmcConnection>();
  private readonly logins = new Map<string, { login: LoginState; client: RedfishClient }>();

  constructor(private readonly logger: Logger) {}

  /** A client for these settings, sharing the BMC's connection and the user's login. */
  client(settings: RedfishSettings): RedfishClient {
    const connectionKey = [settings.origin, settings.verifyTls, digest(settings.caPem ?? ''), settings.maxInFlight].join('|');
    let connection = this.connections.get(connectionKey);
    if (!connection) {
      connection = new BmcConnection(
        settings.origin,
        { verify: settings.verifyTls, caPem: settings.caPem },
        settings.maxInFlight,
        this.logger,
      );
      this.connections.set(connectionKey, connection);
    }
    // A changed password or auth mode is another login.
    const loginKey = [connectionKey, settings.username, digest(settings.password), settings.auth].join('|');
    let entry = this.logins.get(loginKey);
    if (!entry) {
      const login = new LoginState();
      entry = { login, client: new RedfishClient(connection, settings, login, this.logger) };
      this.logins.set(loginKey, entry);
    }
    return new RedfishClient(connection, settings, entry.login, this.logger);
  }

  /** Ends every session (best effort, briefly) and closes every socket. */
  async close(): Promise<void> {
    await Promise.allSettled([...this.logins.values()].map((entry) => entry.client.logOut()));
    this.logins.clear();
    for (const connection of this.connections.values()) connection.close();
    this.connections.clear();
  }
}
