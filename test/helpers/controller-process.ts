import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Channel, createChannel, createClient } from 'nice-grpc';
import { onJsonLogLines } from '../../demo/processes.js';
import { tlsClient } from '../../common/tls.js';
import { loadDatabaseConfig } from '../../controller/config.js';
import { openStore } from '../../controller/controller.js';
import { ADMIN_TOKEN_FILE } from '../../controller/auth/operator-auth.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { createTestOperatorToken, type OperatorCallOptions, operatorCallOptions, testLogger } from './controller.js';

const METALCAST = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));

export interface ControllerProcess {
  child: ChildProcess;
  grpcAddress: string;
  httpAddress: string;
  logs: Record<string, unknown>[];
  channel: Channel;
  /** NodeService client that presents `adminToken`. */
  nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;
  /** An admin operator token: the one the controller wrote to <data-dir>/admin.token, else one made through the database ('' with operator-auth none). */
  adminToken: string;
  /** Default call options that present `adminToken`, for operator clients a test makes. */
  operatorOptions: OperatorCallOptions;
  exited: Promise<number | string>;
  /** Sends a signal (SIGKILL by default: a crash) and waits for the exit. */
  kill(signal?: NodeJS.Signals): Promise<number | string>;
}

/**
 * Starts a real `metalcast controller` process, for tests that crash it
 * (kill -9) or restart it. Resolves once it logged "controller started";
 * flags are the command line's (kebab-case).
 */
export async function spawnController(
  flags: Record<string, string>,
  timeoutMs = 20_000,
  tls?: { caPem: string },
): Promise<ControllerProcess> {
  // Plaintext unless the flags give TLS files; then `tls.caPem` is what the helper's clients verify the controller with.
  const all = {
    listen: '127.0.0.1:0',
    'metrics-listen': '127.0.0.1:0',
    'controller-id': 'test-controller',
    ...(flags['tls-cert'] ? {} : { insecure: 'true' }),
    ...flags,
  };
  const child = spawn(process.execPath, [METALCAST, 'controller', ...Object.entries(all).flatMap(([k, v]) => [`--${k}`, v])], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Record<string, unknown>[] = [];
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  const exited = once(child, 'exit').then(([code, signal]) => (code ?? signal) as number | string);
  const started = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`controller did not start within ${timeoutMs}ms: ${stderr}`)), timeoutMs);
    onJsonLogLines(child.stdout, (line) => {
      logs.push(line);
      if (line.msg === 'controller started') {
        clearTimeout(timer);
        resolve(line);
      }
    });
    exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`controller exited (${code}) before it started: ${stderr}`));
    });
  });
  const grpcAddress = started.grpc as string;
  const adminToken = await adminTokenFor(all);
  const operatorOptions = operatorCallOptions(adminToken);
  const client = tls && tlsClient(grpcAddress, { caPem: tls.caPem });
  const channel = createChannel(grpcAddress, client?.credentials, client?.channelOptions);
  return {
    child,
    grpcAddress,
    httpAddress: started.http as string,
    logs,
    channel,
    nodes: createClient(NodeServiceDefinition, channel, operatorOptions),
    adminToken,
    operatorOptions,
    exited,
    async kill(signal = 'SIGKILL') {
      channel.close();
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/**
 * An admin token for a spawned controller: the first start wrote one to
 * <data-dir>/admin.token; a controller that joined a database where tokens
 * existed wrote none, so one is made through the database.
 */
async function adminTokenFor(flags: Record<string, string>): Promise<string> {
  if (flags['operator-auth'] === 'none') return '';
  const config = loadDatabaseConfig({ dataDir: flags['data-dir'], database: flags.database }, {});
  try {
    return readFileSync(join(config.dataDir, ADMIN_TOKEN_FILE), 'utf8').trim();
  } catch {
    const store = await openStore(config, testLogger());
    try {
      return await createTestOperatorToken(store, 'admin', 'test spawnController');
    } finally {
      await store.close();
    }
  }
}

/** A free TCP port on 127.0.0.1, so that a restarted controller can take the same one. */
export async function freePort(): Promise<number> {
  const { createServer } = await import('node:net');
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
