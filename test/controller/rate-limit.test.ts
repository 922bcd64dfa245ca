import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
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
import { clientKey, PeerLimit, PeerRateLimiter, peerHost } from '../../controller/auth/rate-limit.js';
import { methodsOf, rawCall, rawClient } from '../fuzz/harness.js';
import { AgentGatewayServiceDefinition, type LookupResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import {
  eventually,
  metricValue,
  operatorCallOptions,
  scrapeMetrics,
  startTestController,
  type TestController,
  tempDir,
} from '../helpers/controller.js';
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

    it('counts operator clients by IPv4 address and by IPv6 /64', () => {
      assert.equal(clientKey('10.0.0.7:51234'), '10.0.0.7');
      assert.equal(clientKey('::ffff:10.0.0.7:51234'), '10.0.0.7');
      assert.equal(clientKey('[2001:db8:1:2:aaaa::1]:443'), '2001:db8:1:2::/64');
      assert.equal(clientKey('[2001:db8:1:2:bbbb:cccc:dddd:eeee]:443'), '2001:db8:1:2::/64', 'the same /64');
      assert.equal(clientKey('[2001:0db8:0001:0003::1]:443'), '2001:db8:1:3::/64', 'another /64');
      assert.equal(clientKey('::1:51234'), '0:0:0:0::/64');
      assert.equal(clientKey('[fe80::1%eth0]:1'), 'fe80:0:0:0::/64');
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

    it('refuses further wrong agent tokens from a peer and for a node, never a valid token at the same address; the guesser stays refused', async () => {
      const gateway = createClient(AgentGatewayServiceDefinition, channel);
      const otherGateway = createClient(AgentGatewayServiceDefinition, otherPeer);
      const nodes = createClient(NodeServiceDefinition, channel);
      const node = await createWaitingNode(nodes, 'rl-auth', ['02:00:00:00:97:01']);
      const good = await lookup(otherGateway, ['02:00:00:00:97:01']);
      const wrong = { metadata: agentMetadata(node.uuid, 'not-the-token') };
      for (let i = 0; i < 3; i++) await assertRejectsWith(gateway.statImage({ image: 'x' }, wrong), Status.UNAUTHENTICATED);
      await assertRejectsWith(
        gateway.statImage({ image: 'x' }, wrong),
        Status.RESOURCE_EXHAUSTED,
        /^too many failed agent token checks from 127\.0\.0\.1; retry in 1s$/,
      );
      const refusedBefore = await limited('agent_auth');
      assert.ok(refusedBefore >= 1);

      // The node's own agent behind the same address (a NAT), with its valid token, goes on heartbeating.
      const stream = openHeartbeat(gateway, node.uuid, good.agentToken);
      await stream.beat();
      await stream.beat();
      stream.end();
      assert.equal(await stream.ended, undefined, 'a valid token is not refused because a neighbour guessed wrong');

      // The guesser keeps guessing faster than the limit and stays refused: refused guesses do not count as tries.
      for (let i = 0; i < 20; i++) {
        await assertRejectsWith(
          gateway.statImage({ image: 'x' }, { metadata: agentMetadata(randomUUID(), `guess-${i}`) }),
          Status.RESOURCE_EXHAUSTED,
        );
      }
      assert.equal(await limited('agent_auth'), refusedBefore + 20);

      // From another address, wrong tokens for the same node are refused too (per node uuid); for another node they are merely wrong.
      await assertRejectsWith(
        otherGateway.statImage({ image: 'x' }, wrong),
        Status.RESOURCE_EXHAUSTED,
        new RegExp(`^too many failed agent token checks for node ${node.uuid}; retry in 1s$`),
      );
      assert.ok((await limited('agent_auth_node')) >= 1);
      await assertRejectsWith(
        otherGateway.statImage({ image: 'x' }, { metadata: agentMetadata(randomUUID(), 'not-the-token') }),
        Status.UNAUTHENTICATED,
      );
      // And the valid token from there works as well.
      const otherStream = openHeartbeat(otherGateway, node.uuid, good.agentToken);
      await otherStream.beat();
      otherStream.end();
      assert.equal(await otherStream.ended, undefined);
      assert.equal(
        lines.filter(
          (line) => line.msg === 'too many failed agent token checks from 127.0.0.1; refusing them (logged at most once a minute per peer)',
        ).length,
        1,
      );
    });

    it('checks the agent token before the request is decoded: malformed calls without a valid token are UNAUTHENTICATED and counted', async () => {
      // From 127.0.0.2 (the proxy), whose bucket still has a token or two.
      const raw = rawClient(otherPeer);
      const statImage = methodsOf(AgentGatewayServiceDefinition).find((m) => m.name === 'StatImage');
      assert.ok(statImage);
      const garbage = Uint8Array.of(0x0f);
      const outcomes: string[] = [];
      for (let i = 0; i < 8; i++) {
        const outcome = await rawCall(raw, statImage, [garbage], { 'metalcast-node-uuid': randomUUID(), authorization: 'Bearer x' });
        outcomes.push(Status[outcome.code as Status]);
      }
      raw.close();
      // Before the token check moved ahead of decoding, every one was INVALID_ARGUMENT and none was counted.
      assert.equal(outcomes[0], 'UNAUTHENTICATED', outcomes.join());
      assert.ok(
        outcomes.every((code) => code === 'UNAUTHENTICATED' || code === 'RESOURCE_EXHAUSTED'),
        outcomes.join(),
      );
      assert.equal(outcomes.at(-1), 'RESOURCE_EXHAUSTED', outcomes.join());
    });
  });
});

