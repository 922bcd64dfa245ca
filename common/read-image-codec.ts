import { BinaryReader } from '@bufbuild/protobuf/wire';
import { AgentGatewayServiceDefinition, ReadImageResponse } from '../gen/metalcast/v1/agent_gateway.js';
import {
  isPartsMessage,
  onResponseSent,
  type PartsMessage,
  receiveInParts,
  registerInPlaceFramer,
  writeGrpcFrameHeader,
} from './grpc-wire.js';

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
 *
 * On the controller the chunk is not even handed to the serializer: the
 * framer registered with common/grpc-wire.ts also writes gRPC's 5-byte frame
 * header into the room, so grpc-js sends the buffer the chunk was read into
 * (before, nice-grpc's Buffer.from and grpc-js's frame header each copied it).
 */

/** Bytes of room before each chunk: gRPC's 5-byte frame header, then tags and varints of offset, length and the data length (at most 23). */
const HEADER_ROOM = 32;
const GRPC_FRAME_HEADER = 5;
const framable = new WeakSet<Uint8Array>();

/** A buffer for `length` bytes of chunk data that the encoder can frame in place. */
export function allocChunk(length: number): Buffer {
  const chunk = Buffer.allocUnsafeSlow(HEADER_ROOM + length).subarray(HEADER_ROOM);
  framable.add(chunk);
  return chunk;
}

/**
 * Chunk buffers (allocChunk's) of one size, read into again once sent. A fresh
 * 3.5 MiB buffer per chunk was 1 GiB of external memory per GiB served, and
 * V8 runs a full garbage collection for about every 64 MiB of it (12-19 % of
 * the controller's time in a transfer, docs/transfer.md).
 *
 * A buffer lent with `take` comes back when a ReadImage response carrying it
 * has been sent (grpc-wire's onResponseSent: its bytes are written out, so
 * nothing refers to it any more) or with `giveBack` when it is not sent at
 * all. A response whose write failed never comes back: the collector takes
 * it, and the pool allocates another. The ones in flight are bounded by
 * grpc-js's queue per stream (16 messages), as before. At most `keep` wait
 * for reuse: enough for a stream's queue to come back whole (a pool of 8 still
 * allocated 118 buffers for the 307 chunks of a GiB), and dropped after
 * `idleMs` without a transfer, so that an idle controller does not hold them.
 */
export class ChunkPool {
  private readonly free: Buffer[] = [];
  /** Buffers allocated (for tests and metrics: reuse shows as fewer allocations than chunks). */
  allocated = 0;

  private lastUsed = 0;
  private trimTimer: NodeJS.Timeout | undefined;

  constructor(
    readonly chunkSize: number,
    private readonly keep = 32,
    private readonly idleMs = 10_000,
  ) {}

  /** A buffer for `length` bytes; only full-size ones are pooled (a last, shorter chunk is allocated alone). */
  take(length: number): Buffer {
    if (length !== this.chunkSize) return allocChunk(length);
    const chunk = this.free.pop() ?? this.allocate();
    lent.set(chunk, this);
    this.used();
    return chunk;
  }

  private used(): void {
    this.lastUsed = Date.now();
    this.trimTimer ??= setTimeout(() => this.trim(), this.idleMs).unref();
  }

  private trim(): void {
    this.trimTimer = undefined;
    const idleFor = Date.now() - this.lastUsed;
    if (idleFor >= this.idleMs) this.free.length = 0;
    else this.trimTimer = setTimeout(() => this.trim(), this.idleMs - idleFor).unref();
  }

  /** Returns a buffer that was taken and will not be sent (or has been). */
  giveBack(chunk: Buffer): void {
    if (lent.get(chunk) !== this) return;
    lent.delete(chunk);
    if (this.free.length < this.keep) this.free.push(chunk);
    this.used();
  }

  private allocate(): Buffer {
    this.allocated++;
    return allocChunk(this.chunkSize);
  }
}

/** Pooled buffers out on loan, to the pool they return to. */
const lent = new WeakMap<Buffer, ChunkPool>();

onResponseSent((value) => {
  const data = (value as Partial<ReadImageResponse> | undefined)?.data;
  if (data instanceof Buffer) lent.get(data)?.giveBack(data);
});

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

/**
 * Field order and tags as in agent_gateway.proto: offset = 1, data = 2, length = 3 (zero = 4 is never set with data).
 * With `grpcFrame`, the result starts with gRPC's frame header (what grpc-js writes to the HTTP/2 stream).
 */
