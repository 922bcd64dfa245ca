import { randomBytes } from 'node:crypto';
import { Client, escapeIdentifier } from 'pg';
import { maskPassword } from '../../controller/store/postgres.js';

/** Where the PostgreSQL tests connect unless METALCAST_TEST_DATABASE_URL says otherwise. */
export const DEFAULT_TEST_DATABASE_URL = 'postgres://postgres@127.0.0.1:5432/test';

/** How the PostgreSQL of the development VM and of CI is started. */
export const START_POSTGRES = 'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start';

/**
 * Whether PostgreSQL tests can run: the database URL, or why they are
 * skipped. Pass `skip` to node:test as is, so a file reads
 *
 *     const pg = await requirePostgres();
 *     describe('my PostgreSQL tests', { skip: pg.skip }, () => { ... pg.url! ... });
 */
export type PostgresTarget = { url: string; skip: false } | { url: undefined; skip: string };

let probe: Promise<PostgresTarget> | undefined;

/**
 * Connects once (per process) to METALCAST_TEST_DATABASE_URL, default
 * {@link DEFAULT_TEST_DATABASE_URL}. When nothing answers, tests are skipped
 * with a message saying how to run them, except under CI=true, where this
 * throws: CI must not pass by skipping the PostgreSQL tests.
 */
export function requirePostgres(env: NodeJS.ProcessEnv = process.env): Promise<PostgresTarget> {
  probe ??= probePostgres(env);
  return probe;
}

async function probePostgres(env: NodeJS.ProcessEnv): Promise<PostgresTarget> {
  const url = env.METALCAST_TEST_DATABASE_URL || DEFAULT_TEST_DATABASE_URL;
  const client = new Client({ connectionString: url, connectionTimeoutMillis: 5000 });
  client.on('error', () => {});
  try {
    await client.connect();
    await client.query('SELECT 1');
    return { url, skip: false };
  } catch (error) {
    const reason = describe(error);
    if (env.CI === 'true') {
      throw new Error(
        `PostgreSQL is required in CI (CI=true) but ${maskPassword(url)} does not answer (${reason}). ` +
          `Start it before the tests with: ${START_POSTGRES}, or set METALCAST_TEST_DATABASE_URL to a server that runs.`,
        { cause: error },
      );
    }
    return {
      url: undefined,
      skip:
        `PostgreSQL at ${maskPassword(url)} does not answer (${reason}); to run these tests start it (${START_POSTGRES}) ` +
        'or set METALCAST_TEST_DATABASE_URL=postgres://user:password@host:5432/database',
    };
  } finally {
    await client.end().catch(() => {});
  }
}

/** For `describe(name, { skip: await postgresSkipReason() }, ...)`: undefined when PostgreSQL answers (throws under CI=true when it does not). */
export async function postgresSkipReason(): Promise<string | undefined> {
  const target = await requirePostgres();
  return target.skip || undefined;
}

/** A fresh schema on the test database (see {@link withPostgresSchema}); only inside a suite that {@link postgresSkipReason} let run. */
export async function postgresSchema(options: TestSchemaOptions = {}): Promise<TestSchema> {
  const target = await requirePostgres();
  if (target.url === undefined) throw new Error(target.skip);
  return withPostgresSchema(target.url, options);
}

function describe(error: unknown): string {
  if (error instanceof AggregateError) return error.errors.map(describe).join(', ');
  if (error instanceof Error) return error.message || String((error as { code?: unknown }).code);
  return String(error);
}

/** A schema of its own for one test, and the URL that selects it. */
export interface TestSchema {
  /** The base URL with `options=-c search_path=<schema>`: what PostgresStore.open takes. */
  url: string;
  schema: string;
  /** Drops the schema and everything in it; call after closing the stores on it. */
  drop(): Promise<void>;
}

export interface TestSchemaOptions {
  /** Create the schema (default); false makes only the name and URL, so that the store creates it as on a fresh database. */
  create?: boolean;
  /** The start of the name, default `mc_test`; a pid and random hex follow. */
  prefix?: string;
}

/** A uniquely named schema on the test database: create it, use its URL, drop it. */
export async function withPostgresSchema(baseUrl: string, options: TestSchemaOptions = {}): Promise<TestSchema> {
  const schema = `${options.prefix ?? 'mc_test'}_${process.pid}_${randomBytes(4).toString('hex')}`;
  if (options.create ?? true) await adminQuery(baseUrl, `CREATE SCHEMA ${escapeIdentifier(schema)}`);
  return {
    url: urlWithSearchPath(baseUrl, schema),
    schema,
    drop: async () => {
      await adminQuery(baseUrl, `DROP SCHEMA IF EXISTS ${escapeIdentifier(schema)} CASCADE`);
    },
  };
}

/** `baseUrl` with the libpq `options` parameter setting search_path (added to options already there). */
export function urlWithSearchPath(baseUrl: string, schema: string): string {
  const url = new URL(baseUrl);
  const options = [url.searchParams.get('options'), `-c search_path=${schema}`].filter(Boolean).join(' ');
  url.searchParams.delete('options');
  const rest = url.searchParams.toString();
  url.search = `${rest ? `${rest}&` : ''}options=${encodeURIComponent(options)}`;
  return url.toString();
}

/** Runs one statement on a short-lived connection of its own (not through any store). */
export async function adminQuery(url: string, sql: string, values: unknown[] = []): Promise<Record<string, unknown>[]> {
  const client = new Client({ connectionString: url });
  client.on('error', () => {});
  await client.connect();
  try {
    return (await client.query(sql, values)).rows;
  } finally {
    await client.end();
  }
}
