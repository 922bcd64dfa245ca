import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Client } from '@grpc/grpc-js';
import fc from 'fast-check';
import { type Channel, createChannel, createClient } from 'nice-grpc';
import { HealthDefinition } from 'nice-grpc-server-health';
import { Metadata, Status } from 'nice-grpc-common';
import { agentApiToken } from '../../common/agent-credentials.js';
import { NODE_UUID_KEY } from '../../common/agent-metadata.js';
import { AgentServiceDefinition, RunCommandResponse } from '../../gen/metalcast/v1/agent.js';
import type { Node } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode } from '../helpers/agent-client.js';
import { type AgentProcess, msg, spawnAgent } from '../helpers/agent-process.js';
import { startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { createFakeMachine, type FakeMachine } from '../helpers/fake-machine.js';
import { anyString, devicePathLike, nameLike, sha256Like, type StringHints, uuidLike } from './arbitraries.js';
import { type FuzzMethod, fuzzMethod, type MetadataSpec, methodsOf, type Outcome, rawClient, requestsOf, runs, Tally } from './harness.js';

/*
 * The Agent API of a real agent process on a fake machine (tiny sparse
 * disks, a recording power driver) gets random and malformed requests on
 * every RPC, with the node's real API credential most of the time, so that
 * commands really run: erase_disks erases the fake disks, write_image asks
 * the controller for an image the node may not read, power commands are
 * recorded. Each answer must be a status a correct server gives; afterwards
 * the agent must still run, answer health checks and heartbeat, and have
 * logged no error. The node stays in maintenance, so that the controller
 * leaves the agent to the fuzzer.
 */

const TYPED_RUNS = runs(150);
const RAW_RUNS = runs(100);
const MIB = 1024 * 1024;

describe('agent fuzz: hostile requests on every Agent API RPC', () => {
  const dir = tempDir('metalcast-agent-fuzz-');
  let t: TestController;
  let machine: FakeMachine;
  let agent: AgentProcess;
  let node: Node;
  let channel: Channel;
  let raw: Client;
  let credential = '';
  const stderr: string[] = [];
  const tally = new Tally();
  /** Ids of commands the fuzzer started, for WatchCommand and GetCommand. */
  const commandIds = new Set<string>(['00000000-0000-4000-8000-000000000000']);

  const validMetadata = (): MetadataSpec => ({ [NODE_UUID_KEY]: node.uuid, authorization: `Bearer ${credential}` });

  before(async () => {
    t = await startTestController({ heartbeatTimeout: '60s', heartbeatIntervalMin: '300ms', heartbeatIntervalMax: '600ms' });
    machine = await createFakeMachine(join(dir.path, 'machine'), {
      macs: ['02:f0:22:10:00:01', '02:f0:22:10:00:02'],
      disks: [
        { name: 'sda', sizeBytes: 8 * MIB },
        { name: 'vda', sizeBytes: 4 * MIB },
      ],
    });
    node = await createWaitingNode(t.nodes, 'fuzz-agent-node', machine.macs);
    // In maintenance the controller takes no step on the node: the agent stays the fuzzer's.
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'fuzzed' });
    agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, 'log-level': 'info' });
    agent.child.stderr?.on('data', (chunk: Buffer) => stderr.push(chunk.toString()));
    const address = (await agent.waitForLog(msg('agent API listening'))).advertiseAddress as string;
    await agent.waitForLog(msg('heartbeat stream established'));
    const endpoint = t.controller.sessions.agentEndpoint(node.uuid);
    assert.ok(endpoint, 'the controller knows the agent');
    credential = agentApiToken(endpoint.token);
    channel = createChannel(address);
    raw = rawClient(channel);
  });

  after(async () => {
    raw?.close();
    channel?.close();
    await agent?.kill('SIGKILL');
    await t?.destroy();
    dir.remove();
  });

  const idHint = () => fc.oneof(fc.constantFrom(...commandIds), uuidLike, anyString);
  const strings = (): StringHints => ({
    id: idHint(),
    request_id: fc.oneof(fc.constantFrom('r1', 'r2', 'deploy-1'), anyString),
    image: fc.oneof(fc.constantFrom('fuzz-image', 'no-such-image'), nameLike, anyString),
    sha256: sha256Like,
    device_path: fc.oneof(fc.constantFrom(...machine.disks.map((d) => d.path)), devicePathLike),
    device_paths: fc.oneof(fc.constantFrom(...machine.disks.map((d) => d.path)), devicePathLike),
    name: fc.oneof(fc.constantFrom('sda', 'vda'), anyString),
  });

  const remember = (method: FuzzMethod) => (outcome: Outcome) => {
    if (method.name !== 'RunCommand' || outcome.code !== Status.OK) return;
    const response = Buffer.isBuffer(outcome.response)
      ? RunCommandResponse.decode(outcome.response)
      : (outcome.response as RunCommandResponse);
    if (response.command?.id) commandIds.add(response.command.id);
  };

  for (const method of methodsOf(AgentServiceDefinition)) {
    it(`AgentService/${method.name}`, async (ctx) => {
      const client = createClient(AgentServiceDefinition, channel);
      await fuzzMethod(
        { client, raw, validMetadata, tally },
        method,
        requestsOf(method, strings()),
        { typedRuns: TYPED_RUNS, rawRuns: RAW_RUNS },
        remember(method),
      );
      ctx.diagnostic(tally.describe(method.path));
    });
  }

  for (const method of methodsOf(HealthDefinition as never)) {
    it(`Health/${method.name}`, async (ctx) => {
      const client = createClient(HealthDefinition, channel);
      const request = fc
        .record({ service: fc.oneof(fc.constantFrom('', 'metalcast.v1.AgentService', 'no.such.Service'), anyString) })
        .map((m) => [m]);
      await fuzzMethod({ client, raw, validMetadata: () => ({}), tally }, method, requestsOf(method, {}, request), {
        typedRuns: TYPED_RUNS,
        rawRuns: RAW_RUNS,
      });
      ctx.diagnostic(tally.describe(method.path));
    });
  }

  it('afterwards the agent still runs, answers health checks, heartbeats, and logged no error', async (ctx) => {
    ctx.diagnostic(`${tally.calls} fuzzed calls, ${commandIds.size - 1} commands started`);
    assert.equal(agent.child.exitCode, null, 'the agent process is still running');
    const health = createClient(HealthDefinition, channel);
    assert.equal((await health.check({ service: '' })).status, 1 /* SERVING */);
    const client = createClient(AgentServiceDefinition, channel);
    const { commands } = await client.listCommands({}, { metadata: Metadata(validMetadata()) });
    assert.ok(Array.isArray(commands));
    assert.ok(t.controller.sessions.isOpen(node.uuid), 'the agent still holds its heartbeat stream');
    const errors = agent.logs.filter((line) => typeof line.level === 'number' && line.level >= 50);
    assert.deepEqual(errors, [], 'no error or fatal log lines (an unexpected handler error logs at error)');
    const crashes = stderr.join('').match(/unhandled|uncaught|TypeError|RangeError/gi) ?? [];
    assert.deepEqual(crashes, [], `no unhandled rejection or exception on stderr:\n${stderr.join('').slice(-2000)}`);
  });
});
