import { constants as http2 } from 'node:http2';
import type { ServerHttp2Stream } from 'node:http2';
import { BaseServerInterceptingCall } from '@grpc/grpc-js/build/src/server-interceptors.js';

/**
 * Per-method receive limits, enforced at the 5-byte gRPC length prefix.
 *
 * grpc-js has one receive limit per server (`grpc.max_receive_message_length`),
 * sized for its largest request (UploadImage data). It does refuse a message
 * past that limit at its length prefix, but then keeps the HTTP/2 stream open:
 * the client goes on uploading the rest (a 100 MB message took 5 to 7 s on
 * loopback, and the controller's RSS grew by tens of MB each time), and the
 * status the client finally sees depended on the race between the trailers and
 * the stream's end (RESOURCE_EXHAUSTED, or UNAVAILABLE "Stream refused by
 * server").
 *
 * So, installed once when this module is imported: each server call's stream
 * decoder gets its method's own limit (registered by guardRequestDecoding,
 * common/request-decoding.ts) before the first byte is decoded; a message whose
 * length prefix is over it is refused at once with RESOURCE_EXHAUSTED and a
 * message naming the method and both sizes, nothing after it is decoded, and
 * the stream is reset with NO_ERROR right behind the trailers (RFC 9113 8.1:
 * the way a server that has answered tells the client to stop sending). The
 * client sees the status, then stops. test/common/receive-limits.test.ts
 * fails if a grpc-js upgrade moves what this hooks.
 */

interface Limit {
  bytes: number;
  /** "NodeService/CreateNode", for the message. */
  what: string;
}

const limits = new Map<string, Limit>();

/** Sets the largest request message `path` ('/package.Service/Method') takes, checked at the length prefix. */
export function setReceiveLimit(path: string, bytes: number, what: string): void {
  limits.set(path, { bytes, what });
}

/** The limit registered for `path`, if any (tests). */
export function receiveLimitOf(path: string): number | undefined {
  return limits.get(path)?.bytes;
}

const TOO_LARGE = /^Received message larger than max \((\d+) vs (\d+)\)$/;

interface CallInternals {
  handler?: { path?: string };
  decoder?: { maxReadMessageLength: number; write(data: Buffer): Buffer[] };
  stream: ServerHttp2Stream;
  metalcastLimited?: boolean;
  metalcastRefused?: boolean;
}

const proto = BaseServerInterceptingCall.prototype as unknown as { handleDataFrame(this: CallInternals, data: Buffer): void };
const handleDataFrame = proto.handleDataFrame;
if (typeof handleDataFrame !== 'function') {
  throw new Error('@grpc/grpc-js changed: BaseServerInterceptingCall.handleDataFrame is gone (common/receive-limits.ts)');
}

proto.handleDataFrame = function limitedDataFrame(this: CallInternals, data: Buffer): void {
  // Answered already: whatever else arrives before the reset is dropped, not decoded.
  if (this.metalcastRefused) return;
  if (!this.metalcastLimited) {
    this.metalcastLimited = true;
    const decoder = this.decoder;
    const limit = limits.get(this.handler?.path ?? '');
    if (decoder) {
      if (limit && (decoder.maxReadMessageLength === -1 || decoder.maxReadMessageLength > limit.bytes)) {
        decoder.maxReadMessageLength = limit.bytes;
      }
      const write = decoder.write.bind(decoder);
      const what = limit?.what ?? (this.handler?.path ?? '').split('.').at(-1) ?? 'this method';
      decoder.write = (chunk: Buffer) => {
        try {
          return write(chunk);
        } catch (error) {
          const match = TOO_LARGE.exec((error as Error).message);
          if (!match) throw error;
          this.metalcastRefused = true;
          throw new Error(`request: ${match[1]} bytes, more than the ${match[2]} that ${what} accepts`);
        }
      };
    }
  }
  handleDataFrame.call(this, data);
  if (this.metalcastRefused && !this.stream.closed && !this.stream.destroyed) {
    this.stream.close(http2.NGHTTP2_NO_ERROR);
  }
};