describe('operator authentication failures', () => {
  /** Sends wrong operator tokens for `ms` from 4 concurrent callers; counts the answers by status. */
  async function guess(t: TestController, ms: number): Promise<Record<string, number>> {
    const counts: Record<string, number> = {};
    const until = Date.now() + ms;
    const caller = async (n: number) => {
      for (let i = 0; Date.now() < until && i < 100_000; i++) {
        const nodes = createClient(NodeServiceDefinition, t.channel, operatorCallOptions(`mco_${`${n}x${i}`.padEnd(43, 'A')}`));
        try {
          await nodes.listNodes({});
          counts.OK = (counts.OK ?? 0) + 1;
        } catch (error) {
          const code = Status[(error as ClientError).code] ?? 'other';
          counts[code] = (counts[code] ?? 0) + 1;
        }
      }
    };
    await Promise.all([0, 1, 2, 3].map(caller));
    return counts;
  }

  it('refuses a client that keeps guessing with RESOURCE_EXHAUSTED, a retry hint and a metric; a valid token from the same address still works', async () => {
    const before = await startTestController({ operatorAuthFailureLimit: '0' });
    const after = await startTestController({ operatorAuthFailureLimit: '60', operatorAuthFailureBurst: '20' });
    try {
      const seconds = 1.5;
      const off = await guess(before, seconds * 1000);
      const on = await guess(after, seconds * 1000);
      const rate = (counts: Record<string, number>) => ((counts.UNAUTHENTICATED ?? 0) / seconds).toFixed(1);
      console.log(
        `operator token guesses answered (checked) per second from one address: without the limit ${rate(off)}, with --operator-auth-failure-limit 60 --operator-auth-failure-burst 20 ${rate(on)} (refused RESOURCE_EXHAUSTED: ${on.RESOURCE_EXHAUSTED ?? 0})`,
      );
      assert.equal(off.RESOURCE_EXHAUSTED, undefined, 'no limit: every guess is checked');
      assert.ok((off.UNAUTHENTICATED ?? 0) > 22, `${JSON.stringify(off)}`);
      // The burst, plus a token a second for the time the run took (and its start).
      assert.ok((on.UNAUTHENTICATED ?? 0) <= 20 + Math.ceil(seconds) + 2, JSON.stringify(on));
      assert.ok((on.RESOURCE_EXHAUSTED ?? 0) > 0, JSON.stringify(on));

      let trailer: string | undefined;
      const wrong = createClient(NodeServiceDefinition, after.channel, operatorCallOptions(`mco_${'B'.repeat(43)}`));
      await assertRejectsWith(
        wrong.listNodes(
          {},
          {
            onTrailer: (metadata) => {
              trailer = metadata.get('retry-after-ms');
            },
          },
        ),
        Status.RESOURCE_EXHAUSTED,
        /^too many failed operator authentications from 127\.0\.0\.1; retry in 1s$/,
      );
      assert.equal(trailer, '1000');
      // No token at all counts as a failure too.
      await assertRejectsWith(createClient(NodeServiceDefinition, after.channel).listNodes({}), Status.RESOURCE_EXHAUSTED);
      // The operator at the same address, with a valid token, is not refused.
      assert.ok(Array.isArray((await after.nodes.listNodes({})).nodes));
      const refused = metricValue(await scrapeMetrics(after.controller), 'metalcast_rate_limited_total{kind="operator_auth"}') ?? 0;
      assert.ok(refused >= (on.RESOURCE_EXHAUSTED ?? 0) + 2, `metric ${refused}`);
    } finally {
      await before.destroy();
      await after.destroy();
    }
  });
});
