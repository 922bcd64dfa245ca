import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { connect } from 'node:http2';
import { after, before, describe, it } from 'node:test';
import { BaseServerInterceptingCall } from '@grpc/grpc-js/build/src/server-interceptors.js';
import { createChannel, createClient, createServer, type Server } from 'nice-grpc';
import { clientChannelOptions, serverChannelOptions } from '../../common/grpc-options.js';
import { partsMessage } from '../../common/grpc-wire.js';
import { allocChunk, chunkParts, FastAgentGatewayServiceDefinition } from '../../common/read-image-codec.js';
import { AgentGatewayServiceDefinition, ReadImageResponse } from '../../gen/metalcast/v1/agent_gateway.js';

const keepalive = { timeMs: 30_000, timeoutMs: 10_000 };
const MIB = 1024 * 1024;

function chunk(length: number): Buffer {
  const buffer = allocChunk(length);
  randomBytes(length).copy(buffer);
  return buffer;
}

describe('grpc-js overrides (common/grpc-wire.ts)', () => {
  it('serialises a ReadImage chunk once: the gRPC frame is a view of the buffer the chunk was read into', () => {
    const data = chunk(3.5 * MIB);
    const message: ReadImageResponse = { offset: 2 ** 33 + 7, data, length: data.length, zero: false };
    let serializerCalled = false;
    // What grpc-js calls for every response; `handler.serialize` is nice-grpc's copying wrapper.
    const call = {
      handler: {
        serialize: () => {
          serializerCalled = true;
          return Buffer.alloc(0);
        },
      },
    };
    const serialize = (BaseServerInterceptingCall.prototype as unknown as { serializeMessage(v: unknown): Buffer }).serializeMessage;
    const frame = serialize.call(call, message);
    assert.equal(serializerCalled, false, 'the copying serializer was bypassed');
    assert.equal(frame.buffer, data.buffer, 'no copy of the chunk');
    assert.equal(frame[0], 0, 'uncompressed');
    assert.equal(frame.readUInt32BE(1), frame.length - 5, 'the frame header gives the message length');
    assert.deepEqual(ReadImageResponse.decode(frame.subarray(5)), message);
  });

  it('leaves every other message to grpc-js', () => {
    const call = { handler: { serialize: () => Buffer.from([1, 2, 3]) } };
    const serialize = (BaseServerInterceptingCall.prototype as unknown as { serializeMessage(v: unknown): Buffer }).serializeMessage;
    assert.deepEqual([...serialize.call(call, { offset: 0, data: randomBytes(3), length: 3, zero: false })], [0, 0, 0, 0, 3, 1, 2, 3]);
    assert.deepEqual([...serialize.call(call, { anything: true })], [0, 0, 0, 0, 3, 1, 2, 3]);
  });

  it('decodes a ReadImage response split anywhere, keeping the data in the pieces it arrived in', () => {
    const fast = FastAgentGatewayServiceDefinition.methods.readImage.responseType;
    for (const message of [
      { offset: 2 ** 40 + 3, data: randomBytes(300_000), length: 300_000, zero: false },
      { offset: 5, data: Buffer.alloc(0), length: 4096, zero: true },
    ]) {
      // The generated encoder puts data between offset and length: fields are found in any order.
      const wire = Buffer.from(ReadImageResponse.encode(message).finish());
      for (const cuts of [[1], [2, 3, 4, 5], [7, 100, 16_384, 200_000], [wire.length - 1]]) {
        const pieces: Buffer[] = [];
        let from = 0;
        for (const cut of [...cuts.filter((c) => c < wire.length), wire.length]) {
          pieces.push(wire.subarray(from, cut));
          from = cut;
        }
        const decoded = fast.decode(partsMessage(pieces) as unknown as Uint8Array);
        assert.equal(decoded.offset, message.offset);
        assert.equal(decoded.length, message.length);
        assert.equal(decoded.zero, message.zero);
        assert.ok(Buffer.concat(chunkParts(decoded)).equals(message.data), `parts, cut at ${cuts}`);
        assert.ok(Buffer.from(decoded.data).equals(message.data), `data, cut at ${cuts}`);
        for (const part of chunkParts(decoded))
          assert.ok(
            pieces.some((piece) => piece.buffer === part.buffer),
            'a view, not a copy',
          );
      }
    }
  });

  describe('over a real server', () => {
    let server: Server;
    let address = '';
    const chunks = [chunk(3.5 * MIB), chunk(MIB), chunk(1)];
    before(async () => {
      server = createServer(serverChannelOptions(keepalive));
      server.add(FastAgentGatewayServiceDefinition, {
        lookup: () => Promise.reject(new Error('unused')),
        heartbeat: () => {
          throw new Error('unused');
        },
        statImage: () => Promise.reject(new Error('unused')),
        async *readImage() {
          let offset = 0;
          for (const data of chunks) {
            yield { offset, data, length: data.length, zero: false };
            offset += data.length;
          }
          yield { offset, data: Buffer.alloc(0), length: 4096, zero: true };
        },
        getConfigDrive: () => Promise.reject(new Error('unused')),
        getImageManifest: () => {
          throw new Error('unused');
        },
      });
      address = `127.0.0.1:${await server.listen('127.0.0.1:0')}`;
    });
    after(() => server.forceShutdown());

    for (const [label, definition] of [
      ['the generated codec', AgentGatewayServiceDefinition],
      ['the fast codec', FastAgentGatewayServiceDefinition],
    ] as const) {
      it(`delivers in-place framed chunks intact to a client using ${label}`, async () => {
        const channel = createChannel(address, undefined, clientChannelOptions(keepalive));
        try {
          const client = createClient(definition, channel);
          const got: ReadImageResponse[] = [];
          for await (const message of client.readImage({ image: 'x', offset: 0, length: 0 })) got.push(message);
          assert.equal(got.length, 4);
          if (definition === FastAgentGatewayServiceDefinition) {
            // Received without grpc-js's reassembly: the 3.5 MiB chunk is still in its HTTP/2 data chunks.
            assert.ok(chunkParts(got[0]!).length > 1, 'the large chunk arrived in parts, not joined');
          }
          for (const [i, data] of chunks.entries()) {
            const digest = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
            assert.equal(digest(got[i]!.data), digest(data), `chunk ${i}`);
            assert.equal(got[i]!.length, data.length);
          }
          assert.deepEqual({ ...got[3]!, data: [...got[3]!.data] }, { offset: 4.5 * MIB + 1, data: [], length: 4096, zero: true });
        } finally {
          channel.close();
        }
      });
    }

    it("announces the server's flow-control window (grpc-js keeps 64 KiB there), so uploads are not window-bound", async () => {
      const session = connect(`http://${address}`);
      try {
        const settings = await new Promise<{ initialWindowSize?: number }>((resolve, reject) => {
          session.once('remoteSettings', resolve);
          session.once('error', reject);
        });
        const window = serverChannelOptions(keepalive)['grpc-node.flow_control_window'];
        assert.equal(typeof window, 'number');
        assert.equal(settings.initialWindowSize, window, 'stream window');
        // The connection window grows with a WINDOW_UPDATE after the settings; wait for it, bounded.
        const deadline = Date.now() + 5000;
        while ((session.state.remoteWindowSize ?? 0) < (window as number) && Date.now() < deadline) {
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        assert.equal(session.state.remoteWindowSize, window, 'connection window');
      } finally {
        session.destroy();
      }
    });
  });
});
