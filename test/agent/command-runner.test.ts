import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createChannel, createClient, Status } from 'nice-grpc';
import { agentApiToken } from '../../common/agent-credentials.js';
import { agentMetadata } from '../../common/agent-metadata.js';
import type { CommandHandler } from '../../agent/commands/command.js';
import { CommandRunner } from '../../agent/commands/runner.js';
import { startAgentServer } from '../../agent/api/server.js';
import { AgentServiceDefinition } from '../../gen/metalcast/v1/agent.js';
import { CommandState } from '../../gen/metalcast/v1/command.js';
import { testLogger } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

/** A command that runs until the test releases it, reporting progress on the way. */
function gatedCommand() {
  let release: (fail?: string) => void = () => {};
  const handler: CommandHandler<'eraseDisks'> = {
    name: 'eraseDisks',
    run: (_parameters, context) =>
      new Promise((resolve, reject) => {
        context.progress({ phase: 'erasing', doneBytes: 1, totalBytes: 4 });
        release = (fail) => (fail ? reject(new Error(fail)) : resolve(undefined));
      }),
  };
  return { handler: handler as unknown as CommandHandler, release: (fail?: string) => release(fail) };
}

const ERASE = { command: { $case: 'eraseDisks' as const, value: { mode: 1, devicePaths: [] } } };

describe('agent commands over gRPC', () => {
  const token = 'test-token-0123456789';
  const gate = gatedCommand();
  const runner = new CommandRunner([gate.handler], 3, testLogger());
  let server: Awaited<ReturnType<typeof startAgentServer>>;
  let channel: ReturnType<typeof createChannel>;
  let client: ReturnType<typeof createClient<typeof AgentServiceDefinition>>;
  // The controller presents the credential derived from the agent token, never the token itself.
  const auth = { metadata: agentMetadata('node-1', agentApiToken(token)) };

  before(async () => {
    server = await startAgentServer(
      '127.0.0.1:0',
      { timeMs: 10_000, timeoutMs: 10_000 },
      {
        runner,
        currentToken: () => token,
        inventory: async () => ({ interfaces: [], disks: [], cpu: undefined, memory: undefined, system: undefined }),
        logger: testLogger(),
      },
    );
    channel = createChannel(`127.0.0.1:${server.port}`);
    client = createClient(AgentServiceDefinition, channel);
  });
  after(async () => {
    channel.close();
    await server.server.shutdown();
  });

  it('runs one command at a time: a second gets FAILED_PRECONDITION "agent busy with <command>"', async () => {
    const { command } = await client.runCommand({ requestId: 'a', parameters: ERASE }, auth);
    assert.equal(command?.state, CommandState.COMMAND_STATE_RUNNING);
    await assertRejectsWith(
      client.runCommand({ requestId: 'b', parameters: ERASE }, auth),
      Status.FAILED_PRECONDITION,
      /^agent busy with erase_disks/,
    );

    const updates: CommandState[] = [];
    const watching = (async () => {
      for await (const update of client.watchCommand({ id: command?.id ?? '' }, auth)) updates.push(update.command?.state ?? 0);
    })();
    gate.release('disk on fire');
    await watching;
    assert.equal(updates.at(-1), CommandState.COMMAND_STATE_FAILED);
    const { command: finished } = await client.getCommand({ id: command?.id ?? '' }, auth);
    assert.equal(finished?.error, 'disk on fire');
    assert.equal(finished?.progress?.phase, 'erasing');

    // Free again: the next command starts.
    const next = await client.runCommand({ requestId: 'c', parameters: ERASE }, auth);
    assert.equal(next.command?.state, CommandState.COMMAND_STATE_RUNNING);
    gate.release();
  });

  it('keeps a bounded history, newest first', async () => {
    for (const id of ['d', 'e', 'f', 'g']) {
      const { command } = await client.runCommand({ requestId: id, parameters: ERASE }, auth);
      gate.release();
      for await (const _ of client.watchCommand({ id: command?.id ?? '' }, auth));
    }
    const { commands } = await client.listCommands({}, auth);
    assert.deepEqual(
      commands.map((c) => c.requestId),
      ['g', 'f', 'e'],
    );
    await assertRejectsWith(client.getCommand({ id: 'nope' }, auth), Status.NOT_FOUND, /ListCommands/);
  });

  it('a watch ends when the caller cancels, while the command goes on', async () => {
    const { command } = await client.runCommand({ requestId: 'h', parameters: ERASE }, auth);
    const abort = new AbortController();
    const seen: CommandState[] = [];
    const watching = (async () => {
      for await (const update of client.watchCommand({ id: command?.id ?? '' }, { ...auth, signal: abort.signal })) {
        seen.push(update.command?.state ?? 0);
        abort.abort();
      }
    })();
    await assert.rejects(watching, (error: Error) => error.name === 'AbortError');
    assert.deepEqual(seen, [CommandState.COMMAND_STATE_RUNNING]);
    assert.equal(runner.isBusy(), true);
    gate.release();
  });
});
