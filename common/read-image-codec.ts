import { BinaryReader } from '@bufbuild/protobuf/wire';
import { AgentGatewayServiceDefinition, ReadImageResponse } from '../gen/metalcast/v1/agent_gateway.js';

/**
 * A faster wire codec for ReadImage chunks, the one message whose size
 * matters. The generated codec copies every chunk twice when encoding (into
 * a growing writer, then out of it) and once when decoding (ts-proto wraps
 * the bytes in Buffer.from); at hundreds of MB/s those copies and the
 * garbage they make cost more than the hashing (bench transfer).
 *
 * Encoding: the controller reads each chunk into a buffer with room in
 * front (allocChunk), and the encoder writes the few bytes of field headers
 * into that room, so the message is the chunk buffer itself. Decoding: the
 * agent keeps `data` as a view into the received message. Bytes on the wire
 * are the same protobuf as the generated code's, so either side may use the
 * generated codec.
 */

/** Bytes of room before each chunk: tags and varints of offset, length and the data length. */
const HEADER_ROOM = 32;
const framable = new WeakSet<Uint8Array>();

/** A buffer for `length` bytes of chunk data that the encoder can frame in place. */
export function allocChunk(length: number): Buffer {
  const chunk = Buffer.allocUnsafeSlow(HEADER_ROOM + length).subarray(HEADER_ROOM);
  framable.add(chunk);
  return chunk;
}

function varintLength(value: number): number {
  let n = 1;
  while (value >= 0x80) {
    value = Math.floor(value / 128);
    n++;
  }
  return n;
}

function writeVarint(target: Buffer, at: number, value: number): number {
  let v = value;
  while (v >= 0x80) {
    target[at++] = (v % 128) | 0x80;
    v = Math.floor(v / 128);
  }
  target[at++] = v;
  return at;
}

/** Field order and tags as in agent_gateway.proto: offset = 1, data = 2, length = 3 (zero = 4 is never set with data). */
function encodeInPlace(message: ReadImageResponse): Uint8Array {
  const data = message.data as Buffer;
  const headerLength =
    (message.offset !== 0 ? 1 + varintLength(message.offset) : 0) +
    (message.length !== 0 ? 1 + varintLength(message.length) : 0) +
    1 +
    varintLength(data.byteLength);
  const start = data.byteOffset - headerLength;
  const framed = Buffer.from(data.buffer, start, headerLength + data.byteLength);
  let at = 0;
  if (message.offset !== 0) {
    framed[at++] = 0x08;
    at = writeVarint(framed, at, message.offset);
  }
  if (message.length !== 0) {
    framed[at++] = 0x18;
    at = writeVarint(framed, at, message.length);
  }
  framed[at++] = 0x12;
  writeVarint(framed, at, data.byteLength);
  return framed;
}

const fastResponseType: typeof ReadImageResponse = {
  ...ReadImageResponse,
  encode(message, writer) {
    if (writer === undefined && !message.zero && message.data.byteLength > 0 && framable.has(message.data)) {
      const framed = encodeInPlace(message);
      return { finish: () => framed } as ReturnType<typeof ReadImageResponse.encode>;
    }
    return ReadImageResponse.encode(message, writer);
  },
  decode(input, length) {
    const reader = input instanceof BinaryReader ? input : new BinaryReader(input);
    const end = length === undefined ? reader.len : reader.pos + length;
    const message: ReadImageResponse = { offset: 0, data: EMPTY, length: 0, zero: false };
    while (reader.pos < end) {
      const tag = reader.uint32();
      switch (tag) {
        case 0x08:
          message.offset = Number(reader.uint64());
          break;
        case 0x12: {
          const view = reader.bytes();
          message.data = Buffer.from(view.buffer, view.byteOffset, view.byteLength);
          break;
        }
        case 0x18:
          message.length = reader.uint32();
          break;
        case 0x20:
          message.zero = reader.bool();
          break;
        default:
          reader.skip(tag & 7);
      }
    }
    return message;
  },
};

const EMPTY = Buffer.alloc(0);

/** The agent gateway with the fast ReadImage codec; serve and call it in place of the generated definition. */
export const FastAgentGatewayServiceDefinition: typeof AgentGatewayServiceDefinition = {
  ...AgentGatewayServiceDefinition,
  methods: {
    ...AgentGatewayServiceDefinition.methods,
    readImage: { ...AgentGatewayServiceDefinition.methods.readImage, responseType: fastResponseType },
  },
};
