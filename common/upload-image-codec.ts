import { BinaryReader } from '@bufbuild/protobuf/wire';
import { ImageServiceDefinition, UploadImageHeader, UploadImageRequest } from '../gen/metalcast/v1/image.js';
import { markFramedRequest, onFramedRequestSent, receiveRequestsIntoPool } from './grpc-wire.js';

/**
 * A faster client codec for UploadImage data messages, the one request whose
 * size matters. The generated encoder copies the data into a growing writer,
 * nice-grpc copies the result (`Buffer.from`), and grpc-js copies it again to
 * put the gRPC frame header in front: three copies of every byte uploaded.
 *
 * Here the CLI reads the file straight into `allocUploadChunk` buffers, each
 * a view into an ArrayBuffer laid out as the whole gRPC frame: 5 bytes of
 * frame header, the field tag and length, then the data. The encoder fills
 * in the tag and length and hands back that ArrayBuffer (nice-grpc's
 * `Buffer.from` makes a view of it, not a copy), and common/grpc-wire.ts
 * writes the frame header in place. The bytes on the wire are the generated
 * codec's. On the controller, each message is received into a pooled
 * buffer (common/pooled-request-decoder.ts), and decoding keeps the data as
 * a view into it (the generated decoder copies it with Buffer.from); the
 * upload gives the buffer back with releaseRequestBuffer once written.
 */

const GRPC_FRAME_HEADER = 5;
const framable = new WeakSet<Uint8Array>();

function varintLength(value: number): number {
  let n = 1;
  for (let v = value; v >= 0x80; v = Math.floor(v / 128)) n++;
  return n;
}

/** A buffer for exactly `length` bytes of upload data that the encoder can frame in place. */
export function allocUploadChunk(length: number): Buffer {
  return uploadChunkIn(new ArrayBuffer(frameLength(length)), length);
}

function frameLength(dataLength: number): number {
  return GRPC_FRAME_HEADER + 1 + varintLength(dataLength) + dataLength;
}

function uploadChunkIn(buffer: ArrayBuffer, length: number): Buffer {
  const data = Buffer.from(buffer, buffer.byteLength - length, length);
  framable.add(data);
  return data;
}

/**
 * Upload chunks of one size, used again once sent. A fresh MiB per MiB read
 * cost the CLI about 1 CPU-s per GiB of garbage collection. grpc-js tells
 * when a chunk's frame has been written out (common/grpc-wire.ts, 7.), and
 * the buffer comes back here; the next read goes into it. The caller must
 * not touch a chunk after handing it to the call.
 */
export class UploadChunkPool {
  private readonly free: ArrayBuffer[] = [];
  /** Buffers allocated (tests: reuse shows as fewer allocations than chunks). */
  allocated = 0;

  /** `keep`: enough for grpc-js's queue of 16 messages, the one being sent and the reads ahead. */
  constructor(
    readonly chunkBytes: number,
    private readonly keep = 24,
  ) {}

  /** A chunk for `length` bytes; only full-size chunks are pooled (a last, shorter one is allocated alone). */
  take(length: number): Buffer {
    if (length !== this.chunkBytes) return allocUploadChunk(length);
    const buffer = this.free.pop() ?? this.allocate();
    uploadPools.set(buffer, this);
    return uploadChunkIn(buffer, length);
  }

  private allocate(): ArrayBuffer {
    this.allocated++;
    return new ArrayBuffer(frameLength(this.chunkBytes));
  }

  giveBack(buffer: ArrayBuffer): void {
    if (uploadPools.get(buffer) !== this) return;
    uploadPools.delete(buffer);
    if (this.free.length < this.keep) this.free.push(buffer);
  }
}

/** Pooled upload buffers out on loan, to their pool. */
const uploadPools = new WeakMap<ArrayBufferLike, UploadChunkPool>();

onFramedRequestSent((buffer) => uploadPools.get(buffer)?.giveBack(buffer as ArrayBuffer));

const fastUploadRequest: typeof UploadImageRequest = {
  ...UploadImageRequest,
  encode(message, writer) {
    const data = message.part?.$case === 'data' ? message.part.value : undefined;
    // Only the exact buffer allocUploadChunk made, filled to its end (a short read's subarray is not).
    if (writer === undefined && data !== undefined && framable.has(data) && data.byteOffset + data.byteLength === data.buffer.byteLength) {
      const frame = new Uint8Array(data.buffer);
      let at = GRPC_FRAME_HEADER;
      frame[at++] = 0x12;
      for (let v = data.byteLength; ; v = Math.floor(v / 128)) {
        if (v < 0x80) {
          frame[at++] = v;
          break;
        }
        frame[at++] = (v % 128) | 0x80;
      }
      markFramedRequest(data.buffer as ArrayBuffer);
      // An ArrayBuffer, not a Uint8Array: nice-grpc's Buffer.from views it instead of copying.
      const whole = data.buffer;
      return { finish: () => whole } as unknown as ReturnType<typeof UploadImageRequest.encode>;
    }
    return UploadImageRequest.encode(message, writer);
  },
  decode(input, length) {
    const reader = input instanceof BinaryReader ? input : new BinaryReader(input);
    const end = length === undefined ? reader.len : reader.pos + length;
    const message: UploadImageRequest = { part: undefined };
    while (reader.pos < end) {
      const tag = reader.uint32();
      if (tag === 0x0a) {
        message.part = { $case: 'header', value: UploadImageHeader.decode(reader, reader.uint32()) };
      } else if (tag === 0x12) {
        const view = reader.bytes();
        message.part = { $case: 'data', value: Buffer.from(view.buffer, view.byteOffset, view.byteLength) };
      } else if ((tag & 7) === 4 || tag === 0) {
        break;
      } else {
        reader.skip(tag & 7);
      }
    }
    return message;
  },
};

/** The image service with the fast upload codec: the CLI sends with it, the controller serves it. */
export const FastImageServiceDefinition: typeof ImageServiceDefinition = {
  ...ImageServiceDefinition,
  methods: {
    ...ImageServiceDefinition.methods,
    uploadImage: { ...ImageServiceDefinition.methods.uploadImage, requestType: fastUploadRequest },
  },
};

receiveRequestsIntoPool(`/${ImageServiceDefinition.fullName}/${ImageServiceDefinition.methods.uploadImage.name}`);
