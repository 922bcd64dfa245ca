import type { Pool, PoolClient } from 'pg';
import type { PostgresStore } from '../../controller/store/postgres.js';
import { eventually } from './controller.js';
import { deferred } from './deferred.js';
import { adminQuery } from './postgres.js';

/**
 * Holds the COMMIT of the next transaction `store` opens until `release` is
 * called: a writer whose transaction commits late. `atCommit` settles when
 * that transaction has done its work and waits to commit.
 */
export function holdNextCommit(store: PostgresStore): { atCommit: Promise<void>; release: () => void } {
  const pool = (store as unknown as { pool: Pool }).pool;
  const reached = deferred<void>();
  const gate = deferred<void>();
  const connect = pool.connect.bind(pool) as () => Promise<PoolClient>;
  (pool as { connect: unknown }).connect = async () => {
    (pool as { connect: unknown }).connect = connect;
    const client = await connect();
    const query = client.query.bind(client) as (...args: unknown[]) => Promise<unknown>;
    (client as { query: unknown }).query = async (...args: unknown[]) => {
      if (args[0] === 'COMMIT') {
        (client as { query: unknown }).query = query;
        reached.resolve();
        await gate.promise;
      }
      return query(...args);
    };
    return client;
  };
  return { atCommit: reached.promise, release: () => gate.resolve() };
}

/**
 * Settles when `work` has settled or some statement on the database whose
 * text contains `statementLike` waits for a lock, whichever comes first:
 * the second of two racing writers either got through or is held, and the
 * test goes on from there without sleeping.
 */
export async function settledOrWaitingForLock(url: string, work: Promise<unknown>, statementLike: string): Promise<'settled' | 'waiting'> {
  const settled = work.then(
    () => 'settled' as const,
    () => 'settled' as const,
  );
  let done = false;
  void settled.then(() => {
    done = true;
  });
  const waiting = eventually(
    async () => {
      if (done) return 'settled' as const;
      const rows = await adminQuery(
        url,
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND position($1 in query) > 0",
        [statementLike],
      );
      return (rows[0]?.n as number) > 0 ? ('waiting' as const) : undefined;
    },
    { timeoutMs: 10_000, intervalMs: 20, what: `the second writer to finish or wait for a lock (${statementLike})` },
  );
  return Promise.race([settled, waiting]);
}
