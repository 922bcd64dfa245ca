import { connect } from 'node:net';
import { hostOf } from './tls.js';

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
