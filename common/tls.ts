import { createPrivateKey, type KeyObject, X509Certificate } from 'node:crypto';
import diagnostics from 'node:diagnostics_channel';
import type { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { isIP, Server as NetServer, type Socket } from 'node:net';
import { checkServerIdentity, connect, createSecureContext, type PeerCertificate, Server as TlsServer, type TLSSocket } from 'node:tls';
import { type ChannelOptions, ChannelCredentials, ServerCredentials } from '@grpc/grpc-js';
import { ConfigError } from './config.js';
import type { Logger } from './logging.js';

/**
 * TLS for every gRPC connection: loading and checking PEM files, server and
 * channel credentials (TLS 1.2 at least; 1.3 is what Node's OpenSSL prefers
 * and negotiates whenever the peer has it), a certificate pinned by its
 * fingerprint, and the words an operator needs when the two ends disagree
 * about TLS.
 */

/** The oldest protocol any metalcast endpoint accepts. */
export const TLS_MIN_VERSION = 'TLSv1.2';

/** A certificate chain (leaf first) and its key, as the server presents them. */
export interface ServerIdentity {
  certPem: string;
  keyPem: string;
}

/** What a TLS server needs: its identity and, for operator mTLS, the CA whose client certificates it accepts. */
export interface ServerTls extends ServerIdentity {
  /** The leaf certificate, for logs (subject, expiry, fingerprint). */
  certificate: X509Certificate;
  /** PEM of the CA(s) that sign operator client certificates; undefined: no client certificates are asked for. */
  clientCaPem?: string;
}

/** The certificates in a PEM text, in order; throws with a message naming `what` when there are none or one is malformed. */
export function parseCertificates(pem: string, what: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) {
    const hint = /PRIVATE KEY-----/.test(pem) ? ' (it holds a private key: is it the key file?)' : '';
    throw new Error(`${what} holds no PEM certificate${hint}`);
  }
  return blocks.map((block, i) => {
    try {
      return new X509Certificate(block);
    } catch (error) {
      throw new Error(`${what}: certificate ${i + 1} is not a valid X.509 certificate (${(error as Error).message})`);
    }
  });
}

/** SHA-256 fingerprint as Node prints it ("AB:CD:…"), the form pins are compared in. */
export function fingerprint(certificate: X509Certificate | PeerCertificate): string {
  return certificate.fingerprint256;
}

function readText(path: string, source: string, problems: string[]): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : (error as Error).message;
    problems.push(`${source}: cannot read ${path}: ${why}`);
    return undefined;
  }
}

function checkValidity(certificate: X509Certificate, source: string, now: number, problems: string[]): void {
  if (Date.parse(certificate.validTo) < now) {
    problems.push(
      `${source}: the certificate expired on ${new Date(certificate.validTo).toISOString()}; make a new one (metalcast tls init)`,
    );
  } else if (Date.parse(certificate.validFrom) > now) {
    problems.push(
      `${source}: the certificate is not valid before ${new Date(certificate.validFrom).toISOString()}; is this machine's clock right?`,
    );
  }
}

/**
 * Reads and checks a server's certificate, key and optional client CA: every
 * file readable, PEM that parses, the key matching the certificate, the
 * certificate valid now. All problems are collected into one ConfigError,
 * each naming the flag, so that the operator fixes them in one go.
 */
