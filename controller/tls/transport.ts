import type { ServerCredentials } from '@grpc/grpc-js';
import { ConfigError } from '../../common/config.js';
import type { Logger } from '../../common/logging.js';
import {
  type ClientTls,
  fingerprint,
  listenWatchingHandshakes,
  loadCaBundle,
  loadServerTls,
  tlsClient,
  tlsServerCredentials,
} from '../../common/tls.js';
import type { ControllerConfig } from '../config.js';

/** How the controller's gRPC API is secured, built once at start from --tls-* or --insecure. */
export interface ControllerTransport {
  /** undefined: the API is served in plaintext (--insecure). */
  credentials: ServerCredentials | undefined;
  /** What the 'controller started' line says about TLS. */
  summary: Record<string, unknown> | string;
  /** How to reach another controller's API (image copies): TLS verified with --tls-ca, or plaintext when this one is --insecure. */
  peerClient(address: string): ClientTls | undefined;
  /**
   * Starts the gRPC server on `address` with these credentials, and logs
   * connections that fail below gRPC there (common/tls.ts
   * listenWatchingHandshakes); returns the bound port.
   */
  listen(server: ListeningServer, address: string): Promise<number>;
  /** Destroys every connection still open on the API's port (after forceShutdown); returns their peers' addresses. */
  destroyConnections(): string[];
  /** Stops watching handshakes. */
  close(): void;
}

type ListeningServer = { listen(address: string, credentials?: ServerCredentials): Promise<number> };

const EXPIRY_WARNING_MS = 30 * 24 * 3_600_000;

/** What the log says to do when a client and this controller disagree about TLS. */
const HANDSHAKE_HINTS = {
  role: 'this controller',
  plaintextClientHint:
    "agents need --ca (metalcast.ca= on the kernel command line) with the CA bundle that signed this controller's certificate, the CLI --ca (METALCAST_CA)",
  tlsClientHint: 'give the agent --insecure too (metalcast.insecure), or give this controller --tls-cert and --tls-key',
};

/**
 * TLS or --insecure, never both and never neither. Checked at start rather
 * than in loadControllerConfig, which tools that only need the database
 * settings (metalcast token) also call.
 */
function tlsModeProblems(config: ControllerConfig): string[] {
  const given = (
    [
      ['tlsCert', '--tls-cert'],
      ['tlsKey', '--tls-key'],
      ['tlsClientCa', '--tls-client-ca'],
    ] as const
  ).filter(([key]) => config[key] !== '');
  if (config.insecure) {
    return given.length > 0 ? [`--insecure contradicts ${given.map(([, flag]) => flag).join(', ')}: serve TLS or plaintext, not both`] : [];
  }
  if (config.tlsCert === '' && config.tlsKey === '') {
    return [
      "the gRPC API serves TLS: give --tls-cert and --tls-key (PEM files; 'metalcast tls init --dir DIR --host NAME' makes a CA and a certificate for NAME), or --insecure to serve plaintext in an isolated lab",
    ];
  }
  if (config.tlsCert === '' || config.tlsKey === '') return ['--tls-cert and --tls-key go together: give both'];
  return [];
}

/**
 * Reads and checks the TLS files (ConfigError naming the flag when one is
 * unreadable, malformed, expired or the key does not match: exit code 2),
 * and says at start how the API is served: a warning for --insecure.
 */
export function setUpControllerTransport(config: ControllerConfig, logger: Logger): ControllerTransport {
  const problems = tlsModeProblems(config);
  if (problems.length > 0) throw new ConfigError(problems);

  let unwatch: (() => void) | undefined;
  let destroyConnections = (): string[] => [];
  const listenWith = (credentials: ServerCredentials | undefined) => async (server: ListeningServer, address: string) => {
    const watching = await listenWatchingHandshakes(server, address, credentials, HANDSHAKE_HINTS, logger);
    unwatch = watching.unwatch;
    destroyConnections = watching.destroyConnections;
    return watching.port;
  };
  const close = () => {
    unwatch?.();
    unwatch = undefined;
  };

  if (config.insecure) {
    logger.warn(
      { listen: config.listen },
      'serving gRPC in plaintext (--insecure): agent and operator tokens and images cross the network readable by anyone on it, and anyone there can pose as an agent or as this controller; for isolated labs and tests only',
    );
    return {
      credentials: undefined,
      summary: 'off (--insecure)',
      peerClient: () => undefined,
      listen: listenWith(undefined),
      destroyConnections: () => destroyConnections(),
      close,
    };
  }

  const tls = loadServerTls({ cert: config.tlsCert, key: config.tlsKey, clientCa: config.tlsClientCa || undefined });
  const peerCaPem = config.tlsCa ? loadCaBundle(config.tlsCa, '--tls-ca') : undefined;
  const { certificate } = tls;
  const summary = {
    subject: certificate.subject.replaceAll('\n', ', '),
    names: certificate.subjectAltName ?? '',
    validTo: new Date(certificate.validTo).toISOString(),
    fingerprint: fingerprint(certificate),
    operatorClientCertificates: tls.clientCaPem !== undefined,
  };
  if (Date.parse(certificate.validTo) - Date.now() < EXPIRY_WARNING_MS) {
    logger.warn({ validTo: summary.validTo, cert: config.tlsCert }, 'the TLS certificate expires within 30 days: renew it, then restart');
  }
  const credentials = tlsServerCredentials(tls);
  return {
    credentials,
    summary,
    peerClient: (address) => tlsClient(address, { caPem: peerCaPem }),
    listen: listenWith(credentials),
    destroyConnections: () => destroyConnections(),
    close,
  };
}
