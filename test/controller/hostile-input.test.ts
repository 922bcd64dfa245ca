import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { Client } from '@grpc/grpc-js';
import { createClient, Status } from 'nice-grpc';
import { HealthDefinition } from 'nice-grpc-server-health';
import type { AgentStatus } from '../../gen/metalcast/v1/agent_gateway.js';
import { CommandProgress, CommandState } from '../../gen/metalcast/v1/command.js';
import { NodeServiceDefinition, ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { FAST_FLAGS, startTestController, type TestController } from '../helpers/controller.js';
import { assertClientError, assertRejectsWith } from '../helpers/grpc-assert.js';
import { type FuzzMethod, type MetadataSpec, methodsOf, rawCall, rawClient } from '../fuzz/harness.js';

/*
 * Regression tests for what the fuzz suite (test/fuzz/) found and for the
 * bounds of issue 7: each hostile request gets the status and a message
 * that names the field; none reaches a handler as something it cannot take.
 */

describe('hostile input to the controller', () => {
  let t: TestController;
  let raw: Client;
  const operator = (): MetadataSpec => (t.adminToken === '' ? {} : { authorization: `Bearer ${t.adminToken}` });
  const method = (name: string) => methodsOf(NodeServiceDefinition).find((m) => m.name === name) as FuzzMethod;

  before(async () => {
    t = await startTestController(FAST_FLAGS);
    raw = rawClient(t.channel);
  });
  after(async () => {
    raw.close();
    await t.destroy();
  });

  describe('bytes that are not the request message', () => {
    it('answers INVALID_ARGUMENT, not INTERNAL, for a request that does not decode', async () => {
      // Wire type 7 does not exist; a length past the end; a field cut short.
      for (const bytes of [Uint8Array.of(0x0f), Uint8Array.of(0x0a, 0x05, 0x61), Uint8Array.of(0x12)]) {
        const outcome = await rawCall(raw, method('GetNode'), [bytes], operator());
        assert.equal(Status[outcome.code as Status], 'INVALID_ARGUMENT', outcome.details);
        assert.match(outcome.details, /^request: not a valid NodeService\/GetNode request message/);
      }
    });

    it('answers RESOURCE_EXHAUSTED for a request larger than its service takes', async () => {
      const outcome = await rawCall(raw, method('GetNode'), [new Uint8Array(1024 * 1024 + 1024)], operator());
      assert.equal(Status[outcome.code as Status], 'RESOURCE_EXHAUSTED');
      assert.match(outcome.details, /^request: 1049600 bytes, more than the 1048576 that NodeService\/GetNode accepts$/);
    });

    it('refuses an oversized agent request at its length prefix, before the token check (it reads no more of it)', async () => {
      const outcome = await rawCall(
        raw,
        { ...method('GetNode'), path: '/metalcast.v1.AgentGatewayService/StatImage', name: 'StatImage' },
        [new Uint8Array(70 * 1024)],
        {},
      );
      assert.equal(Status[outcome.code as Status], 'RESOURCE_EXHAUSTED');
      assert.match(outcome.details, /^request: 71680 bytes, more than the 65536 that AgentGatewayService\/StatImage accepts$/);
    });

    it('answers a reflection request claiming a 4 GiB string at once instead of looping over it', async () => {
      const reflection: FuzzMethod = {
        ...method('WatchNodes'),
        path: '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
        requestStream: true,
        responseStream: true,
      };
      const started = Date.now();
      const outcome = await rawCall(raw, reflection, [Uint8Array.of(0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f)], operator());
      assert.equal(Status[outcome.code as Status], 'INVALID_ARGUMENT', outcome.details);
      assert.match(outcome.details, /field 1 claims 4294967295 bytes, 0 follow/);
      assert.ok(Date.now() - started < 2000);
      // And the controller is still there for everyone else.
      assert.equal((await createClient(HealthDefinition, t.channel).check({ service: '' })).status, 1);
    });

    it('keeps a health check quoting a huge service name from breaking the caller’s connection', async () => {
      const health = createClient(HealthDefinition, t.channel);
      await assertRejectsWith(health.check({ service: 'x'.repeat(70_000) }), Status.RESOURCE_EXHAUSTED, /HEALTH|Health\/Check accepts/);
      assert.equal((await health.check({ service: '' })).status, 1, 'the channel still works');
    });
  });

  describe('operator requests', () => {
    it('names the field of every bound', async () => {
      const nodes = t.nodes;
      await assertRejectsWith(
        nodes.getNode({ node: 'no spaces allowed' }),
        Status.INVALID_ARGUMENT,
        /^node: 'no spaces allowed' is neither/,
      );
      await assertRejectsWith(
        nodes.createNode({ name: 'hi-props', macAddresses: ['02:00:00:00:a1:01'], properties: { rack: 'r1\u001b[2J' } }),
        Status.INVALID_ARGUMENT,
        /^properties\.rack: control character U\+001B at position 2 is not allowed$/,
      );
      await assertRejectsWith(
        nodes.listNodes({ provisionState: 99 as never, pageSize: 0, pageToken: '' }),
        Status.INVALID_ARGUMENT,
        /^provision_state: 99 is not a provision state$/,
      );
      for (const key of [-1, 1.5, 2 ** 60, 'a name']) {
        await assertRejectsWith(
          nodes.listNodeEvents({ node: 'any-node', pageSize: 0, pageToken: Buffer.from(JSON.stringify(key)).toString('base64url') }),
          Status.INVALID_ARGUMENT,
          /^page_token: not a token this controller issued/,
        );
      }
      const tooMany = Array.from({ length: 1001 }, (_, i) => `n${i}`);
      const watch = nodes.watchNodes({ nodes: tooMany });
      await assertRejectsWith(
        (async () => {
          for await (const _ of watch) break;
        })(),
        Status.INVALID_ARGUMENT,
        /^nodes: at most 1000 nodes, got 1001$/,
      );
      await assertRejectsWith(
        nodes.setMaintenance({ node: 'any-node', enabled: true, reason: 'bell\u0007' }),
        Status.INVALID_ARGUMENT,
        /^reason: control character U\+0007/,
      );
      await assertRejectsWith(
        nodes.setProvisionState({
          node: 'any-node',
          action: ProvisionAction.PROVISION_ACTION_DEPLOY,
          deploy: { image: 'img', target: { devicePath: '/dev/../etc/passwd' } },
        }),
        Status.INVALID_ARGUMENT,
        /^deploy\.target\.device_path: '\/dev\/\.\.\/etc\/passwd' is not an absolute device path/,
      );
      await assertRejectsWith(
        nodes.setProvisionState({ node: 'any-node', action: -1 as never }),
        Status.INVALID_ARGUMENT,
        /^action: must be one of/,
      );
    });

    it('bounds a node’s ports at 64, as at creation', async () => {
      const macs = Array.from({ length: 64 }, (_, i) => `02:00:00:00:a2:${i.toString(16).padStart(2, '0')}`);
      const { node } = await t.nodes.createNode({ name: 'hi-ports', macAddresses: macs });
      await assertRejectsWith(
        t.nodes.addNodePort({ node: node!.uuid, macAddress: '02:00:00:00:a3:01' }),
        Status.INVALID_ARGUMENT,
        /^mac_address: node 'hi-ports' already has 64 ports, the most a node may have$/,
      );
      await t.nodes.removeNodePort({ node: node!.uuid, macAddress: macs[0] as string });
      const { node: added } = await t.nodes.addNodePort({ node: node!.uuid, macAddress: '02:00:00:00:a3:01' });
      assert.equal(added?.macAddresses.length, 64);
    });
  });

  describe('agent requests', () => {
    it('refuses a lookup with oversized DMI strings or a version with control characters', async () => {
      await assertRejectsWith(
        t.gateway.lookup({ macAddresses: ['02:00:00:00:a4:01'], systemSerial: 's'.repeat(257), systemUuid: '', agentVersion: 'v' }),
        Status.INVALID_ARGUMENT,
        /^system_serial: at most 256 characters, got 257$/,
      );
      await assertRejectsWith(
        t.gateway.lookup({ macAddresses: ['02:00:00:00:a4:01'], systemSerial: '', systemUuid: '', agentVersion: 'v1\r\nFAKE LOG LINE' }),
        Status.INVALID_ARGUMENT,
        /^agent_version: control character U\+000D at position 2/,
      );
    });

    it('ends a heartbeat stream on an unknown status, a port out of range or a non-finite rate, naming the field', async () => {
      const node = await createWaitingNode(t.nodes, 'hi-heartbeat', ['02:00:00:00:a5:01']);
      const cases: [Parameters<ReturnType<typeof openHeartbeat>['send']>[0], RegExp][] = [
        [{ status: 7 as AgentStatus }, /^status: 7 is not one of AGENT_STATUS_UNSPECIFIED, AGENT_STATUS_IDLE, AGENT_STATUS_BUSY$/],
        [{ agentAddress: '10.0.0.1:0' }, /^agent_address: '10\.0\.0\.1:0' is not of the form host:port$/],
        [{ agentAddress: '10.0.0.1:65536' }, /^agent_address: /],
        [
          {
            command: {
              id: 'c',
              name: 'write_image',
              requestId: '',
              state: CommandState.COMMAND_STATE_RUNNING,
              startedAt: undefined,
              finishedAt: undefined,
              progress: {
                ...CommandProgress.fromPartial({}),
                phase: 'writing',
                doneBytes: 1,
                totalBytes: 2,
                rateBytesPerSecond: Number.NaN,
              },
              error: '',
              result: undefined,
            },
          },
          /^command\.progress\.rate_bytes_per_second: NaN is not a rate$/,
        ],
      ];
      for (const [fields, message] of cases) {
        const { agentToken } = await lookup(t.gateway, ['02:00:00:00:a5:01']);
        const stream = openHeartbeat(t.gateway, node.uuid, agentToken);
        stream.send(fields);
        assertClientError(await stream.ended, Status.INVALID_ARGUMENT, message);
      }
    });
  });
});
