import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { types } from 'pg';
import { MetalcastError } from '../../common/errors.js';
import { ringHash } from '../../controller/cluster/hash-ring.js';
import { PostgresStore, type StoreLogger } from '../../controller/store/postgres.js';
import { POSTGRES_MIGRATIONS } from '../../controller/store/postgres-migrations.js';
import { deferred } from '../helpers/deferred.js';
import { adminQuery, requirePostgres, type TestSchema, type TestSchemaOptions, withPostgresSchema } from '../helpers/postgres.js';
import { runStoreContract, within } from './store-contract.js';

const pg = await requirePostgres();

describe('PostgresStore', { skip: pg.skip }, () => {
  const baseUrl = pg.url as string;

  runStoreContract('PostgresStore', async () => {
    const schema = await withPostgresSchema(baseUrl);
    const store = await PostgresStore.open(schema.url);
    return {
      store,
      cleanup: async () => {
        await store.close();
        await schema.drop();
      },
    };
  });

  /** Stores and schemas a test opened, closed and dropped after it whatever happened. */
  const opened: PostgresStore[] = [];
  const schemas: TestSchema[] = [];
  const newSchema = async (options?: TestSchemaOptions) => {
    const schema = await withPostgresSchema(baseUrl, options);
    schemas.push(schema);
    return schema;
  };
  const open = async (url: string, logger?: StoreLogger) => {
    const store = await PostgresStore.open(url, { logger });
    opened.push(store);
    return store;
  };
  const cleanUp = async () => {
    await Promise.all(opened.splice(0).map((s) => s.close()));
    await Promise.all(schemas.splice(0).map((s) => s.drop()));
  };

  describe('schema and migrations', () => {
    after(cleanUp);

    it('creates a missing schema and migrates it once when five controllers open it at the same moment', async () => {
      const schema = await newSchema({ create: false });
      const results = await Promise.allSettled(Array.from({ length: 5 }, () => open(schema.url)));
      assert.deepEqual(
        results.map((r) => (r.status === 'rejected' ? String(r.reason) : 'ok')),
        ['ok', 'ok', 'ok', 'ok', 'ok'],
      );
      const versions = await adminQuery(
        schema.url,
        'SELECT version, count(*)::int AS n FROM schema_migrations GROUP BY version ORDER BY version',
      );
      assert.deepEqual(
        versions,
        POSTGRES_MIGRATIONS.map((m) => ({ version: m.version, n: 1 })),
      );
      assert.equal((opened[0] as PostgresStore).schema, schema.schema);
    });

    it('refuses a schema newer than the code, saying to upgrade the controller', async () => {
      const schema = await newSchema();
      await (await PostgresStore.open(schema.url)).close();
      await adminQuery(schema.url, "INSERT INTO schema_migrations (version, description, applied_at) VALUES (99, 'from the future', 0)");
      await assert.rejects(
        PostgresStore.open(schema.url),
        /schema .* is version 99, newer than this controller understands \(\d+\); upgrade the controller/,
      );
    });

    it('fills in the ring hash of the nodes a version 2 database already has', async () => {
      const schema = await newSchema();
      await adminQuery(
        schema.url,
        'CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)',
      );
      for (const migration of POSTGRES_MIGRATIONS.filter((m) => m.version <= 2)) {
        await adminQuery(schema.url, migration.sql);
        await adminQuery(schema.url, 'INSERT INTO schema_migrations VALUES ($1, $2, 0)', [migration.version, migration.description]);
      }
      // Twenty, so that some hashes have the top bit set (a signed 32-bit cast would show).
      const uuids = Array.from({ length: 20 }, () => randomUUID());
      for (const [i, uuid] of uuids.entries()) {
        await adminQuery(
          schema.url,
          "INSERT INTO nodes (uuid, name, provision_state, created_at, updated_at, provision_updated_at) VALUES ($1, $2, 'active', 0, 0, 0)",
          [uuid, `old-${i}`],
        );
      }
      await open(schema.url);
      const rows = await adminQuery(schema.url, 'SELECT uuid, ring_hash::text AS ring_hash FROM nodes');
      assert.deepEqual(
        Object.fromEntries(rows.map((r) => [r.uuid, Number(r.ring_hash)])),
        Object.fromEntries(uuids.map((uuid) => [uuid, ringHash(uuid)])),
      );
    });

    it('returns int8 columns as numbers without changing how other pg users parse them', async () => {
      const schema = await newSchema();
      const store = await open(schema.url);
      const node = await store.createNode(
        { name: 'n', macAddresses: ['aa:00:00:00:00:01'], properties: {} },
        { kind: 'created', message: 'enrolled', actor: 'test', fromState: null, toState: 'enroll' },
      );
      assert.equal(typeof node.createdAt, 'number');
      assert.equal(typeof (await store.listEvents(node.uuid, 0, 1))[0]?.id, 'number');
      assert.equal(types.getTypeParser(types.builtins.INT8)('5'), '5', 'the global parser is untouched');
    });
  });

  describe('errors that say what to fix', () => {
    it('rejects a URL that is not PostgreSQL, masking the password', async () => {
      await assert.rejects(PostgresStore.open('mysql://root:hunter2@db/metalcast'), (error: Error) => {
        assert.match(error.message, /'mysql:\/\/root:\*\*\*@db\/metalcast' is not a PostgreSQL URL; expected postgres:\/\//);
        assert.doesNotMatch(error.message, /hunter2/);
        return true;
      });
    });

    it('names the server that does not answer and how to fix it, masking the password', async () => {
      await assert.rejects(PostgresStore.open('postgres://metalcast:hunter2@127.0.0.1:1/metalcast'), (error: Error) => {
        assert.match(
          error.message,
          /^cannot connect to PostgreSQL at postgres:\/\/metalcast:\*\*\*@127\.0\.0\.1:1\/metalcast: .*start PostgreSQL/,
        );
        assert.doesNotMatch(error.message, /hunter2/);
        return true;
      });
    });

    it('says when the database does not exist', async () => {
      const url = new URL(baseUrl);
      url.pathname = '/metalcast_no_such_database';
      await assert.rejects(PostgresStore.open(url.toString()), /does not exist.*create it \(createdb\) or fix its name/);
    });

    it('maps a race on a name or MAC between two controllers to the same ALREADY_EXISTS as the check', async () => {
      const schema = await newSchema();
      const [a, b] = [await open(schema.url), await open(schema.url)];
      const created = { kind: 'created', message: 'enrolled', actor: 'test', fromState: null, toState: 'enroll' } as const;
      for (let i = 0; i < 5; i++) {
        const outcomes = await Promise.allSettled([
          a.createNode({ name: `race-${i}`, macAddresses: [`aa:00:00:00:10:${i}0`], properties: {} }, created),
          b.createNode({ name: `race-${i}`, macAddresses: [`aa:00:00:00:10:${i}1`], properties: {} }, created),
          a.createNode({ name: `mac-race-${i}-a`, macAddresses: [`aa:00:00:00:20:${i}0`], properties: {} }, created),
          b.createNode({ name: `mac-race-${i}-b`, macAddresses: [`aa:00:00:00:20:${i}0`], properties: {} }, created),
        ]);
        const messages = outcomes.map((o) => {
          if (o.status === 'fulfilled') return 'ok';
          assert.ok(o.reason instanceof MetalcastError, String(o.reason));
          assert.equal(Status[o.reason.status], 'ALREADY_EXISTS');
          return o.reason.message;
        });
        assert.deepEqual(messages.slice(0, 2).sort(), [`a node named 'race-${i}' already exists`, 'ok'].sort());
        const macLoser = messages.slice(2).find((m) => m !== 'ok');
        assert.equal(messages.slice(2).filter((m) => m === 'ok').length, 1);
        assert.match(macLoser ?? '', new RegExp(`^MAC address aa:00:00:00:20:${i}0 already belongs to node 'mac-race-${i}-[ab]'$`));
      }
    });
    after(cleanUp);
  });

  describe('notifications', () => {
    after(cleanUp);

    it('delivers between two stores on one schema, and not to a store on another schema', async () => {
      const shared = await newSchema();
      const elsewhere = await newSchema();
      const [a, b, c] = [await open(shared.url), await open(shared.url), await open(elsewhere.url)];
      const heardByA = deferred<string>();
      const heardByC: string[] = [];
      const cHeardItself = deferred();
      a.listen('node_due', (payload) => heardByA.resolve(payload));
      c.listen('node_due', (payload) => heardByC.push(payload));
      c.listen('membership', () => cHeardItself.resolve());
      await Promise.all([a.listening(), c.listening()]);

      await b.notify('node_due', 'from-b');
      assert.equal(await within(heardByA.promise, "a's delivery of b's notification"), 'from-b');
      // Notifications reach each listener in commit order: once c hears its own
      // later one, it would have heard b's already had it crossed schemas.
      await c.notify('membership', 'c');
      await within(cHeardItself.promise, "c's delivery of its own notification");
      assert.deepEqual(heardByC, []);
    });

    it('hashes a long schema name into a channel name PostgreSQL accepts', async () => {
      const schema = await newSchema({ prefix: 'mc_test_with_a_name_too_long_for_channels' });
      const store = await open(schema.url);
      assert.ok(Buffer.byteLength(`metalcast_${schema.schema}_image_ready`) > 63);
      const heard = deferred<string>();
      store.listen('image_ready', (payload) => heard.resolve(payload));
      await store.notify('image_ready', 'ubuntu');
      assert.equal(await within(heard.promise, 'delivery on a long schema'), 'ubuntu');
    });

    describe('when the listening connection is killed', () => {
      let schema: TestSchema;
      let listener: PostgresStore;
      let sender: PostgresStore;
      const logged: { level: string; message: string }[] = [];
      const reconnected = deferred();
      const logger: StoreLogger = {
        info: (_bindings, message) => {
          logged.push({ level: 'info', message });
          if (/listening for notifications again/.test(message)) reconnected.resolve();
        },
        warn: (_bindings, message) => logged.push({ level: 'warn', message }),
        error: (_bindings, message) => logged.push({ level: 'error', message }),
      };

      before(async () => {
        schema = await newSchema();
        listener = await open(schema.url, logger);
        sender = await open(schema.url);
      });

      it('reconnects, listens again, and hears later notifications', async () => {
        const heard: string[] = [];
        const first = deferred();
        const second = deferred();
        listener.listen('lock_released', (payload) => {
          heard.push(payload);
          (heard.length === 1 ? first : second).resolve();
        });
        await listener.listening();
        await sender.notify('lock_released', 'before');
        await within(first.promise, 'delivery before the kill');

        const backends = await adminQuery(baseUrl, 'SELECT pid FROM pg_stat_activity WHERE application_name = $1', [
          `metalcast listen ${schema.schema}`,
        ]);
        assert.equal(backends.length, 1, 'one listening connection per store');
        await adminQuery(baseUrl, 'SELECT pg_terminate_backend($1)', [backends[0]?.pid]);
        await within(reconnected.promise, 'the reconnect');

        await sender.notify('lock_released', 'after');
        await within(second.promise, 'delivery after the reconnect');
        assert.deepEqual(heard, ['before', 'after']);
        assert.ok(
          logged.some((l) => l.level === 'warn' && /lost the PostgreSQL connection that listens/.test(l.message)),
          JSON.stringify(logged),
        );
      });
    });
  });
});