export function loadServerTls(
  files: { cert: string; key: string; clientCa?: string },
  flags: { cert: string; key: string; clientCa: string } = { cert: '--tls-cert', key: '--tls-key', clientCa: '--tls-client-ca' },
  now = Date.now(),
): ServerTls {
  const problems: string[] = [];
  const certPem = readText(files.cert, flags.cert, problems);
  const keyPem = readText(files.key, flags.key, problems);
  const clientCaPem = files.clientCa ? readText(files.clientCa, flags.clientCa, problems) : undefined;
  let certificate: X509Certificate | undefined;
  let key: KeyObject | undefined;
  if (certPem !== undefined) {
    try {
      certificate = parseCertificates(certPem, `${flags.cert} ${files.cert}`)[0];
    } catch (error) {
      problems.push((error as Error).message);
    }
  }
  if (keyPem !== undefined) {
    try {
      key = createPrivateKey(keyPem);
    } catch (error) {
      problems.push(`${flags.key} ${files.key} holds no usable PEM private key (${(error as Error).message})`);
    }
  }
  if (certificate && key && !certificate.checkPrivateKey(key)) {
    problems.push(
      `${flags.key} ${files.key} does not match the certificate in ${flags.cert} ${files.cert}: give the key the certificate was made for`,
    );
  }
  if (certificate) checkValidity(certificate, `${flags.cert} ${files.cert}`, now, problems);
  if (clientCaPem !== undefined) {
    try {
      for (const ca of parseCertificates(clientCaPem, `${flags.clientCa} ${files.clientCa}`)) {
        if (!ca.ca) problems.push(`${flags.clientCa} ${files.clientCa}: ${ca.subject} is not a CA certificate`);
      }
    } catch (error) {
      problems.push((error as Error).message);
    }
  }
  if (problems.length > 0 || !certPem || !keyPem || !certificate) throw new ConfigError(problems);
  return { certPem, keyPem, certificate, clientCaPem };
}

/** Reads a CA bundle (one or more PEM certificates) that a client verifies its server with; ConfigError naming `source` when it cannot. */
export function loadCaBundle(path: string, source: string): string {
  const problems: string[] = [];
  const pem = readText(path, source, problems);
  if (pem !== undefined) {
    try {
      parseCertificates(pem, `${source} ${path}`);
    } catch (error) {
      problems.push((error as Error).message);
    }
  }
  if (problems.length > 0 || pem === undefined) throw new ConfigError(problems);
  return pem;
}

/** Reads a client certificate and key (operator mTLS); ConfigError naming the flags when they are unreadable or do not match. */
export function loadClientIdentity(files: { cert: string; key: string }, flags: { cert: string; key: string }): ServerIdentity {
  const tls = loadServerTls(files, { ...flags, clientCa: '' });
  return { certPem: tls.certPem, keyPem: tls.keyPem };
}

/**
 * Server credentials with a floor on the protocol version. grpc-js's
 * createSsl() sets neither minVersion nor "ask for a client certificate
 * without requiring one" (with checkClientCertificate it sets requestCert
 * and Node's default rejectUnauthorized then refuses every client without
 * one, agents included). Its constructor and context options go straight
 * into http2.createSecureServer(), so a subclass sets both.
 */
class MetalcastServerCredentials extends ServerCredentials {
  constructor(tls: ServerIdentity & { clientCaPem?: string }) {
    super(
      {
        minVersion: TLS_MIN_VERSION,
        // Operators may present a certificate signed by the client CA; agents present none.
        requestCert: tls.clientCaPem !== undefined,
        rejectUnauthorized: false,
      },
      { minVersion: TLS_MIN_VERSION, cert: tls.certPem, key: tls.keyPem, ca: tls.clientCaPem },
    );
  }

  _equals(other: ServerCredentials): boolean {
    return other === this;
  }
}

/** Credentials for a TLS gRPC server (controller, agent). */
export function tlsServerCredentials(tls: ServerIdentity & { clientCaPem?: string }): ServerCredentials {
  return new MetalcastServerCredentials(tls);
}

/** Host part of host:port, without IPv6 brackets. */
export function hostOf(address: string): string {
  return address.slice(0, address.lastIndexOf(':')).replace(/^\[|\]$/g, '');
}

/** A client's TLS settings: credentials plus the channel options they need. */
export interface ClientTls {
  credentials: ChannelCredentials;
  /** Spread into the channel options. */
  channelOptions: ChannelOptions;
}

/**
 * Credentials to reach `address` over TLS, verifying the server against
 * `caPem` (Node's bundled CAs when undefined) and the host name in the address, optionally presenting a client
 * certificate. An IP address is checked against the certificate's IP
 * entries, but not sent as SNI (RFC 6066 forbids it and Node warns).
 */
