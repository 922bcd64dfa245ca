import type { ClientHttp2Stream, Http2SecureServer, Http2Server, Http2Session } from 'node:http2';
import { Server } from '@grpc/grpc-js';
import { CompressionFilter } from '@grpc/grpc-js/build/src/compression-filter.js';
import { BaseServerInterceptingCall } from '@grpc/grpc-js/build/src/server-interceptors.js';
import { Http2SubchannelCall } from '@grpc/grpc-js/build/src/subchannel-call.js';
import { PooledRequestDecoder } from './pooled-request-decoder.js';

/**
 * Small overrides of @grpc/grpc-js (1.14), installed once when this
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
 *
 * 3. Receive a large response in the pieces it arrived in. grpc-js's client
 *    stream decoder reassembles every message from its HTTP/2 data chunks
 *    with Buffer.concat: a full copy of each 3.5 MiB chunk on the agent, and
 *    a fresh 3.5 MiB allocation for the garbage collector (13 % + GC of the
 *    agent's profile). For a method registered with `receiveInParts`, the
 *    call's decoder hands the message on as a `PartsMessage` (views of the
 *    data chunks, no copy) through grpc-js's compression filter to the
 *    method's deserializer, which must accept it (the fast ReadImage codec
 *    does). Every other method, and every server, keeps grpc-js's decoder.
 *
 * 4. Send a pre-framed request once (uploads): the client's compression
 *    filter copies every request into a new buffer to put the frame header in
 *    front. A request registered with `markFramedRequest` carries room for
 *    it, and is sent as it is.
 *
 * 5. Tell when a server's response has been sent (`onResponseSent`), so that
 *    the buffer a chunk was read into can be read into again (the
 *    controller's chunk pool, common/read-image-codec.ts). grpc-js calls
 *    sendMessage's callback from the HTTP/2 stream's write callback, and
 *    Node's http2 completes a write only once every frame carrying its bytes
 *    has been written to the socket (over TLS: encrypted into TLS's own
 *    buffers): from then on nothing refers to the buffer. A failed write
 *    never calls back, and its buffer is left to the garbage collector.
 *
 * 6. Receive a large request into a pooled buffer (uploads). For a method
 *    registered with `receiveRequestsIntoPool`, the server call's decoder is
 *    a PooledRequestDecoder (common/pooled-request-decoder.ts): the same one
 *    copy as grpc-js's Buffer.concat, into a buffer the handler gives back
 *    once written, instead of a fresh MiB per MiB uploaded.
 *
 * 7. Tell when a pre-framed request (4. above) has been written out
 *    (`onFramedRequestSent`), so that the client can read the next chunk of
 *    the file into it (the CLI's upload pool). Told from the HTTP/2 stream's
 *    write callback, as in 5. Sound only where grpc-js cannot send the
 *    message again: its retrying call keeps a request for a retry only while
 *    the call is uncommitted and the request fits the per-call retry buffer
 *    (256 KiB); a larger request commits the call before it is sent, and a
 *    committed call is never retried. So only requests of more than 256 KiB
 *    are told, and only after a write that did not fail.
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

const framedRequests = new WeakSet<ArrayBufferLike>();

/**
 * Registers an ArrayBuffer that holds one whole serialized request after 5
 * bytes of room: when a client sends it (as a view of the whole buffer, which
 * is what nice-grpc's `Buffer.from` makes of an ArrayBuffer, without a copy),
 * the frame header is written into the room and the buffer goes out as it is.
 */
export function markFramedRequest(buffer: ArrayBuffer): void {
  framedRequests.add(buffer);
}

/** grpc-js's default 'grpc.per_rpc_retry_buffer_size': a request larger than this is never sent twice (see 7.). */
const RETRY_BUFFER_BYTES = 256 * 1024;

/** Called with a pre-framed request's ArrayBuffer once it has been written out; must not throw. */
export type RequestSentHook = (buffer: ArrayBufferLike) => void;

const requestSentHooks: RequestSentHook[] = [];

/** Registers a hook told of every pre-framed request larger than the retry buffer once its bytes are written. */
export function onFramedRequestSent(hook: RequestSentHook): void {
  if (!requestSentHooks.includes(hook)) requestSentHooks.push(hook);
}

const PARTS = Symbol('metalcast.grpcMessageParts');

/** A received message (deframed, uncompressed) as the views of the HTTP/2 data chunks it arrived in. */
export interface PartsMessage {
  readonly [PARTS]: true;
  /** Bytes of the message (the sum of the parts). */
  readonly length: number;
  readonly parts: readonly Buffer[];
}

export function isPartsMessage(value: unknown): value is PartsMessage {
  return typeof value === 'object' && value !== null && (value as Partial<PartsMessage>)[PARTS] === true;
}

