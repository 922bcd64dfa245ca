import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { type Channel, createChannel } from 'nice-grpc';
import { BaseServerInterceptingCall } from '@grpc/grpc-js/build/src/server-interceptors.js';
import { receiveLimitOf } from '../../common/receive-limits.js';
import { OPERATOR_REQUEST_LIMIT_BYTES } from '../../common/request-decoding.js';
import { ImageServiceDefinition } from '../../gen/metalcast/v1/image.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { type ControllerProcess, spawnController } from '../helpers/controller-process.js';
import { tempDir } from '../helpers/controller.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';
import { methodsOf, rawCall, rawClient } from '../fuzz/harness.js';

const MB = 1024 * 1024;
const rssMiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]) / 1024;

describe('per-method receive limits at the length prefix', () => {
  it('hooks a grpc-js that still has what it hooks', () => {
    const proto = BaseServerInterceptingCall.prototype as unknown as { handleDataFrame: { name: string } };
    assert.equal(proto.handleDataFrame.name, 'limitedDataFrame');
  });

  describe('a controller process sent 100 MB messages', () => {
    const dir = tempDir('metalcast-receive-limits-');
    let controller: ControllerProcess;
    let proxy: TcpProxy;
    let channel: Channel;
    before(async () => {
      controller = await spawnController({ 'data-dir': dir.path, 'operator-auth': 'none' });
      // Every byte the client sends goes through here, so the test can count what the controller was made to take.
      proxy = await TcpProxy.start(controller.grpcAddress);
      channel = createChannel(proxy.address);
    });
    after(async () => {
      channel.close();
      await controller.kill('SIGTERM');
      await proxy.close();
      dir.remove();
    });

    it('refuses each at once with the same RESOURCE_EXHAUSTED, reads little of it, and its RSS stays flat', async () => {
      const raw = rawClient(channel);
      const createNode = methodsOf(NodeServiceDefinition).find((m) => m.name === 'CreateNode');
      const upload = methodsOf(ImageServiceDefinition).find((m) => m.name === 'UploadImage');
      assert.ok(createNode && upload);
      assert.equal(receiveLimitOf(createNode.path), undefined, 'registered in the controller process, not here');
      const pid = controller.child.pid as number;
      const huge = new Uint8Array(100 * MB);
      // Warm up: the first calls allocate what any call does.
      await rawCall(raw, createNode, [new Uint8Array(10)], {});
      const rssBefore = rssMiB(pid);
      const sentBefore = proxy.stats.bytesToTarget;
      const outcomes: string[] = [];
      for (let i = 0; i < 5; i++) {
        const outcome = await rawCall(raw, createNode, [huge], {});
        outcomes.push(`${outcome.code} ${outcome.details}`);
      }
      const streamed = await rawCall(raw, upload, [huge], {});
      raw.close();
      const sentMiB = (proxy.stats.bytesToTarget - sentBefore) / MB;
      const grewMiB = rssMiB(pid) - rssBefore;
      console.log(
        `6 messages of 100 MiB: the controller was sent ${sentMiB.toFixed(1)} MiB in all; its RSS grew ${grewMiB.toFixed(1)} MiB`,
      );
      assert.deepEqual(
        new Set(outcomes),
        new Set([`8 request: ${100 * MB} bytes, more than the ${OPERATOR_REQUEST_LIMIT_BYTES} that NodeService/CreateNode accepts`]),
        'always the same status and message',
      );
      assert.equal(streamed.code, 8);
      assert.match(streamed.details, /^request: 104857600 bytes, more than the \d+ that ImageService\/UploadImage accepts$/);
      // Before: each whole message crossed the wire (600 MiB), and the RSS grew by tens of MiB per message.
      assert.ok(sentMiB < 6 * 20, `${sentMiB} MiB of 600 were sent`);
      assert.ok(grewMiB < 40, `RSS grew ${grewMiB} MiB`);
    });
  });
});
