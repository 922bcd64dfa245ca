import { spawn } from 'node:child_process';
import pg from 'pg';
import { agentApiToken } from '../../common/agent-credentials.js';
import { SqliteStore } from '../../controller/store/sqlite.js';
import type { Store } from '../../controller/store/store.js';
import { generateAgentToken, hashAgentToken } from '../../controller/agents/agent-tokens.js';

import { REPO, METALCAST, POSTGRES_STORE_MODULE, CREATE_CONCURRENCY } from './settings.js';
import { cleanEnv } from './fleet.js';

// ---------------------------------------------------------------------------
// Nodes, through the Store.

export function openSqliteStore(path: string): Store {
  return SqliteStore.open(path);
}

export async function openPostgresStore(url: string): Promise<Store> {
  const module = (await import(POSTGRES_STORE_MODULE)) as { PostgresStore: { open(url: string): Store | Promise<Store> } };
  return await module.PostgresStore.open(url);
}

/** Creates nodes until `nodes` holds `count`, each in inspecting with a token we know; the store is closed again before the controller opens it. */
export async function ensureNodes(
  open: () => Promise<Store>,
  nodes: { uuid: string; token: string }[],
  count: number,
): Promise<{ count: number; ms: number }> {
  const from = nodes.length;
  if (from >= count) return { count: 0, ms: 0 };
  const store = await open();
  const started = performance.now();
  try {
    let next = from;
    const one = async (i: number) => {
      const node = await store.createNode(
        { name: `hb-${String(i).padStart(6, '0')}`, macAddresses: [macOf(i)], properties: {} },
        { kind: 'created', message: 'bench heartbeats', actor: 'bench', fromState: null, toState: 'enroll' },
      );
      const moved = await store.transition(node.uuid, {
        from: ['enroll'],
        to: 'inspecting',
        target: 'manageable',
        keepAgentToken: true,
        event: {
          kind: 'transition',
          message: 'bench heartbeats: an agent state the conductor only reads',
          actor: 'bench',
          fromState: 'enroll',
          toState: 'inspecting',
        },
      });
      if (!moved) throw new Error(`node ${node.uuid} did not move to inspecting`);
      const token = generateAgentToken();
      await store.setAgentToken(node.uuid, hashAgentToken(token), agentApiToken(token));
      nodes[i] = { uuid: node.uuid, token };
    };
    await Promise.all(
      Array.from({ length: Math.min(CREATE_CONCURRENCY, count - from) }, async () => {
        while (next < count) await one(next++);
      }),
    );
  } finally {
    await store.close();
  }
  return { count: count - from, ms: performance.now() - started };
}

/** A locally administered MAC per node index: 02:00:01:xx:xx:xx. */
export function macOf(i: number): string {
  const hex = (n: number) => (n & 0xff).toString(16).padStart(2, '0');
  return `02:00:01:${hex(i >> 16)}:${hex(i >> 8)}:${hex(i)}`;
}

/** A fresh schema for one run, dropped at the end. */
export class PostgresSchema {
  private constructor(
    /** The server's URL without the schema, for administration. */
    readonly adminUrl: string,
    readonly schema: string,
    readonly url: string,
    readonly display: string,
  ) {}

  static async create(base: string): Promise<PostgresSchema> {
    const schema = `bench_heartbeats_${process.pid}_${Date.now()}`;
    await PostgresSchema.sql(base, `CREATE SCHEMA ${schema}`);
    // -c%20search_path%3D<schema>: spaces as %20, since some parsers do not read '+' as one.
    const url = `${base}${base.includes('?') ? '&' : '?'}options=${encodeURIComponent(`-c search_path=${schema}`)}`;
    return new PostgresSchema(base, schema, url, `${redact(base)} schema ${schema}`);
  }

  static async sql(url: string, text: string): Promise<void> {
    const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5000 });
    await client.connect();
    try {
      await client.query(text);
    } finally {
      await client.end();
    }
  }

  async drop(): Promise<void> {
    await PostgresSchema.sql(this.adminUrl, `DROP SCHEMA IF EXISTS ${this.schema} CASCADE`).catch((error: unknown) => {
      console.error(`  could not drop schema ${this.schema}: ${String(error)}`);
    });
  }
}

export function redact(url: string): string {
  return url.replace(/\/\/[^@/]*@/, '//***@');
}

/** Why PostgreSQL cannot be measured yet, or undefined when it can. */
export async function postgresProblem(url: string): Promise<string | undefined> {
  try {
    await import(POSTGRES_STORE_MODULE);
  } catch (error) {
    return `controller/store/postgres.ts cannot be loaded yet: ${String(error).split('\n')[0]}`;
  }
  const help = await new Promise<string>((resolve) => {
    const child = spawn(process.execPath, [METALCAST, 'controller', '--help'], {
      cwd: REPO,
      env: cleanEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let text = '';
    child.stdout.on('data', (chunk: Buffer) => {
      text += chunk.toString();
    });
    child.stderr.on('data', (chunk: Buffer) => {
      text += chunk.toString();
    });
    child.on('exit', () => resolve(text));
  });
  if (!/postgres/i.test(help)) return `'metalcast controller --help' does not mention postgres: --database postgres://... is not wired yet`;
  try {
    await PostgresSchema.sql(url, 'SELECT 1');
  } catch (error) {
    return `cannot reach ${redact(url)}: ${String(error)}`;
  }
  return undefined;
}
