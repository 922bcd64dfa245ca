import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { AgentStatus } from '../../gen/metalcast/v1/agent_gateway.js';
import { CommandProgress, CommandState } from '../../gen/metalcast/v1/command.js';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { AGENT_VERSION, createWaitingNode, type HeartbeatStream, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { eventually, FAST_FLAGS, metricValue, scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { assertClientError } from '../helpers/grpc-assert.js';

describe('Heartbeat stream', () => {
  let t: TestController;
  const streams: HeartbeatStream[] = [];
  const heartbeat = (uuid: string, token: string) => {
    const stream = openHeartbeat(t.gateway, uuid, token);
    streams.push(stream);
    return stream;
  };
  /** A node in inspect wait and a token for it. */
  async function agentFor(name: string, mac: string) {
    const node = await createWaitingNode(t.nodes, name, [mac]);
    const { agentToken } = await lookup(t.gateway, [mac]);
    return { node, token: agentToken };
  }
  const connected = async () => metricValue(await scrapeMetrics(t.controller), 'metalcast_agents_connected');

  before(async () => {
    t = await startTestController(FAST_FLAGS);
  });
  after(async () => {
    for (const stream of streams) stream.cancel();
    await Promise.all(streams.map((s) => s.ended));
    await t.destroy();
  });

  describe('authentication', () => {
    it('refuses a stream without the token or without the node uuid with UNAUTHENTICATED, saying what is missing', async () => {
      const { node, token } = await agentFor('hb-auth-missing', '02:00:00:00:11:01');
      for (const [uuid, tok] of [
        [node.uuid, ''],
        ['', token],
      ] as const) {
        const stream = heartbeat(uuid, tok);
        stream.send();
        assertClientError(
          await stream.ended,
          Status.UNAUTHENTICATED,
          /needs 'metalcast-node-uuid' and 'authorization: Bearer <token>' metadata from Lookup/,
        );
      }
    });

    it('refuses a wrong token, a token of another node and an unknown node with UNAUTHENTICATED', async () => {
      const a = await agentFor('hb-auth-a', '02:00:00:00:12:01');
      const b = await agentFor('hb-auth-b', '02:00:00:00:12:02');
      const cases: [string, string][] = [
        [a.node.uuid, 'A'.repeat(43)],
        [a.node.uuid, b.token],
        ['00000000-0000-4000-8000-000000000000', a.token],
      ];
      for (const [uuid, token] of cases) {
        const stream = heartbeat(uuid, token);
        stream.send();
        assertClientError(await stream.ended, Status.UNAUTHENTICATED, /agent token is not valid for node .*; look up again/);
      }
      // The refusals left the real tokens working.
      const ok = heartbeat(a.node.uuid, a.token);
      await ok.beat();
      ok.end();
      assert.equal(await ok.ended, undefined);
    });

    it('refuses the token once the node left the agent states, and ends its open stream', async () => {
      const { node, token } = await agentFor('hb-abort', '02:00:00:00:13:01');
      const stream = heartbeat(node.uuid, token);
      await stream.beat();
      const { node: aborted } = await t.nodes.setProvisionState({ node: node.uuid, action: ProvisionAction.PROVISION_ACTION_ABORT });
      assert.equal(aborted?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
      assertClientError(await stream.ended, Status.UNAUTHENTICATED, /node left the agent states \(now inspect failed\)/);
      const again = heartbeat(node.uuid, token);
      again.send();
      assertClientError(await again.ended, Status.UNAUTHENTICATED, /agent token is not valid/);
    });
  });

  describe('heartbeats', () => {
    it('acknowledges each heartbeat with its sequence and a jittered interval within the configured bounds', async () => {
      const { node, token } = await agentFor('hb-ack', '02:00:00:00:14:01');
      const stream = heartbeat(node.uuid, token);
      const intervals = new Set<number>();
      for (let i = 1; i <= 10; i++) {
        const ack = await stream.beat();
        assert.equal(ack.sequence, i);
        assert.ok(ack.nextIntervalMs >= 200 && ack.nextIntervalMs <= 400, `interval ${ack.nextIntervalMs} within 200..400 ms`);
        intervals.add(ack.nextIntervalMs);
      }
      assert.ok(intervals.size > 1, 'the interval is jittered');
      stream.end();
      assert.equal(await stream.ended, undefined);
    });

    it('records heartbeats on the node: time, agent address and version, status and progress', async () => {
      const { node, token } = await agentFor('hb-record', '02:00:00:00:15:01');
      // In maintenance the controller leaves the node alone: an agent address would otherwise start inspection through it.
      await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'heartbeat test' });
      const beforeCount = metricValue(await scrapeMetrics(t.controller), 'metalcast_heartbeats_total') ?? 0;
      const stream = heartbeat(node.uuid, token);
      const sentAt = Date.now();
      await stream.beat({ agentAddress: '10.1.2.3:7351', status: AgentStatus.AGENT_STATUS_IDLE });
      await stream.beat({
        agentAddress: '10.1.2.3:7351',
        agentVersion: 'test-agent/1.1',
        status: AgentStatus.AGENT_STATUS_BUSY,
        command: {
          id: 'c1',
          name: 'write_image',
          requestId: 'r1',
          state: CommandState.COMMAND_STATE_RUNNING,
          progress: {
            ...CommandProgress.fromPartial({}),
            phase: 'writing',
            doneBytes: 1024,
            totalBytes: 4096,
            rateBytesPerSecond: 512,
            etaSeconds: 6,
          },
          error: '',
        },
      });
      const ackedAt = Date.now();

      const updated = await eventually(
        async () => {
          const got = (await t.nodes.getNode({ node: node.uuid })).node;
          return got?.agentVersion === 'test-agent/1.1' ? got : undefined;
        },
        { timeoutMs: 5000, what: 'the heartbeats to reach the node' },
      );
      assert.equal(updated.agentAddress, '10.1.2.3:7351');
      const heardAt = updated.lastHeartbeatAt?.getTime() ?? 0;
      assert.ok(heardAt >= sentAt && heardAt <= ackedAt, 'last_heartbeat_at is when the controller received it');
      assert.equal(updated.progress?.phase, 'writing');
      assert.equal(updated.progress?.doneBytes, 1024);
      assert.equal(updated.progress?.totalBytes, 4096);
      const record = await t.controller.store.getNode(node.uuid);
      assert.equal(record?.agentStatus, 'busy');
      assert.equal(record?.livenessAt, heardAt, 'a heartbeat is evidence of life for the sweep');
      assert.equal(metricValue(await scrapeMetrics(t.controller), 'metalcast_heartbeats_total'), beforeCount + 2);

      // A later heartbeat without a command keeps the last progress seen.
      await stream.beat({ agentAddress: '10.1.2.3:7351', agentVersion: AGENT_VERSION });
      const later = await eventually(
        async () => {
          const got = (await t.nodes.getNode({ node: node.uuid })).node;
          return got?.agentVersion === AGENT_VERSION ? got : undefined;
        },
        { timeoutMs: 5000, what: 'the third heartbeat' },
      );
      assert.equal(later.progress?.doneBytes, 1024);
      stream.end();
      assert.equal(await stream.ended, undefined);
    });

    it('ends the stream with INVALID_ARGUMENT on a malformed agent address', async () => {
      const { node, token } = await agentFor('hb-bad-address', '02:00:00:00:16:01');
      const stream = heartbeat(node.uuid, token);
      await stream.beat();
      stream.send({ agentAddress: 'not an address' });
      assertClientError(await stream.ended, Status.INVALID_ARGUMENT, /agent_address: 'not an address' is not of the form host:port/);
      await eventually(async () => (await connected()) === 0, { what: 'the session to close' });
    });

    it('holds streams to the sequence contract: from 1, upwards with gaps allowed; a late start, a repeat or a step back ends the stream with INVALID_ARGUMENT and records nothing of it', async () => {
      const { node, token } = await agentFor('hb-sequence', '02:00:00:00:19:01');
      await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'sequence test' });
      // Upwards with a gap: accepted, each ack carries its number.
      const ok = heartbeat(node.uuid, token);
      assert.equal((await ok.beat({ sequence: 1 })).sequence, 1);
      assert.equal((await ok.beat({ sequence: 2 })).sequence, 2);
      assert.equal((await ok.beat({ sequence: 5 })).sequence, 5);
      ok.end();
      assert.equal(await ok.ended, undefined);

      const cases: [string, number[], RegExp][] = [
        ['starts at 5', [5], /sequence: the first heartbeat of a stream is 1, got 5; open a new stream and number it from 1/],
        ['starts at 0', [0], /sequence: the first heartbeat of a stream is 1, got 0/],
        ['repeats', [1, 2, 2], /sequence: 2 after 2; the heartbeats of a stream are numbered upwards without repeats/],
        ['goes back', [1, 2, 3, 1], /sequence: 1 after 3;/],
      ];
      for (const [what, sequences, message] of cases) {
        const stream = heartbeat(node.uuid, token);
        const last = sequences.at(-1) as number;
        for (const sequence of sequences.slice(0, -1)) await stream.beat({ sequence });
        stream.send({ sequence: last, agentVersion: `refused/${what}` });
        // Bounded: without the check the stream would simply go on.
        const ended = await Promise.race([stream.ended, sleep(5000).then(() => 'still open')]);
        assert.notEqual(ended, 'still open', `${what}: the stream was not ended`);
        assertClientError(ended, Status.INVALID_ARGUMENT, message);
        assert.equal(stream.responses.size, 0, `${what}: the refused heartbeat got no ack`);
      }
      // A new stream from 1 works again after each refusal, and nothing of a refused heartbeat was recorded.
      const again = heartbeat(node.uuid, token);
      await again.beat({ sequence: 1, agentVersion: 'test-agent/after' });
      const recorded = await eventually(
        async () => {
          const got = (await t.nodes.getNode({ node: node.uuid })).node;
          return got?.agentVersion === 'test-agent/after' ? got : undefined;
        },
        { timeoutMs: 5000, what: 'the last good heartbeat to be recorded' },
      );
      assert.doesNotMatch(recorded.agentVersion, /refused/);
      again.end();
      assert.equal(await again.ended, undefined);
    });

    it('ends an older stream of the same node with ABORTED when the agent opens a new one', async () => {
      const { node, token } = await agentFor('hb-replace', '02:00:00:00:17:01');
      const older = heartbeat(node.uuid, token);
      await older.beat();
      const newer = heartbeat(node.uuid, token);
      await newer.beat();
      assertClientError(await older.ended, Status.ABORTED, /a newer heartbeat stream for this node replaced this one/);
      await newer.beat();
      assert.equal(await connected(), 1);
      newer.end();
      assert.equal(await newer.ended, undefined);
      assert.equal(await connected(), 0);
    });

    it('counts open streams in metalcast_agents_connected', async () => {
      const a = await agentFor('hb-count-a', '02:00:00:00:18:01');
      const b = await agentFor('hb-count-b', '02:00:00:00:18:02');
      // Earlier tests' streams close on the controller as their handlers unwind; on a loaded machine
      // that can trail the client's view by a moment, so start from a settled zero.
      await eventually(async () => (await connected()) === 0, { what: 'no stream open before this test' });
      const sa = heartbeat(a.node.uuid, a.token);
      await sa.beat();
      assert.equal(await connected(), 1);
      const sb = heartbeat(b.node.uuid, b.token);
      await sb.beat();
      assert.equal(await connected(), 2);
      sa.end();
      await sa.ended;
      assert.equal(await connected(), 1);
      sb.cancel();
      await eventually(async () => (await connected()) === 0, { what: 'the cancelled stream to close' });
    });
  });
});