function encodeInPlace(message: ReadImageResponse, grpcFrame: boolean): Buffer {
  const data = message.data as Buffer;
  const headerLength =
    (message.offset !== 0 ? 1 + varintLength(message.offset) : 0) +
    (message.length !== 0 ? 1 + varintLength(message.length) : 0) +
    1 +
    varintLength(data.byteLength);
  const prefix = grpcFrame ? GRPC_FRAME_HEADER : 0;
  const start = data.byteOffset - headerLength - prefix;
  const framed = Buffer.from(data.buffer, start, prefix + headerLength + data.byteLength);
  let at = 0;
  if (grpcFrame) {
    writeGrpcFrameHeader(framed, 0, headerLength + data.byteLength);
    at = GRPC_FRAME_HEADER;
  }
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

function isFramable(message: ReadImageResponse): boolean {
  return !message.zero && message.data.byteLength > 0 && framable.has(message.data);
}

// Only a ReadImageResponse carries an allocChunk buffer as `data`, so the marker identifies the message type.
registerInPlaceFramer((value) => {
  const message = value as ReadImageResponse | undefined;
  if (typeof message !== 'object' || message === null || !(message.data instanceof Uint8Array) || !isFramable(message)) return undefined;
  return encodeInPlace(message, true);
});

const fastResponseType: typeof ReadImageResponse = {
  ...ReadImageResponse,
  encode(message, writer) {
    if (writer === undefined && isFramable(message)) {
      const framed = encodeInPlace(message, false);
      return { finish: () => framed } as unknown as ReturnType<typeof ReadImageResponse.encode>;
    }
    return ReadImageResponse.encode(message, writer);
  },
  decode(input, length) {
    if (isPartsMessage(input)) return decodeParts(input);
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
const dataParts = new WeakMap<ReadImageResponse, readonly Buffer[]>();

/**
 * The chunk's bytes as the pieces they arrived in, without copying them
 * (hash and writev these); `data` itself is joined on first use. A chunk
 * that arrived in one piece, or from the generated codec, is [data].
 */
export function chunkParts(message: ReadImageResponse): readonly Buffer[] {
  const parts = dataParts.get(message);
  if (parts) return parts;
  return message.data.byteLength === 0 ? [] : [Buffer.from(message.data.buffer, message.data.byteOffset, message.data.byteLength)];
}

/** Reads protobuf fields across the parts of a received message; bytes fields come out as views. */
class PartsReader {
  private part = 0;
  private at = 0;
  pos = 0;

  constructor(private readonly message: PartsMessage) {}

  get end(): number {
    return this.message.length;
  }

  byte(): number {
    while (this.at >= (this.message.parts[this.part]?.length ?? 0)) {
      if (this.part >= this.message.parts.length) throw new RangeError('premature end of a ReadImage response');
      this.part++;
      this.at = 0;
    }
    this.pos++;
    return this.message.parts[this.part]![this.at++]!;
  }

  /** A varint as a Number: exact up to 2^53, far beyond any image offset. */
  varint(): number {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      const b = this.byte();
      value += (b & 0x7f) * scale;
      if (b < 0x80) return value;
      scale *= 128;
    }
    throw new RangeError('a varint of a ReadImage response is longer than 10 bytes');
  }

  take(length: number): Buffer[] {
    const views: Buffer[] = [];
    let left = length;
    while (left > 0) {
      const current = this.message.parts[this.part];
      if (!current) throw new RangeError('premature end of a ReadImage response');
      const n = Math.min(left, current.length - this.at);
      if (n > 0) views.push(current.subarray(this.at, this.at + n));
      this.at += n;
      left -= n;
      if (this.at >= current.length) {
        this.part++;
        this.at = 0;
      }
    }
    this.pos += length;
    return views;
  }

  skip(wireType: number): void {
    switch (wireType) {
      case 0:
        this.varint();
        return;
      case 1:
        this.take(8);
        return;
      case 2:
        this.take(this.varint());
        return;
      case 5:
        this.take(4);
        return;
      default:
        throw new RangeError(`wire type ${wireType} in a ReadImage response`);
    }
  }
}

/** A ReadImage response received in parts (common/grpc-wire.ts): the data stays in the pieces it arrived in. */
function decodeParts(input: PartsMessage): ReadImageResponse {
  const reader = new PartsReader(input);
  const message: ReadImageResponse = { offset: 0, data: EMPTY, length: 0, zero: false };
  let parts: Buffer[] = [];
  while (reader.pos < reader.end) {
    const tag = reader.varint();
    switch (tag) {
      case 0x08:
        message.offset = reader.varint();
        break;
      case 0x12:
        parts = reader.take(reader.varint());
        break;
      case 0x18:
        message.length = reader.varint() >>> 0;
        break;
      case 0x20:
        message.zero = reader.varint() !== 0;
        break;
      default:
        reader.skip(tag & 7);
    }
  }
  if (parts.length === 1) {
    message.data = parts[0]!;
  } else if (parts.length > 1) {
    let joined: Buffer | undefined;
    Object.defineProperty(message, 'data', {
      enumerable: true,
      configurable: true,
      get: () => {
        joined ??= Buffer.concat(parts);
        return joined;
      },
      set: (value: Buffer) => {
        joined = value;
      },
    });
    dataParts.set(message, parts);
  }
  return message;
}

// ReadImage responses skip grpc-js's reassembly copy (decodeParts takes them). The registration is per method path,
// so a client built on the generated definition gets them in parts too: its decoder joins them first (the copy
// grpc-js would have made), in every process that loads this module and therefore registered the path.
const generatedDecode = ReadImageResponse.decode;
ReadImageResponse.decode = (input, length) => generatedDecode(isPartsMessage(input) ? Buffer.concat(input.parts) : input, length);
receiveInParts(`/${AgentGatewayServiceDefinition.fullName}/${AgentGatewayServiceDefinition.methods.readImage.name}`);

/** The agent gateway with the fast ReadImage codec; serve and call it in place of the generated definition. */
export const FastAgentGatewayServiceDefinition: typeof AgentGatewayServiceDefinition = {
  ...AgentGatewayServiceDefinition,
  methods: {
    ...AgentGatewayServiceDefinition.methods,
    readImage: { ...AgentGatewayServiceDefinition.methods.readImage, responseType: fastResponseType },
  },
};