export function tlsClient(address: string, options: { caPem: string | undefined; client?: ServerIdentity }): ClientTls {
  const host = hostOf(address);
  const context = createSecureContext({
    minVersion: TLS_MIN_VERSION,
    ca: options.caPem,
    cert: options.client?.certPem,
    key: options.client?.keyPem,
  });
  if (isIP(host) === 0) return { credentials: ChannelCredentials.createFromSecureContext(context), channelOptions: {} };
  return {
    credentials: ChannelCredentials.createFromSecureContext(context, {
      checkServerIdentity: (_sni: string, certificate: PeerCertificate) => checkServerIdentity(host, certificate),
    }),
    channelOptions: { 'grpc.ssl_target_name_override': 'metalcast' },
  };
}

/**
 * Credentials that trust exactly one certificate: the one pinned for a
 * node's agent. It is the only root, and the certificate presented must be
 * that very one (same SHA-256 fingerprint); host names play no part, since
 * the agent's self-signed certificate is all that identifies it.
 */
export function pinnedTlsClient(certPem: string): ClientTls & { fingerprint: string } {
  const pinned = fingerprint(parseCertificates(certPem, 'the pinned certificate')[0] as X509Certificate);
  const context = createSecureContext({ minVersion: TLS_MIN_VERSION, ca: certPem });
  return {
    fingerprint: pinned,
    credentials: ChannelCredentials.createFromSecureContext(context, {
      checkServerIdentity: (_host: string, certificate: PeerCertificate) =>
        certificate.fingerprint256 === pinned
          ? undefined
          : Object.assign(
              new Error(`the agent presented certificate ${certificate.fingerprint256}, not the one pinned for its node (${pinned})`),
              {
                code: 'ERR_METALCAST_PIN_MISMATCH',
              },
            ),
    }),
    channelOptions: { 'grpc.ssl_target_name_override': 'metalcast-agent' },
  };
}

/**
 * What a failed TLS connection means, from the failure text grpc-js reports
 * (UNAVAILABLE details), for someone who has to fix it; undefined when it
 * is not about TLS.
 */
export function explainTlsFailure(details: string, server: string, caSource: string): string | undefined {
  if (/wrong version number|packet length too long|unknown protocol|WRONG_VERSION_NUMBER/i.test(details)) {
    return `${server} does not speak TLS (is it running with --insecure?): give it --tls-cert and --tls-key, or run this side with --insecure too`;
  }
  if (/Hostname\/IP does not match|ERR_TLS_CERT_ALTNAME_INVALID/i.test(details)) {
    return `the certificate of ${server} does not name the host it was reached at: make it with that name (metalcast tls init --host NAME), or use a name it has`;
  }
  if (/certificate has expired|certificate is not yet valid/i.test(details)) {
    return `the certificate of ${server} is outside its validity period (${/certificate has expired/i.test(details) ? 'expired' : 'not yet valid'}): renew it, or check the clocks`;
  }
  if (
    /self[- ]signed certificate|unable to verify|unable to get (local )?issuer|certificate signature failure|CERT_UNTRUSTED/i.test(details)
  ) {
    return `the certificate of ${server} is not signed by a CA in ${caSource}: give the CA bundle that signed it`;
  }
  if (/alert (protocol version|unsupported)|unsupported protocol|no protocols available/i.test(details)) {
    return `${server} and this side share no TLS version (metalcast needs TLS 1.2 or newer)`;
  }
  if (/alert (bad certificate|certificate required|unknown ca)|handshake failure/i.test(details)) {
    return `${server} refused the TLS handshake: ${details.replace(/^.*?Error: /, '').slice(0, 200)}`;
  }
  return undefined;
}

/**
 * Whether something at `address` completes a TLS handshake (offering h2, not
 * verifying anything): how a plaintext client tells "the server speaks TLS"
 * from "the server is down", since grpc-js reports both as a failure to
 * connect.
 */
