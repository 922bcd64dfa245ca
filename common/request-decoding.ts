import { type CallContext, type CompatServiceDefinition, type ServerMiddleware, ServerError, Status } from 'nice-grpc';
import { setReceiveLimit } from './receive-limits.js';

/**
 * Requests that cannot be decoded, or that are larger than their service
 * takes, answered as statuses the caller can act on.
 *
 * grpc-js answers a request its deserializer throws on with INTERNAL
 * ("Error deserializing request") before any handler or middleware runs: to
 * an operator that looks like a server bug, and a hostile peer can raise it
 * at will. And grpc-js has one `grpc.max_receive_message_length` per server,
 * sized for the largest message any of its services takes (UploadImage
 * data). So each service's definition is wrapped: its request decoder
 * catches what it cannot decode and measures what it gets against the
 * service's own limit, and returns a marker instead of throwing;
 * {@link rejectUndecodableRequests} turns the marker into INVALID_ARGUMENT
 * or RESOURCE_EXHAUSTED inside the middleware chain, so that it is counted
 * like any other call (on the agent, after the token check).
 *
 * Each method's limit is also set on its calls' stream decoders
 * (common/receive-limits.ts), which refuse an oversized message at its
 * length prefix, before its body is read, with the same message; the check
 * here still catches what only decompression makes too large.
 */

/** Requests agents send (Lookup, Heartbeat, StatImage, ReadImage) and the Agent API's: a heartbeat with its certificate is a few KiB. */
export const AGENT_REQUEST_LIMIT_BYTES = 64 * 1024;
/** Operator requests other than UploadImage: a node with 64 MACs and 64 properties of 1024 characters is under 300 KiB. */
export const OPERATOR_REQUEST_LIMIT_BYTES = 1024 * 1024;
/**
 * grpc.health.v1 requests: a service name. The health service quotes an unknown name in its
 * NOT_FOUND, and a status message past the peer's header limit (about 64 KiB) makes the peer's
 * HTTP/2 session fail, taking every call on that connection with it.
 */
export const HEALTH_REQUEST_LIMIT_BYTES = 1024;

const UNDECODABLE = Symbol('undecodable request');

interface Undecodable {
  [UNDECODABLE]: ServerError;
}

function isUndecodable(value: unknown): value is Undecodable {
  return typeof value === 'object' && value !== null && UNDECODABLE in value;
}

type Decode = (bytes: Uint8Array) => unknown;

/** Thrown by {@link checkWireLengths}. */
class LengthPastEnd extends Error {}

/** A varint at `at`: [value, next position], or undefined when it is truncated or longer than 10 bytes. */
function varint(bytes: Uint8Array, at: number): [number, number] | undefined {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10 && at + i < bytes.length; i++) {
    const byte = bytes[at + i] as number;
    value += (byte & 0x7f) * scale;
    scale *= 128;
    if (byte < 0x80) return [value, at + i + 1];
  }
  return undefined;
}

/**
 * Walks protobuf wire format and throws LengthPastEnd when a length-delimited
 * field claims more bytes than follow it, at this level or inside any field
 * whose bytes parse as a message (without the schema, a field may be a
 * message). Returns quietly at anything else malformed: decoders throw at
 * once there. google-protobuf (the reflection service's generated code) does
 * not: it loops over the claimed length, so six bytes claiming a 4 GiB
 * string keep the event loop busy for minutes.
 */
export function checkWireLengths(bytes: Uint8Array, depth = 0): void {
  let at = 0;
  while (at < bytes.length) {
    const tag = varint(bytes, at);
    if (!tag) return;
    at = tag[1];
    switch (tag[0] & 7) {
      case 0: {
        const value = varint(bytes, at);
        if (!value) return;
        at = value[1];
        break;
      }
      case 1:
        at += 8;
        break;
      case 5:
        at += 4;
        break;
      case 2: {
        const length = varint(bytes, at);
        if (!length) return;
        at = length[1];
        if (length[0] > bytes.length - at) {
          throw new LengthPastEnd(`field ${Math.floor(tag[0] / 8)} claims ${length[0]} bytes, ${bytes.length - at} follow`);
        }
        if (depth < 32) checkWireLengths(bytes.subarray(at, at + length[0]), depth + 1);
        at += length[0];
        break;
      }
      default:
        return;
    }
  }
}

