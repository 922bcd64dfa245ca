import assert from 'node:assert/strict';
import { createServer, type Server, connect } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type Channel, ClientError, createChannel, createClient, Status } from 'nice-grpc';
import { agentMetadata } from '../../common/agent-metadata.js';
import { createLogger } from '../../common/logging.js';
import { lookupWithBackoff } from '../../agent/controller/lookup.js';
import type { ControllerLink } from '../../agent/controller/controller-link.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { PeerLimit, PeerRateLimiter, peerHost } from '../../controller/auth/rate-limit.js';
import { AgentGatewayServiceDefinition, type LookupResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { eventually, metricValue, scrapeMetrics, tempDir } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

describe('per-peer rate limits', () => {
  describe('PeerRateLimiter', () => {
    it('lets a burst through, refuses the next with the time until a token, and refills at the rate', () => {
      let now = 1_000_000;
      const limiter = new PeerRateLimiter({ perMinute: 60, burst: 3 }, { now: () => now });
      assert.deepEqual([limiter.take('a'), limiter.take('a'), limiter.take('a')], [0, 0, 0]);
      assert.equal(limiter.take('a'), 1000, 'one token a second: the next in 1000 ms');
      assert.equal(limiter.take('b'), 0, 'another peer has its own bucket');
      now += 500;
      assert.equal(limiter.take('a'), 500);
      now += 500;
      assert.equal(limiter.take('a'), 0, 'a token came back after a second');
      now += 60_000;
      assert.deepEqual(
        [limiter.take('a'), limiter.take('a'), limiter.take('a'), limiter.take('a')],
        [0, 0, 0, 1000],
        'never more than the burst',
      );
    });

    it('charges failures after the fact without going below zero, and refuses while empty', () => {
      let now = 0;
      const limiter = new PeerRateLimiter({ perMinute: 60, burst: 2 }, { now: () => now });
      for (let i = 0; i < 5; i++) limiter.charge('a');
      assert.equal(limiter.wait('a'), 1000);
      now += 1000;
      assert.equal(limiter.wait('a'), 0);
    });

    it('is off with a rate of 0, and forgets the least recently seen peers beyond its bound', () => {
      const off = new PeerRateLimiter({ perMinute: 0, burst: 1 });
      for (let i = 0; i < 100; i++) assert.equal(off.take('a'), 0);
      assert.equal(off.size, 0, 'tracks nothing when off');
      const checked = new PeerRateLimiter({ perMinute: 60, burst: 1 });
      for (let i = 0; i < 100; i++) assert.equal(checked.wait(`peer-${i}`), 0);
      assert.equal(checked.size, 0, 'checking a peer that was never charged remembers nothing');
      const limiter = new PeerRateLimiter({ perMinute: 60, burst: 1 }, { maxPeers: 3 });
      for (let i = 0; i < 10; i++) limiter.take(`peer-${i}`);
      assert.equal(limiter.size, 3);
      assert.equal(limiter.take('peer-0'), 0, 'a forgotten peer starts over with a full bucket');
      assert.ok(limiter.take('peer-9') > 0, 'a remembered one does not');
    });

    it('keys peers by host, without the port', () => {
      assert.equal(peerHost('10.0.0.7:51234'), '10.0.0.7');
      assert.equal(peerHost('::1:51234'), '::1');
      assert.equal(peerHost('::ffff:10.0.0.7:51234'), '10.0.0.7');
      assert.equal(peerHost('[fe80::1]:51234'), 'fe80::1');
      assert.equal(peerHost('unknown'), 'unknown');
    });
  });

  describe('PeerLimit', () => {
    it('counts every refusal and logs at most one line a minute per peer, with the number refused', () => {
      let now = 0;
      const lines: Record<string, unknown>[] = [];
      const logger = createLogger({ name: 't', level: 'info', destination: { write: (l: string) => void lines.push(JSON.parse(l)) } });
      let counted = 0;
      const metrics = { rateLimited: { inc: () => void counted++ } } as never;
      const limit = new PeerLimit('lookup', { perMinute: 1, burst: 1 }, metrics, logger, { now: () => now });
      limit.take('10.0.0.7');
      for (let i = 0; i < 20; i++) assert.throws(() => limit.take('10.0.0.7'), /too many lookups from 10\.0\.0\.7; retry in 60s/);
      assert.equal(counted, 20);
      assert.equal(lines.length, 1);
      assert.equal(lines[0]?.peer, '10.0.0.7');
      assert.equal(lines[0]?.refused, 1);
      now += 30_000;
      assert.throws(() => limit.take('10.0.0.7'));
      assert.equal(lines.length, 1, 'still within the minute');
      now += 30_000;
      limit.take('10.0.0.7'); // the token of the minute
      assert.throws(() => limit.take('10.0.0.7'));
      assert.equal(lines.length, 2);
      assert.equal(lines[1]?.refused, 21, 'the next line says how many were refused since the last');
    });

    it('logs at most ten lines a minute however many peers are refused', () => {
      const lines: string[] = [];
      const logger = createLogger({ name: 't', level: 'info', destination: { write: (l: string) => void lines.push(l) } });
      const limit = new PeerLimit('agent_auth', { perMinute: 1, burst: 1 }, { rateLimited: { inc() {} } } as never, logger);
      for (let i = 0; i < 100; i++) {
        limit.charge(`10.0.1.${i}`);
        assert.throws(() => limit.check(`10.0.1.${i}`), /too many failed agent token checks from 10\.0\.1\.\d+/);
      }
      assert.equal(lines.length, 10);
    });
  });

  it('the agent backs off and keeps looking up while the controller answers RESOURCE_EXHAUSTED', async () => {
    let calls = 0;
    const answer: LookupResponse = {
      nodeUuid: 'n',
      agentToken: 't',
      heartbeatIntervalMinMs: 1,
      heartbeatIntervalMaxMs: 2,
      heartbeatTimeoutMs: 3,
      config: undefined,
    };
    const link = {
      address: '10.0.0.1:7350',
      next() {},
      gateway: {
        async lookup() {
          calls++;
          if (calls < 3) throw new ClientError('/metalcast.v1.AgentGatewayService/Lookup', Status.RESOURCE_EXHAUSTED, 'too many lookups');
          return answer;
        },
      },
    } as unknown as ControllerLink;
    const response = await lookupWithBackoff(
      link,
      { macAddresses: ['02:00:00:00:00:01'], systemSerial: '', systemUuid: '', agentVersion: 'v' },
      { backoffStartMs: 10, backoffMaxMs: 20, budgetMs: 5000, callTimeoutMs: 1000 },
      createLogger({ name: 't', level: 'silent' }),
      new AbortController().signal,
    );
    assert.equal(response, answer);
    assert.equal(calls, 3);
  });

  describe('on a real controller', () => {
    const dir = tempDir('metalcast-rate-limit-');
    let controller: RunningController;
    const lines: Record<string, unknown>[] = [];
    let channel: Channel;
    let otherPeer: Channel;
    let proxy: Server;

    before(async () => {
      const config = loadControllerConfig(
        {
          listen: '127.0.0.1:0',
          metricsListen: '127.0.0.1:0',
          dataDir: join(dir.path, 'data'),
          controllerId: 'rate-limit-test',
          insecure: 'true',
          operatorAuth: 'none',
          lookupRateLimit: '60',
          lookupBurst: '5',
          agentAuthFailureLimit: '60',
          agentAuthFailureBurst: '3',
          heartbeatFlushInterval: '50ms',
        },
        {},
      );
      const destination = { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) };
      controller = await startController(config, createLogger({ name: 'rate-limit-test', level: 'info', destination }));
      channel = createChannel(controller.grpcAddress);
      // Another peer: a proxy whose connections to the controller come from 127.0.0.2.
      const port = Number(controller.grpcAddress.split(':').at(-1));
      proxy = createServer((socket) => {
        const upstream = connect({ host: '127.0.0.1', port, localAddress: '127.0.0.2' });
        socket.pipe(upstream).pipe(socket);
        socket.on('error', () => upstream.destroy());
        upstream.on('error', () => socket.destroy());
      });
      await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
      otherPeer = createChannel(`127.0.0.1:${(proxy.address() as { port: number }).port}`);
    });

    after(async () => {
      channel.close();
      otherPeer.close();
      await controller.stop();
      await new Promise((resolve) => proxy.close(resolve));
      dir.remove();
    });

    const limited = async (kind: string) =>
      metricValue(await scrapeMetrics(controller), `metalcast_rate_limited_total{kind="${kind}"}`) ?? 0;

    it('refuses a burst of lookups from one peer with RESOURCE_EXHAUSTED, a metric and one log line; another peer is unaffected; the limit recovers', async () => {
      const gateway = createClient(AgentGatewayServiceDefinition, channel);
      const nodes = createClient(NodeServiceDefinition, channel);
      assert.equal(await limited('lookup'), 0, 'the series exists from the start');
      for (let i = 0; i < 5; i++) await assertRejectsWith(lookup(gateway, [`02:00:00:00:99:${10 + i}`]), Status.NOT_FOUND);
      for (let i = 0; i < 10; i++) {
        await assertRejectsWith(
          lookup(gateway, ['02:00:00:00:99:99']),
          Status.RESOURCE_EXHAUSTED,
          /^too many lookups from 127\.0\.0\.1; retry in 1s$/,
        );
      }
      assert.equal(await limited('lookup'), 10);
      const logged = lines.filter((line) => typeof line.msg === 'string' && line.msg.startsWith('too many lookups from 127.0.0.1'));
      assert.equal(logged.length, 1, 'one log line, not one per refused call');
      assert.equal(logged[0]?.level, 40, 'a warning');

      // A good agent elsewhere (another address) looks up and heartbeats as usual.
      const node = await createWaitingNode(nodes, 'rl-good', ['02:00:00:00:98:01']);
      const otherGateway = createClient(AgentGatewayServiceDefinition, otherPeer);
      const found = await lookup(otherGateway, ['02:00:00:00:98:01']);
      assert.equal(found.nodeUuid, node.uuid);
      const stream = openHeartbeat(otherGateway, node.uuid, found.agentToken);
      await stream.beat();
      stream.end();
      assert.equal(await stream.ended, undefined);

      // One lookup a second comes back: refused calls took nothing.
      await eventually(
        async () => {
          try {
            await lookup(gateway, ['02:00:00:00:99:99']);
          } catch (error) {
            return error instanceof ClientError && error.code === Status.NOT_FOUND;
          }
        },
        { timeoutMs: 5000, intervalMs: 200, what: 'the lookup limit to recover' },
      );
    });

    it('refuses agent calls from a peer that failed the token check too often, even with a good token; another peer is unaffected', async () => {
      const gateway = createClient(AgentGatewayServiceDefinition, channel);
      const otherGateway = createClient(AgentGatewayServiceDefinition, otherPeer);
      const nodes = createClient(NodeServiceDefinition, channel);
      const node = await createWaitingNode(nodes, 'rl-auth', ['02:00:00:00:97:01']);
      const good = await lookup(otherGateway, ['02:00:00:00:97:01']);
      const wrong = { metadata: agentMetadata(node.uuid, 'not-the-token') };
      for (let i = 0; i < 3; i++) await assertRejectsWith(gateway.statImage({ image: 'x' }, wrong), Status.UNAUTHENTICATED);
      const stream = openHeartbeat(gateway, node.uuid, good.agentToken);
      stream.send();
      await assertRejectsWith(
        (async () => {
          const error = await stream.ended;
          if (error) throw error;
        })(),
        Status.RESOURCE_EXHAUSTED,
        /^too many failed agent token checks from 127\.0\.0\.1; retry in 1s$/,
      );
      assert.equal(await limited('agent_auth'), 1);
      assert.equal(
        lines.filter(
          (line) => line.msg === 'too many failed agent token checks from 127.0.0.1; refusing them (logged at most once a minute per peer)',
        ).length,
        1,
      );

      // The agent at another address, with the good token, is not affected.
      const otherStream = openHeartbeat(otherGateway, node.uuid, good.agentToken);
      await otherStream.beat();
      otherStream.end();
      assert.equal(await otherStream.ended, undefined);
    });
  });
});
