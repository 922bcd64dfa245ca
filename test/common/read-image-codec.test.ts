import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { allocChunk, FastAgentGatewayServiceDefinition } from '../../common/read-image-codec.js';
import { ReadImageResponse } from '../../gen/metalcast/v1/agent_gateway.js';

const fast = FastAgentGatewayServiceDefinition.methods.readImage.responseType;

function chunk(length: number): Buffer {
  const buffer = allocChunk(length);
  randomBytes(length).copy(buffer);
  return buffer;
}

describe('the fast ReadImage codec', () => {
  const cases: ReadImageResponse[] = [
    { offset: 0, data: chunk(1), length: 1, zero: false },
    { offset: 3_670_016 * 3, data: chunk(3_670_016), length: 3_670_016, zero: false },
    // Offsets past 4 GiB need 64-bit varints.
    { offset: 2 ** 40 + 12345, data: chunk(65_536), length: 65_536, zero: false },
    { offset: 1024, data: Buffer.alloc(0), length: 1024, zero: true },
  ];

  for (const message of cases) {
    it(`writes protobuf the generated codec reads back exactly (offset ${message.offset}, ${message.data.length} bytes${message.zero ? ', zero' : ''})`, () => {
      // Not byte for byte: in-place framing puts data last, protobuf allows any field order.
      const mine = Buffer.from(fast.encode(message).finish());
      const generated = Buffer.from(ReadImageResponse.encode(message).finish());
      assert.equal(mine.length, generated.length);
      assert.deepEqual(ReadImageResponse.decode(mine), ReadImageResponse.decode(generated));
    });

    it(`reads what the generated codec writes (offset ${message.offset})`, () => {
      const wire = ReadImageResponse.encode(message).finish();
      const decoded = fast.decode(wire);
      assert.equal(decoded.offset, message.offset);
      assert.equal(decoded.length, message.length);
      assert.equal(decoded.zero, message.zero);
      assert.ok(Buffer.from(decoded.data).equals(message.data));
    });
  }

  it('frames the chunk in place: the encoded message shares the chunk buffer', () => {
    const data = chunk(4096);
    const framed = fast.encode({ offset: 8192, data, length: 4096, zero: false }).finish();
    assert.equal(framed.buffer, data.buffer, 'no copy of the data');
  });

  it('falls back to the generated encoder for buffers it did not allocate', () => {
    // (byte for byte here: it is the generated encoder)
    const data = randomBytes(100);
    const message = { offset: 7, data, length: 100, zero: false };
    assert.ok(Buffer.from(fast.encode(message).finish()).equals(Buffer.from(ReadImageResponse.encode(message).finish())));
  });
});