function guard(decode: Decode, what: string, maxBytes: number | undefined, checkLengths = false): Decode {
  return (bytes) => {
    if (maxBytes !== undefined && bytes.byteLength > maxBytes) {
      return {
        [UNDECODABLE]: new ServerError(
          Status.RESOURCE_EXHAUSTED,
          `request: ${bytes.byteLength} bytes, more than the ${maxBytes} that ${what} accepts`,
        ),
      } satisfies Undecodable;
    }
    try {
      if (checkLengths) checkWireLengths(bytes);
      return decode(bytes);
    } catch (error) {
      const reason = String((error as Error)?.message ?? error).slice(0, 120);
      return {
        [UNDECODABLE]: new ServerError(Status.INVALID_ARGUMENT, `request: not a valid ${what} request message (${reason})`),
      } satisfies Undecodable;
    }
  };
}

/**
 * The definition with every method's request decoder guarded (see above).
 * `maxBytes` is the largest request in bytes, for every method or by method
 * name (as in the proto, e.g. 'UploadImage'); undefined leaves the server's
 * transport limit as the only one.
 */
export function guardRequestDecoding<Service extends CompatServiceDefinition>(
  definition: Service,
  maxBytes: number | ((methodName: string) => number | undefined),
): Service {
  const limitOf = (name: string) => (typeof maxBytes === 'number' ? maxBytes : maxBytes(name));
  if ('methods' in definition && 'fullName' in definition && typeof definition.fullName === 'string') {
    // A ts-proto definition: nice-grpc decodes with requestType.decode.
    const methods: Record<string, unknown> = {};
    for (const [key, method] of Object.entries(definition.methods as Record<string, { name: string; requestType: { decode: Decode } }>)) {
      const what = `${definition.fullName.split('.').at(-1)}/${method.name}`;
      const limit = limitOf(method.name);
      // Also at the length prefix, before the body is read (common/receive-limits.ts).
      if (limit !== undefined) setReceiveLimit(`/${definition.fullName}/${method.name}`, limit, what);
      methods[key] = {
        ...method,
        requestType: {
          ...method.requestType,
          decode: guard(
            (bytes) => method.requestType.decode(bytes),
            `${definition.fullName.split('.').at(-1)}/${method.name}`,
            limitOf(method.name),
          ),
        },
      };
    }
    return { ...definition, methods } as Service;
  }
  // A grpc-js or nice-grpc definition: every method has a requestDeserialize.
  const methods: Record<string, unknown> = {};
  for (const [key, method] of Object.entries(definition as Record<string, { path: string; requestDeserialize: Decode }>)) {
    const [service = '', name = key] = method.path.split('/').slice(1);
    const limit = limitOf(name);
    if (limit !== undefined) setReceiveLimit(method.path, limit, `${service.split('.').at(-1)}/${name}`);
    methods[key] = {
      ...method,
      // Not ts-proto: google-protobuf code (reflection), which must not see lengths past the end.
      requestDeserialize: guard(method.requestDeserialize, `${service.split('.').at(-1)}/${name}`, limitOf(name), true),
    };
  }
  return methods as Service;
}

async function* checked<Request>(requests: AsyncIterable<Request>): AsyncGenerator<Request> {
  for await (const request of requests) {
    if (isUndecodable(request)) throw request[UNDECODABLE];
    yield request;
  }
}

/**
 * Answers requests that a guarded definition could not decode or found too
 * large; for streams, at the message that was. Attach it after the
 * middleware that authenticates callers where there is one for the whole
 * server (the agent's), so that strangers learn nothing.
 */
export function rejectUndecodableRequests(): ServerMiddleware {
  return async function* rejectUndecodable(call, context: CallContext) {
    if (!call.requestStream) {
      if (isUndecodable(call.request)) throw call.request[UNDECODABLE];
      return yield* call.next(call.request, context);
    }
    return yield* call.next(checked(call.request), context);
  };
}
