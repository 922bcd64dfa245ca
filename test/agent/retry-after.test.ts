import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createServer, type Server, ServerError, Status } from 'nice-grpc';
import { Metadata } from 'nice-grpc-common';
import { MAX_RETRY_AFTER_MS, retryAfterMs } from '../../common/retry-after.js';
import {
  AgentGatewayServiceDefinition,
  type AgentGatewayServiceImplementation,
  type HeartbeatResponse,
} from '../../gen/metalcast/v1/agent_gateway.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';

/*
 * Issue 18 item 11: the agent honours `retry-after-ms` (bounded) in Lookup
 * and Heartbeat. A scripted controller refuses with RESOURCE_EXHAUSTED and
 * the trailer, and records when each call came: a real agent process must
 * stay away for the time asked, although its own backoff (100–500 ms for
 * lookups, 200 ms for reconnects) would have it back much sooner.
 */

const LOOKUP_RETRY_AFTER_MS = 2500;
const HEARTBEAT_RETRY_AFTER_MS = 2000;

describe('retry-after-ms', { timeout: 120_000 }, () => {
  const dirs = tempDir('metalcast-retry-after-');
  let server: Server;
  let address: string;
  const lookups: number[] = [];
  const heartbeats: number[] = [];
  /** Lookups refused before one succeeds. */
  let refuseLookups = 0;
  const agents: AgentProcess[] = [];

  before(async () => {
    const gateway: AgentGatewayServiceImplementation = {
      async lookup(_request, context) {
        lookups.push(Date.now());
        if (lookups.length <= refuseLookups) {
          context.trailer.set('retry-after-ms', String(LOOKUP_RETRY_AFTER_MS));
          throw new ServerError(Status.RESOURCE_EXHAUSTED, 'too many lookups from 127.0.0.1; retry in 3s');
        }
        return {
          nodeUuid: '6d657461-6c63-4000-8000-0000000000aa',
          agentToken: 'a'.repeat(43),
          heartbeatIntervalMinMs: 200,
          heartbeatIntervalMaxMs: 400,
          heartbeatTimeoutMs: 60_000,
          config: { logLevel: '' },
        };
      },
      // biome-ignore lint/correctness/useYield: the scripted controller refuses every stream before answering
      async *heartbeat(_requests, context): AsyncGenerator<HeartbeatResponse> {
        heartbeats.push(Date.now());
        context.trailer.set('retry-after-ms', String(HEARTBEAT_RETRY_AFTER_MS));
        throw new ServerError(Status.RESOURCE_EXHAUSTED, 'too many failed agent token checks from 127.0.0.1; retry in 2s');
      },
      statImage: () => Promise.reject(new ServerError(Status.UNIMPLEMENTED, 'not here')),
      // biome-ignore lint/correctness/useYield: not used by this test
      async *readImage() {
        throw new ServerError(Status.UNIMPLEMENTED, 'not here');
      },
      getConfigDrive: () => Promise.reject(new ServerError(Status.UNIMPLEMENTED, 'not here')),
      // biome-ignore lint/correctness/useYield: not used by this test
      async *getImageManifest() {
        throw new ServerError(Status.UNIMPLEMENTED, 'not here');
      },
      exchangeChunks: () => Promise.reject(new ServerError(Status.UNIMPLEMENTED, 'not here')),
    };
    server = createServer();
    server.add(AgentGatewayServiceDefinition, gateway);
    const port = await server.listen('127.0.0.1:0');
    address = `127.0.0.1:${port}`;
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    server?.forceShutdown();
    dirs.remove();
  });

  const gaps = (times: number[]) => times.slice(1).map((at, i) => at - (times[i] as number));

  it('bounds the value: absent, malformed or negative is none; above the cap is the cap', () => {
    const with_ = (value: string) => {
      const m = new Metadata();
      m.set('retry-after-ms', value);
      return m;
    };
    assert.equal(retryAfterMs(undefined), undefined);
    assert.equal(retryAfterMs(new Metadata()), undefined);
    assert.equal(retryAfterMs(with_('1500')), 1500);
    assert.equal(retryAfterMs(with_('-5')), undefined);
    assert.equal(retryAfterMs(with_('soon')), undefined);
    assert.equal(retryAfterMs(with_('1e9')), undefined);
    assert.equal(retryAfterMs(with_('86400000')), MAX_RETRY_AFTER_MS);
  });

  it('a refused lookup waits at least retry-after-ms before the next one; a refused heartbeat stream is reopened no sooner than asked', async () => {
    refuseLookups = 2;
    const machine = await uniqueFakeMachine(join(dirs.path, 'm1'), 801);
    const agent = spawnAgent({ controller: address, root: machine.root, 'reconnect-delay': '200ms' });
    agents.push(agent);
    await agent.waitForLog((l) => String(l.msg).includes('waiting as the controller asked'), 15_000);
    // Three lookups (two refused), then heartbeat streams, each refused.
    const deadline = Date.now() + 20_000;
    while (heartbeats.length < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.ok(lookups.length === 3, `three lookups, got ${lookups.length}`);
    assert.ok(heartbeats.length >= 4, `four heartbeat streams within 20 s, got ${heartbeats.length}`);

    for (const gap of gaps(lookups))
      assert.ok(gap >= LOOKUP_RETRY_AFTER_MS, `lookup retried after ${gap} ms, asked ${LOOKUP_RETRY_AFTER_MS}`);
    for (const gap of gaps(heartbeats).slice(0, 3)) {
      assert.ok(gap >= HEARTBEAT_RETRY_AFTER_MS, `heartbeat stream reopened after ${gap} ms, asked ${HEARTBEAT_RETRY_AFTER_MS}`);
      // Bounded above too: the jittered delay (at most 2 × 200 ms) is not added on top of the wait asked for.
      assert.ok(gap < HEARTBEAT_RETRY_AFTER_MS + 1500, `heartbeat stream reopened after ${gap} ms`);
    }
    const waits = agent.logs.filter((l) => typeof l.msg === 'string' && l.msg.includes('as the controller asked (retry-after-ms)'));
    assert.ok(waits.some((l) => l.retryAfterMs === LOOKUP_RETRY_AFTER_MS));
    assert.ok(waits.some((l) => l.retryAfterMs === HEARTBEAT_RETRY_AFTER_MS));
    assert.equal(agent.child.exitCode, null, 'the agent keeps trying');
  });
});
