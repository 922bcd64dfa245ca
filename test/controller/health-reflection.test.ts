import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { after, before, describe, it } from 'node:test';
import { createClient, Status } from 'nice-grpc';
import { HealthDefinition } from 'nice-grpc-server-health';
import { ServerReflectionService } from 'nice-grpc-server-reflection';
import { ServerReflectionV1AlphaService } from '../../controller/services/health-reflection.js';
import { startTestController, type TestController } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

// google-protobuf CommonJS: its classes are not visible to an ESM named import.
const pb = createRequire(import.meta.url)(
  'nice-grpc-server-reflection/lib/proto/grpc/reflection/v1/reflection_pb.js',
) as typeof import('nice-grpc-server-reflection/lib/proto/grpc/reflection/v1/reflection_pb.js');
const descriptors = createRequire(import.meta.url)(
  'google-protobuf/google/protobuf/descriptor_pb.js',
) as typeof import('google-protobuf/google/protobuf/descriptor_pb.js');

/*
 * What grpcurl and health probes ask, against a real controller: health
 * Check SERVING for the whole server and for every service it serves by name,
 * reflection under v1 and v1alpha, and every listed service describable
 * (grpcurl's `describe` asks for the file containing the symbol, then reads
 * the service out of it).
 */
describe('health and reflection', () => {
  let t: TestController;
  before(async () => {
    t = await startTestController();
  });
  after(async () => {
    await t?.destroy();
  });

  const SERVED = [
    'metalcast.v1.NodeService',
    'metalcast.v1.ImageService',
    'metalcast.v1.AgentGatewayService',
    'grpc.health.v1.Health',
    'grpc.reflection.v1.ServerReflection',
    'grpc.reflection.v1alpha.ServerReflection',
  ];

  it('answers SERVING for the empty name and for every served service, NOT_FOUND for others', async () => {
    const health = createClient(HealthDefinition, t.channel);
    for (const service of ['', ...SERVED]) {
      assert.equal((await health.check({ service })).status, 1 /* SERVING */, service || '(empty)');
    }
    await assertRejectsWith(health.check({ service: 'metalcast.v1.NoSuchService' }), Status.NOT_FOUND);
  });

  for (const [version, definition] of [
    ['v1', ServerReflectionService],
    ['v1alpha', ServerReflectionV1AlphaService],
  ] as const) {
    it(`serves reflection ${version} (with an operator token), and describes every service it lists`, async () => {
      const reflection = createClient(definition, t.channel, t.operatorOptions);
      const ask = async (request: InstanceType<typeof pb.ServerReflectionRequest>) => {
        const replies: InstanceType<typeof pb.ServerReflectionResponse>[] = [];
        for await (const reply of reflection.serverReflectionInfo(
          (async function* () {
            yield request;
          })(),
        ))
          replies.push(reply);
        assert.equal(replies.length, 1);
        return replies[0] as InstanceType<typeof pb.ServerReflectionResponse>;
      };
      const listed = (await ask(new pb.ServerReflectionRequest().setListServices('')))
        .getListServicesResponse()
        ?.getServiceList()
        .map((s) => s.getName());
      assert.deepEqual(listed?.sort(), [
        'grpc.health.v1.Health',
        'metalcast.v1.AgentGatewayService',
        'metalcast.v1.ImageService',
        'metalcast.v1.NodeService',
      ]);
      for (const service of listed ?? []) {
        const reply = await ask(new pb.ServerReflectionRequest().setFileContainingSymbol(service));
        assert.equal(reply.getErrorResponse()?.getErrorMessage(), undefined, `${service}: ${reply.getErrorResponse()?.getErrorMessage()}`);
        const files = (reply.getFileDescriptorResponse()?.getFileDescriptorProtoList_asU8() ?? []).map((bytes) =>
          descriptors.FileDescriptorProto.deserializeBinary(bytes),
        );
        const described = files.flatMap((file) => file.getServiceList().map((s) => `${file.getPackage()}.${s.getName()}`));
        assert.ok(described.includes(service), `${service} is described (got ${described.join(', ')})`);
      }
      const health = await ask(new pb.ServerReflectionRequest().setFileContainingSymbol('grpc.health.v1.HealthCheckResponse'));
      assert.ok(health.getFileDescriptorResponse(), 'the health messages are described too');
    });
  }

  it('wants an operator token for reflection v1alpha as for v1', async () => {
    const reflection = createClient(ServerReflectionV1AlphaService, t.channel);
    const replies = reflection.serverReflectionInfo(
      (async function* () {
        yield new pb.ServerReflectionRequest().setListServices('');
      })(),
    );
    await assertRejectsWith(
      (async () => {
        for await (const _ of replies);
      })(),
      Status.UNAUTHENTICATED,
    );
  });
});