/** A PartsMessage of these pieces (what PartsDecoder makes; for decoders' tests). */
export function partsMessage(parts: readonly Buffer[]): PartsMessage {
  return { [PARTS]: true, length: parts.reduce((sum, part) => sum + part.length, 0), parts };
}

/** Below this size a message is reassembled as grpc-js does (one copy of a small message is cheaper than a list). */
const PARTS_MIN_BYTES = 64 * 1024;
const partsPaths = new Set<string>();

/** Responses of this method ('/package.Service/Method') reach its deserializer as PartsMessage when large. */
export function receiveInParts(path: string): void {
  partsPaths.add(path);
}

/**
 * grpc-js's StreamDecoder (length-prefixed messages out of HTTP/2 data
 * chunks), except that a large uncompressed message is returned as its parts.
 * Same limits and the same error text as grpc-js, which reports it as
 * RESOURCE_EXHAUSTED.
 */
class PartsDecoder {
  private readonly header = Buffer.alloc(5);
  private headerBytes = 0;
  private size = 0;
  private remaining = 0;
  private parts: Buffer[] = [];

  constructor(private readonly maxReadMessageLength: number) {}

  write(data: Buffer): (Buffer | PartsMessage)[] {
    const messages: (Buffer | PartsMessage)[] = [];
    let at = 0;
    while (at < data.length) {
      if (this.headerBytes < 5) {
        const n = Math.min(5 - this.headerBytes, data.length - at);
        data.copy(this.header, this.headerBytes, at, at + n);
        this.headerBytes += n;
        at += n;
        if (this.headerBytes === 5) {
          this.size = this.header.readUInt32BE(1);
          if (this.maxReadMessageLength !== -1 && this.size > this.maxReadMessageLength) {
            throw new Error(`Received message larger than max (${this.size} vs ${this.maxReadMessageLength})`);
          }
          this.remaining = this.size;
          this.parts = [];
          if (this.size === 0) messages.push(this.finish());
        }
        continue;
      }
      const n = Math.min(this.remaining, data.length - at);
      this.parts.push(data.subarray(at, at + n));
      this.remaining -= n;
      at += n;
      if (this.remaining === 0) messages.push(this.finish());
    }
    return messages;
  }

  private finish(): Buffer | PartsMessage {
    const parts = this.parts;
    this.parts = [];
    this.headerBytes = 0;
    // Compressed messages go to grpc-js's decompression whole, as before.
    if (this.size < PARTS_MIN_BYTES || this.header[0] !== 0) return Buffer.concat([Buffer.from(this.header), ...parts], this.size + 5);
    return { [PARTS]: true, length: this.size, parts };
  }
}

const pooledRequestPaths = new Set<string>();

/** Requests of this method ('/package.Service/Method') are received into pooled buffers (see 6. above). */
export function receiveRequestsIntoPool(path: string): void {
  pooledRequestPaths.add(path);
}

type SerializingCall = { serializeMessage(value: unknown): Buffer };
type WindowedServer = { options: Record<string, unknown>; createHttp2Server(credentials: unknown): Http2Server | Http2SecureServer };

/** Called with each response a server has finished sending (see 5. above); must not throw. */
export type ResponseSentHook = (message: unknown) => void;

const sentHooks: ResponseSentHook[] = [];

