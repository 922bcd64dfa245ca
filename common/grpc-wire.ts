import type { Http2SecureServer, Http2Server, Http2Session } from 'node:http2';
import { Server } from '@grpc/grpc-js';
import { BaseServerInterceptingCall } from '@grpc/grpc-js/build/src/server-interceptors.js';

/**
 * Two small overrides of @grpc/grpc-js (1.14), installed once when this
 * module is imported, for the bulk paths (ReadImage, UploadImage). Both are
 * documented in docs/transfer.md and checked by test/common/grpc-wire.test.ts,
 * which fails if a grpc-js upgrade moves what they hook.
 *
 * 1. Serialise a pre-framed response once. grpc-js's server serialises a
 *    response with the handler's serializer (nice-grpc wraps ours in
 *    `Buffer.from`, one full copy) and then copies the result again into a
 *    new buffer to put the 5-byte gRPC frame header in front: two copies of
 *    every 3.5 MiB chunk, a third of the controller's CPU with the garbage
 *    they leave (profile in docs/transfer.md). A message object registered
 *    with `framers` knows how to write its own protobuf header and the gRPC
 *    frame header into room left in front of its data, so serializeMessage
 *    returns a view of the buffer the chunk was read into: no copy at all.
 *    Every other message takes grpc-js's own path.
 *
 * 2. Honour 'grpc-node.flow_control_window' on servers. grpc-js applies it
 *    only to client sessions; a server keeps Node's 64 KiB stream window, so
 *    an upload (client to server) stalls on window updates like downloads
 *    did before the client option was set. The option now also sets the
 *    server's initial stream window and its connection window.
 */

/** A hook that frames one kind of message in place, or returns undefined to leave it to grpc-js. */
export type InPlaceFramer = (message: unknown) => Buffer | undefined;

const framers: InPlaceFramer[] = [];

/** Registers a framer; it must return the complete gRPC frame (5-byte header + protobuf) or undefined. */
export function registerInPlaceFramer(framer: InPlaceFramer): void {
  if (!framers.includes(framer)) framers.push(framer);
}

/** Writes the gRPC length-prefixed-message header (uncompressed) into the 5 bytes at `at`. */
export function writeGrpcFrameHeader(target: Buffer, at: number, messageLength: number): void {
  target[at] = 0;
  target.writeUInt32BE(messageLength, at + 1);
}

type SerializingCall = { serializeMessage(value: unknown): Buffer };
type WindowedServer = { options: Record<string, unknown>; createHttp2Server(credentials: unknown): Http2Server | Http2SecureServer };

let installed = false;

function install(): void {
  if (installed) return;
  installed = true;
  const callPrototype = BaseServerInterceptingCall.prototype as unknown as SerializingCall;
  const serializeMessage = callPrototype.serializeMessage;
  if (typeof serializeMessage !== 'function') {
    throw new Error(
      '@grpc/grpc-js has no BaseServerInterceptingCall.serializeMessage: common/grpc-wire.ts needs updating for this version',
    );
  }
  callPrototype.serializeMessage = function serializeInPlace(this: SerializingCall, value: unknown): Buffer {
    for (const framer of framers) {
      const framed = framer(value);
      if (framed !== undefined) return framed;
    }
    return serializeMessage.call(this, value);
  };

  const serverPrototype = Server.prototype as unknown as WindowedServer;
  const createHttp2Server = serverPrototype.createHttp2Server;
  if (typeof createHttp2Server !== 'function') {
    throw new Error('@grpc/grpc-js has no Server.createHttp2Server: common/grpc-wire.ts needs updating for this version');
  }
  serverPrototype.createHttp2Server = function createWindowedHttp2Server(this: WindowedServer, credentials: unknown) {
    const http2Server = createHttp2Server.call(this, credentials);
    const window = this.options['grpc-node.flow_control_window'];
    if (typeof window === 'number' && window > 65_535) {
      // The stream window is a SETTINGS value sent to each new session; the connection window is per session.
      http2Server.updateSettings({ initialWindowSize: Math.min(window, 2 ** 31 - 1) });
      http2Server.on('session', (session: Http2Session) => {
        try {
          session.setLocalWindowSize(Math.min(window, 2 ** 31 - 1));
        } catch {
          // A session closed before we got to it: nothing to widen.
        }
      });
    }
    return http2Server;
  };
}

install();
