import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createChannel, createClient, Status } from 'nice-grpc';
import type { CommandHandler } from '../../agent/commands/command.js';
import { eraseDisksCommand } from '../../agent/commands/erase-disks.js';
import { CommandRunner } from '../../agent/commands/runner.js';
import { writeImageCommand } from '../../agent/commands/write-image.js';
import type { ImageSource } from '../../agent/imaging/image-source.js';
import { startAgentServer } from '../../agent/api/server.js';
import { agentApiToken } from '../../common/agent-credentials.js';
import { agentMetadata } from '../../common/agent-metadata.js';
import { AgentServiceDefinition } from '../../gen/metalcast/v1/agent.js';
import type { CommandParameters } from '../../gen/metalcast/v1/command.js';
import type { Inventory } from '../../gen/metalcast/v1/inventory.js';
import { methodsOf, rawCall, rawClient } from '../fuzz/harness.js';
import { testLogger } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

/*
 * RunCommand refuses malformed parameters with INVALID_ARGUMENT naming the
 * field, before anything starts (a command that would only fail later is
 * never started), and the Agent API answers bytes it cannot decode, or
 * requests larger than it takes, with a status instead of INTERNAL.
 */

const noInventory = async (): Promise<Inventory> => ({ interfaces: [], disks: [], cpu: undefined, memory: undefined, system: undefined });
const noImages: ImageSource = {
  stat: () => Promise.reject(new Error('not in this test')),
  read: () => {
    throw new Error('not in this test');
  },
  failed: () => {},
};

const write = (value: Record<string, unknown>): CommandParameters => ({
  command: {
    $case: 'writeImage',
    value: {
      image: 'ubuntu',
      target: undefined,
      sha256: '',
      sizeBytes: 0,
      verifyReadback: false,
      diskIsZeroed: false,
      stallTimeoutMs: 0,
      maxAttempts: 0,
      timeLimitMs: 0,
      ...value,
    },
  },
});
const erase = (mode: number, devicePaths: string[] = []): CommandParameters => ({
  command: { $case: 'eraseDisks', value: { mode, devicePaths } },
});

describe('RunCommand parameters', () => {
  const token = 'test-token-0123456789';
  const runner = new CommandRunner(
    [writeImageCommand(noImages, noInventory) as unknown as CommandHandler, eraseDisksCommand(noInventory) as unknown as CommandHandler],
    5,
    testLogger(),
  );
  let server: Awaited<ReturnType<typeof startAgentServer>>;
  let channel: ReturnType<typeof createChannel>;
  const auth = { metadata: agentMetadata('node-1', agentApiToken(token)) };

  before(async () => {
    server = await startAgentServer(
      '127.0.0.1:0',
      { timeMs: 10_000, timeoutMs: 10_000 },
      { runner, currentToken: () => token, inventory: noInventory, logger: testLogger() },
    );
    channel = createChannel(`127.0.0.1:${server.port}`);
  });
  after(async () => {
    channel.close();
    await server.server.shutdown();
  });

  it('names the field of a malformed parameter, and starts nothing', async () => {
    const client = createClient(AgentServiceDefinition, channel);
    const cases: [CommandParameters, RegExp][] = [
      [write({ image: '' }), /^parameters\.write_image\.image: an image name is required$/],
      [write({ image: '../etc' }), /^parameters\.write_image\.image: '\.\.\/etc' is not a valid image name/],
      [write({ sha256: 'ABC' }), /^parameters\.write_image\.sha256: 'ABC' is not a sha256/],
      [write({ target: { devicePath: 'sda' } }), /^parameters\.write_image\.target\.device_path: 'sda' is not an absolute device path/],
      [write({ target: { serial: 's\u0000' } }), /^parameters\.write_image\.target\.serial: control character U\+0000/],
      [write({ stallTimeoutMs: 5 }), /^parameters\.write_image\.stall_timeout_ms: at least 100/],
      [write({ maxAttempts: 5000 }), /^parameters\.write_image\.max_attempts: at most 1000, got 5000$/],
      [erase(3), /^parameters\.erase_disks\.mode: 3 is not one of ERASE_MODE_UNSPECIFIED, ERASE_MODE_QUICK, ERASE_MODE_FULL$/],
      [erase(-1), /^parameters\.erase_disks\.mode: -1 is not one of/],
      [erase(1, ['/dev/sda', '/dev/sda']), /^parameters\.erase_disks\.device_paths: \/dev\/sda is listed twice$/],
      [
        erase(
          1,
          Array.from({ length: 257 }, (_, i) => `/dev/d${i}`),
        ),
        /^parameters\.erase_disks\.device_paths: at most 256 device paths/,
      ],
    ];
    for (const [parameters, message] of cases) {
      await assertRejectsWith(client.runCommand({ requestId: '', parameters }, auth), Status.INVALID_ARGUMENT, message);
    }
    await assertRejectsWith(
      client.runCommand({ requestId: 'r\n1', parameters: erase(1) }, auth),
      Status.INVALID_ARGUMENT,
      /^request_id: control character U\+000A/,
    );
    await assertRejectsWith(client.getCommand({ id: 'x'.repeat(129) }, auth), Status.INVALID_ARGUMENT, /^id: at most 128 characters/);
    assert.deepEqual((await client.listCommands({}, auth)).commands, [], 'nothing was started');
  });

  it('answers undecodable bytes with INVALID_ARGUMENT and large requests with RESOURCE_EXHAUSTED', async () => {
    const raw = rawClient(channel);
    try {
      const runCommand = methodsOf(AgentServiceDefinition).find((m) => m.name === 'RunCommand');
      assert.ok(runCommand);
      const headers = { 'metalcast-node-uuid': 'node-1', authorization: `Bearer ${agentApiToken(token)}` };
      const broken = await rawCall(raw, runCommand, [Uint8Array.of(0x12, 0x05, 0x0a)], headers);
      assert.equal(Status[broken.code as Status], 'INVALID_ARGUMENT');
      assert.match(broken.details, /^request: not a valid AgentService\/RunCommand request message/);
      const large = await rawCall(raw, runCommand, [new Uint8Array(100 * 1024)], headers);
      assert.equal(Status[large.code as Status], 'RESOURCE_EXHAUSTED');
      // Without the credential a stranger learns nothing, whatever the bytes.
      const stranger = await rawCall(raw, runCommand, [Uint8Array.of(0x12, 0x05, 0x0a)], {});
      assert.equal(Status[stranger.code as Status], 'UNAUTHENTICATED');
    } finally {
      raw.close();
    }
  });
});