/** Registers a hook told of every response once its bytes have been written out. */
export function onResponseSent(hook: ResponseSentHook): void {
  if (!sentHooks.includes(hook)) sentHooks.push(hook);
}

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

  const sendingPrototype = BaseServerInterceptingCall.prototype as unknown as {
    sendMessage(message: unknown, callback: () => void): void;
  };
  const sendResponse = sendingPrototype.sendMessage;
  if (typeof sendResponse !== 'function') {
    throw new Error('@grpc/grpc-js has no BaseServerInterceptingCall.sendMessage: common/grpc-wire.ts needs updating for this version');
  }
  sendingPrototype.sendMessage = function sendAndTell(this: unknown, message: unknown, callback: () => void): void {
    sendResponse.call(this, message, () => {
      for (const hook of sentHooks) hook(message);
      callback();
    });
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

  // The subchannel call assigns `this.decoder` in its constructor, after `this.http2Stream`: an accessor on the
  // prototype sees the assignment and swaps the decoder for calls of a registered method.
  const DECODER = Symbol('decoder');
  type DecodingCall = { http2Stream?: ClientHttp2Stream; [DECODER]?: unknown };
  if (Object.getOwnPropertyDescriptor(Http2SubchannelCall.prototype, 'decoder') === undefined) {
    Object.defineProperty(Http2SubchannelCall.prototype, 'decoder', {
      configurable: true,
      get(this: DecodingCall) {
        return this[DECODER];
      },
      set(this: DecodingCall, decoder: { maxReadMessageLength?: number }) {
        const path = this.http2Stream?.sentHeaders?.[':path'];
        const inParts = typeof path === 'string' && partsPaths.has(path) && typeof decoder.maxReadMessageLength === 'number';
        this[DECODER] = inParts ? new PartsDecoder(decoder.maxReadMessageLength as number) : decoder;
      },
    });
  }
  type SendingSubchannelCall = {
    http2Stream: ClientHttp2Stream;
    sendMessageWithContext(context: { callback?: () => void; flags?: number }, message: Buffer): void;
  };
  const subchannelPrototype = Http2SubchannelCall.prototype as unknown as SendingSubchannelCall;
  const sendOnStream = subchannelPrototype.sendMessageWithContext;
  if (typeof sendOnStream !== 'function') {
    throw new Error('@grpc/grpc-js has no Http2SubchannelCall.sendMessageWithContext: common/grpc-wire.ts needs updating for this version');
  }
  subchannelPrototype.sendMessageWithContext = function sendAndTellClient(this: SendingSubchannelCall, context, message) {
    const told = message.length > RETRY_BUFFER_BYTES && requestSentHooks.length > 0 && framedRequests.has(message.buffer);
    if (!told) return sendOnStream.call(this, context, message);
    sendOnStream.call(
      this,
      {
        ...context,
        callback: () => {
          // grpc-js calls back after a failed write too (having ended the call): then the buffer is left alone.
          if (!this.http2Stream.destroyed) for (const hook of requestSentHooks) hook(message.buffer);
          context.callback?.();
        },
      },
      message,
    );
  };

  // The server call assigns `this.decoder` in its constructor, after `this.handler`: the same accessor trick.
  type ServerDecodingCall = { handler?: { path?: string }; [DECODER]?: unknown };
  if (Object.getOwnPropertyDescriptor(BaseServerInterceptingCall.prototype, 'decoder') === undefined) {
    Object.defineProperty(BaseServerInterceptingCall.prototype, 'decoder', {
      configurable: true,
      get(this: ServerDecodingCall) {
        return this[DECODER];
      },
      set(this: ServerDecodingCall, decoder: { maxReadMessageLength?: number }) {
        const path = this.handler?.path;
        const pooled = typeof path === 'string' && pooledRequestPaths.has(path) && typeof decoder.maxReadMessageLength === 'number';
        this[DECODER] = pooled ? new PooledRequestDecoder(decoder.maxReadMessageLength as number) : decoder;
      },
    });
  }
  const filterPrototype = CompressionFilter.prototype as unknown as { receiveMessage(message: Promise<unknown>): Promise<unknown> };
  const receiveMessage = filterPrototype.receiveMessage;
  if (typeof receiveMessage !== 'function') {
    throw new Error('@grpc/grpc-js has no CompressionFilter.receiveMessage: common/grpc-wire.ts needs updating for this version');
  }
  type WriteObject = { message: Buffer; flags?: number };
  const sendPrototype = CompressionFilter.prototype as unknown as {
    sendMessage(message: Promise<WriteObject>): Promise<WriteObject>;
  };
  const sendMessage = sendPrototype.sendMessage;
  if (typeof sendMessage !== 'function') {
    throw new Error('@grpc/grpc-js has no CompressionFilter.sendMessage: common/grpc-wire.ts needs updating for this version');
  }
  sendPrototype.sendMessage = async function sendFramed(
    this: { sendCompression?: object; maxSendMessageLength?: number },
    message: Promise<WriteObject>,
  ) {
    const resolved = await message;
    const bytes = resolved.message;
    const framed =
      bytes instanceof Uint8Array &&
      bytes.byteOffset === 0 &&
      framedRequests.has(bytes.buffer) &&
      bytes.byteLength === bytes.buffer.byteLength;
    if (!framed) return sendMessage.call(this, Promise.resolve(resolved));
    // Only uncompressed messages can go out in place; a compressing channel gets the bare message (and copies it),
    // and so does one too large (grpc-js refuses it with its own error).
    const max = this.maxSendMessageLength ?? -1;
    if (this.sendCompression?.constructor?.name !== 'IdentityHandler' || (max !== -1 && bytes.length - 5 > max)) {
      return sendMessage.call(this, Promise.resolve({ ...resolved, message: bytes.subarray(5) }));
    }
    writeGrpcFrameHeader(bytes, 0, bytes.length - 5);
    return { message: bytes, flags: resolved.flags };
  };

  // A PartsMessage is already deframed and uncompressed (PartsDecoder keeps compressed messages whole).
  filterPrototype.receiveMessage = async function receiveParts(this: unknown, message: Promise<unknown>): Promise<unknown> {
    const received = await message;
    return isPartsMessage(received) ? received : receiveMessage.call(this, Promise.resolve(received));
  };
}

install();
