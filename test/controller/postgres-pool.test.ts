import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { type Channel, ClientError, createChannel, createClient, Status } from 'nice-grpc';
import { Status as GrpcStatus } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { DEFAULT_POOL_SIZE, PostgresStore } from '../../controller/store/postgres.js';
import { AgentGatewayServiceDefinition } from '../../gen/metalcast/v1/agent_gateway.js';
import { lookup, openHeartbeat } from '../helpers/agent-client.js';
import { startTestController, type TestController } from '../helpers/controller.js';
import { postgresSchema, postgresSkipReason } from '../helpers/postgres.js';
import { holdNextCommit } from '../helpers/postgres-hold.js';

const skip = await postgresSkipReason();
const AGENTS = 1000;
/** The pool the storm runs on: the default, or another size to compare (METALCAST_STORM_POOL_SIZE=10, as docs/hardening-controller.md did). */
const POOL_SIZE = Number(process.env.METALCAST_STORM_POOL_SIZE ?? DEFAULT_POOL_SIZE);

describe('the PostgreSQL connection pool', { skip }, () => {
  let schema: Awaited<ReturnType<typeof postgresSchema>>;
  before(async () => {
    schema = await postgresSchema();
  });
  after(async () => {
    await schema?.drop();
  });

  it('a call that finds every connection busy waits at most --database-pool-wait, then fails UNAVAILABLE saying so', async () => {
    const store = await PostgresStore.open(schema.url, { poolSize: 1, poolWaitMs: 300 });
    try {
      // The pool's one connection, busy in a transaction that does not commit yet.
      const held = holdNextCommit(store);
      const busy = store.createNode(
        { name: 'pool-held', macAddresses: ['02:00:00:00:b0:01'], properties: {} },
        { kind: 'created', message: 'created', actor: 'test', fromState: null, toState: null },
      );
      await held.atCommit;
      const startedAt = Date.now();
      const error = await store.listNodes({ limit: 10 }).then(
        () => undefined,
        (e: unknown) => e,
      );
      const waitedMs = Date.now() - startedAt;
      held.release();
      await busy;
      assert.ok(error instanceof MetalcastError, String(error));
      assert.equal(error.status, GrpcStatus.UNAVAILABLE);
      assert.match(
        error.message,
        /^the database is busy: no connection of the pool was free within 300 ms \(all 1 in use, \d+ more calls waiting\); retry shortly, or raise --database-pool-size/,
      );
      assert.ok(waitedMs < 3000, `waited ${waitedMs} ms for a 300 ms bound`);
      assert.equal((await store.listNodes({ limit: 10 })).length, 1, 'the pool works again once the connection is free');
    } finally {
      await store.close();
    }
  });

  describe(`a connect storm of ${AGENTS} agents on a pool of ${POOL_SIZE}`, () => {
    let t: TestController;
    const channels: Channel[] = [];
    before(async () => {
      t = await startTestController({
        database: schema.url,
        databasePoolSize: String(POOL_SIZE),
        operatorAuth: 'none',
        heartbeatTimeout: '120s',
      });
      for (let i = 0; i < 8; i++) channels.push(createChannel(t.controller.grpcAddress));
    });
    after(async () => {
      for (const channel of channels) channel.close();
      await t?.destroy();
    });

    it('every agent looks up and heartbeats (retrying UNAVAILABLE as agents do), none is left out', async () => {
      const store = t.controller.store;
      const macs: string[] = [];
      for (let batch = 0; batch < AGENTS; batch += 50) {
        await Promise.all(
          Array.from({ length: Math.min(50, AGENTS - batch) }, async (_, j) => {
            const i = batch + j;
            const mac = `02:50:00:00:${(i >> 8).toString(16).padStart(2, '0')}:${(i & 255).toString(16).padStart(2, '0')}`;
            macs[i] = mac;
            const node = await store.createNode(
              { name: `storm-${i}`, macAddresses: [mac], properties: {} },
              { kind: 'created', message: 'created', actor: 'test', fromState: null, toState: null },
            );
            await store.transition(node.uuid, {
              from: ['enroll'],
              to: 'inspect_wait',
              target: 'manageable',
              keepAgentToken: false,
              event: { kind: 'provision', message: 'waiting', actor: 'test', fromState: 'enroll', toState: 'inspect_wait' },
            });
          }),
        );
      }
      let retries = 0;
      const refusals = new Map<string, number>();
      const retrying = async <T>(call: () => Promise<T>): Promise<T> => {
        for (let attempt = 1; ; attempt++) {
          try {
            return await call();
          } catch (error) {
            const code = error instanceof ClientError ? error.code : undefined;
            if (attempt >= 30 || (code !== Status.UNAVAILABLE && code !== Status.RESOURCE_EXHAUSTED)) throw error;
            retries++;
            const key = `${Status[code]}: ${(error as ClientError).details.slice(0, 60)}`;
            refusals.set(key, (refusals.get(key) ?? 0) + 1);
            await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 50 * 2 ** attempt) * (0.5 + Math.random())));
          }
        }
      };
      const startedAt = Date.now();
      const results = await Promise.allSettled(
        macs.map(async (mac, i) => {
          const gateway = createClient(AgentGatewayServiceDefinition, channels[i % channels.length] as Channel);
          const found = await retrying(() => lookup(gateway, [mac]));
          await retrying(async () => {
            const stream = openHeartbeat(gateway, found.nodeUuid, found.agentToken);
            const beat = await stream.beat({}, 60_000).then(
              () => undefined,
              (error: unknown) => error,
            );
            stream.end();
            const ended = await stream.ended;
            // The beat's own failure first; then whatever ended the stream.
            if (beat !== undefined) throw beat;
            if (ended) throw ended;
          });
        }),
      );
      const tookMs = Date.now() - startedAt;
      const failed = results.filter((r) => r.status === 'rejected');
      console.log(
        `connect storm: ${AGENTS - failed.length}/${AGENTS} agents looked up and heartbeat in ${tookMs} ms on a pool of ${POOL_SIZE} (retries: ${retries}${refusals.size ? `; ${[...refusals].map(([k, n]) => `${n}x ${k}`).join('; ')}` : ''})`,
      );
      assert.equal(
        failed.length,
        0,
        failed
          .slice(0, 3)
          .map((r) => String((r as PromiseRejectedResult).reason))
          .join('\n'),
      );
    });
  });
});