export function speaksTls(address: string, timeoutMs = 3000): Promise<boolean> {
  const host = hostOf(address);
  const port = Number(address.slice(address.lastIndexOf(':') + 1));
  return new Promise((resolve) => {
    const socket = connect({
      host,
      port,
      ALPNProtocols: ['h2'],
      rejectUnauthorized: false,
      servername: isIP(host) === 0 ? host : undefined,
      minVersion: TLS_MIN_VERSION,
    });
    const done = (result: boolean) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    socket.once('secureConnect', () => done(true));
    socket.once('error', () => done(false));
  });
}

/** How to describe failed handshakes on one of our listening ports. */
export interface HandshakeWatch {
  /** What serves the port, for messages: "this controller". */
  role: string;
  /** What a plaintext client must be given to connect, for the log line. */
  plaintextClientHint: string;
  /** What a TLS client (or the server) must be given when the port is plaintext. */
  tlsClientHint: string;
}

/** One log line per peer host and kind of failure at most this often, so that a misconfigured fleet does not flood the log. */
const HANDSHAKE_LOG_INTERVAL_MS = 60_000;
const LISTEN_CHANNEL = 'tracing:net.server.listen:asyncEnd';
const SERVER_SOCKET_CHANNEL = 'net.server.socket';

type Listeners = { event: string; listener: (...args: unknown[]) => void }[];

/**
 * Starts a nice-grpc server listening (server.listen(address, credentials))
 * and logs the connections that then fail below gRPC on its port: a
 * plaintext client on a TLS port (and other TLS handshake failures), or a
 * TLS client on a plaintext port. grpc-js handles those without telling the
 * application (only its tracer sees them) and does not expose its http2
 * servers, so Node's diagnostics channels find them: every server that
 * finishes listen() while this listen() runs ('tracing:net.server.listen')
 * is hooked, and those not on the port it returns are let go again; as a
 * fallback, the first accepted socket on that port ('net.server.socket')
 * names its server. A TLS server gets a 'tlsClientError' listener, a
 * plaintext one 'session'/'sessionError' ("bad client magic" is a TLS
 * ClientHello). Returns the port, the function that stops watching, and
 * one that destroys every connection still open on the port: grpc-js's
 * server's close waits for every socket, and two kinds outlive grpc-js's
 * forceShutdown: one still in its TLS handshake when the stop began (an
 * agent reconnecting after its heartbeat stream was ended), which grpc-js
 * does not know yet; and one whose session the stop had already closed
 * gracefully, whose peer went silent (the agent of a machine just powered
 * off): Node's http2 then only ends that socket and waits for a FIN that
 * never comes. Both held the controller's stop until it gave up.
 */
