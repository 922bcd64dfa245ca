import { connect } from 'node:net';
import { explainTlsFailure, hostOf, speaksTls } from './tls.js';

/**
 * Whether `address` answers a plaintext HTTP/1.1 request with an HTTP/1.x
 * status line: the controller's metrics port (/metrics, /healthz, network
 * boot) does, its gRPC port (HTTP/2, with or without TLS) never does. grpc-js
 * reports a gRPC client pointed at an HTTP/1 server as a TLS or protocol
 * failure, which sent users after --insecure; this tells them the port is wrong.
 */
export function speaksHttp1(address: string, timeoutMs = 3000): Promise<boolean> {
  const host = hostOf(address);
  const port = Number(address.slice(address.lastIndexOf(':') + 1));
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    let received = '';
    const done = (result: boolean) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    socket.once('connect', () => socket.write(`HEAD /healthz HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`));
    socket.on('data', (chunk: Buffer) => {
      received += chunk.toString('latin1');
      if (received.length >= 9) done(/^HTTP\/1\.[01] /.test(received));
    });
    socket.once('end', () => done(/^HTTP\/1\.[01] /.test(received)));
    socket.once('error', () => done(false));
  });
}

/** The sentence for a gRPC client that reached an HTTP/1 endpoint (`what`: "the controller at 10.0.0.5:9350"). */
export function httpEndpointHint(what: string, flag: string): string {
  return `${what} is an HTTP endpoint, not the gRPC API (it is the controller's --metrics-listen port, which serves /metrics and network boot?): give ${flag} the gRPC address, the --listen one (port 7350 by default)`;
}

/** grpc-js details of a failure below gRPC (the connection or TLS), as opposed to a status the server answered. */
const TRANSPORT_FAILURE =
  /No connection established|Connection dropped|Failed to connect|connect E[A-Z]+|ECONNRESET|Protocol error|Received HTTP status|ssl|tls|certificate|handshake|wrong version number/i;
/** Nothing answers at the address: no point asking it what it speaks. */
const NOTHING_THERE = /ECONNREFUSED|ENOTFOUND|EAI_AGAIN|getaddrinfo|Name resolution failed|EHOSTUNREACH|ENETUNREACH/;

/** Whether grpc-js's details say that nothing answered at all (refused, no such host, no route). */
export const nothingAnswered = (details: string): boolean => NOTHING_THERE.test(details);
/** What a TLS client reports when the server answered in plaintext (HTTP/1, or h2 without TLS). */
const NOT_TLS = /wrong version number|packet length too long|unknown protocol|WRONG_VERSION_NUMBER/i;

/**
 * Why a gRPC client could not connect to `address`, when it is something
 * other than "nothing answers there": an HTTP endpoint (the metrics port),
 * a TLS mismatch, an untrusted certificate. The address is probed only when
 * the failure was below gRPC and could be such a mismatch, so that a TLS
 * client's hiccup never sends plaintext probes to a TLS controller (which
 * would log them as misconfigured clients). undefined: nothing more to say
 * than "cannot reach".
 */
export async function diagnoseConnectionFailure(
  address: string,
  details: string,
  how: {
    /** For a TLS client: where its CA came from ("--ca ca.pem"); undefined for a plaintext client. */
    tlsCaSource: string | undefined;
    /** The flag that names the address, for the HTTP hint ("--controller"). */
    flag: string;
    /** What follows "the controller at X speaks TLS" for a plaintext client: what to do about it. */
    plaintextToTls: string;
  },
): Promise<string | undefined> {
  if (NOTHING_THERE.test(details) || !TRANSPORT_FAILURE.test(details)) return undefined;
  const server = `the controller at ${address}`;
  if (how.tlsCaSource !== undefined) {
    if (NOT_TLS.test(details) && (await speaksHttp1(address))) return httpEndpointHint(server, how.flag);
    return explainTlsFailure(details, server, how.tlsCaSource);
  }
  if (await speaksHttp1(address)) return httpEndpointHint(server, how.flag);
  if (await speaksTls(address)) return `${server} speaks TLS${how.plaintextToTls}`;
  return undefined;
}