export async function listenWatchingHandshakes(
  server: { listen(address: string, credentials?: ServerCredentials): Promise<number> },
  address: string,
  credentials: ServerCredentials | undefined,
  watch: HandshakeWatch,
  logger: Logger,
): Promise<{ port: number; unwatch: () => void; destroyConnections: () => string[] }> {
  const secure = credentials !== undefined;
  // Every connection accepted on the port, so that a shutdown can end the ones grpc-js does not know of (below).
  const connections = new Set<Socket>();
  const hooked = new Map<EventEmitter, Listeners>();
  const lastLogged = new Map<string, number>();
  const peers = new WeakMap<object, string>();
  let port: number | undefined;

  const report = (peer: string | undefined, kind: string, level: 'warn' | 'debug', fields: Record<string, unknown>, message: string) => {
    const key = `${kind} ${peer?.replace(/:\d+$/, '') ?? '?'}`;
    const now = Date.now();
    if (level === 'warn' && now - (lastLogged.get(key) ?? 0) < HANDSHAKE_LOG_INTERVAL_MS) return;
    lastLogged.set(key, now);
    if (lastLogged.size > 10_000) lastLogged.clear();
    logger[level]({ peer, ...fields }, message);
  };

  const onTlsClientError = (...args: unknown[]) => {
    const [error, socket] = args as [NodeJS.ErrnoException, TLSSocket & { _parent?: Socket }];
    const peer = addressOf(socket) ?? (socket._parent ? peers.get(socket._parent) : undefined);
    const code = error.code ?? '';
    if (
      code === 'ERR_SSL_WRONG_VERSION_NUMBER' ||
      code === 'ERR_SSL_HTTP_REQUEST' ||
      /wrong version number|http request/i.test(error.message)
    ) {
      report(
        peer,
        'plaintext',
        'warn',
        {},
        `a client spoke plaintext to ${watch.role}, which speaks TLS; connection refused: ${watch.plaintextClientHint}`,
      );
    } else if (code === 'ECONNRESET' || /socket hang up|ECONNRESET/.test(error.message)) {
      // A client that gave up mid-handshake (it may not trust our certificate; its own log says why), or a port scan.
      report(peer, 'hangup', 'debug', { reason: error.message }, 'TLS handshake abandoned by the client');
    } else {
      const reason = error.message.split('\n')[0]?.replace(/^[0-9A-F]+:error:[0-9A-F]+:/, '');
      report(peer, code || 'tls', 'warn', { reason }, `TLS handshake with a client failed on ${watch.role}`);
    }
  };
  const onSession = (...args: unknown[]) => {
    const session = args[0] as { socket?: Socket };
    const peer = session.socket ? addressOf(session.socket) : undefined;
    if (peer) peers.set(session, peer);
  };
  const onSessionError = (...args: unknown[]) => {
    const [error, session] = args as [Error, { socket?: Socket }];
    if (!/bad client magic/i.test(error.message)) return;
    report(
      peers.get(session),
      'tls-on-plaintext',
      'warn',
      {},
      `a client tried TLS on ${watch.role}, which speaks plaintext (--insecure); connection refused: ${watch.tlsClientHint}`,
    );
  };

  const hook = (candidate: EventEmitter) => {
    if (hooked.has(candidate) || secure !== candidate instanceof TlsServer) return;
    const listeners: Listeners = secure
      ? [{ event: 'tlsClientError', listener: onTlsClientError }]
      : [
          { event: 'session', listener: onSession },
          { event: 'sessionError', listener: onSessionError },
        ];
    for (const { event, listener } of listeners) candidate.on(event, listener);
    hooked.set(candidate, listeners);
  };
  const unhook = (candidate: EventEmitter) => {
    for (const { event, listener } of hooked.get(candidate) ?? []) candidate.off(event, listener);
    hooked.delete(candidate);
  };
  const onListen = (message: unknown) => {
    const candidate = (message as { server?: unknown }).server;
    if (candidate instanceof NetServer) hook(candidate);
  };
  const onSocket = (message: unknown) => {
    const socket = (message as { socket?: Socket & { server?: EventEmitter } }).socket;
    if (!socket || port === undefined || socket.localPort !== port) return;
    connections.add(socket);
    socket.once('close', () => connections.delete(socket));
    const peer = addressOf(socket);
    if (peer) peers.set(socket, peer);
    if (socket.server) hook(socket.server);
  };

  diagnostics.subscribe(LISTEN_CHANNEL, onListen);
  try {
    port = await server.listen(address, credentials);
  } catch (error) {
    for (const candidate of [...hooked.keys()]) unhook(candidate);
    throw error;
  } finally {
    diagnostics.unsubscribe(LISTEN_CHANNEL, onListen);
  }
  // Servers of another listen() that ran at the same time are not ours.
  for (const candidate of [...hooked.keys()]) {
    const bound = (candidate as NetServer).address();
    if (typeof bound !== 'object' || bound?.port !== port) unhook(candidate);
  }
  diagnostics.subscribe(SERVER_SOCKET_CHANNEL, onSocket);
  return {
    port,
    unwatch: () => {
      diagnostics.unsubscribe(SERVER_SOCKET_CHANNEL, onSocket);
      for (const candidate of [...hooked.keys()]) unhook(candidate);
    },
    destroyConnections: () => {
      const open = [...connections];
      for (const socket of open) socket.destroy();
      connections.clear();
      return open.map((socket) => addressOf(socket) ?? 'unknown peer');
    },
  };
}

function addressOf(socket: Socket): string | undefined {
  const host = socket.remoteAddress;
  if (!host) return undefined;
  return `${host.includes(':') ? `[${host}]` : host}:${socket.remotePort}`;
}
