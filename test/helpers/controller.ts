import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createChannel, createClient, type Channel } from 'nice-grpc';
import { clientChannelOptions } from '../../common/grpc-options.js';
import { createLogger, type Logger } from '../../common/logging.js';
import { tlsClient } from '../../common/tls.js';
import { type ControllerConfig, loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import type { OperatorRole, Store } from '../../controller/store/store.js';
import { newOperatorToken, operatorMetadata } from '../../controller/auth/operator-auth.js';
import { AgentGatewayServiceDefinition } from '../../gen/metalcast/v1/agent_gateway.js';
import { ImageServiceDefinition } from '../../gen/metalcast/v1/image.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';

/** A fresh temporary directory, removed by the returned function. */
export function tempDir(prefix = 'metalcast-test-'): { path: string; remove: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** A logger for tests: silent unless METALCAST_TEST_LOG=debug (or another level) is set. */
export function testLogger(): Logger {
  return createLogger({ name: 'test', level: (process.env.METALCAST_TEST_LOG as 'debug') ?? 'silent', destination: process.stderr });
}

export interface TestController {
  controller: RunningController;
  config: ControllerConfig;
  dataDir: string;
  channel: Channel;
  /** NodeService and ImageService clients that present `adminToken`. */
  nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;
  images: ReturnType<typeof createClient<typeof ImageServiceDefinition>>;
  gateway: ReturnType<typeof createClient<typeof AgentGatewayServiceDefinition>>;
  /** An admin operator token the helper made through the store after start ('' with operatorAuth: 'none'). */
  adminToken: string;
  /** Default call options that present `adminToken`, for operator clients a test makes: createClient(def, t.channel, t.operatorOptions). */
  operatorOptions: OperatorCallOptions;
  /** Stops the controller (keeping its data) and closes the clients. */
  stop(): Promise<void>;
  /** Starts a new controller on the same data directory (and the same port when possible). */
  restart(flags?: Record<string, string>): Promise<TestController>;
  /** Stops and removes the data directory. */
  destroy(): Promise<void>;
}

/**
 * Starts a real controller in this process on 127.0.0.1:0 with a real SQLite
 * file in a temporary directory. Flags are the same as the command line's
 * (camelCase keys), for example { heartbeatTimeout: '2s' }. It serves
 * plaintext (insecure) unless the flags give tlsCert and tlsKey; then
 * `tls.caPem` is what the helper's own clients verify it with.
 */
export async function startTestController(
  flags: Record<string, string> = {},
  existingDataDir?: string,
  tls?: { caPem: string },
): Promise<TestController> {
  const dir = existingDataDir ?? tempDir().path;
  const config = loadControllerConfig(
    {
      listen: '127.0.0.1:0',
      metricsListen: '127.0.0.1:0',
      dataDir: dir,
      controllerId: 'test-controller',
      ...(flags.tlsCert ? {} : { insecure: 'true' }),
      ...flags,
    },
    {},
  );
  const controller = await startController(config, testLogger());
  const adminToken = config.operatorAuth === 'none' ? '' : await createTestOperatorToken(controller.store, 'admin');
  const operatorOptions = operatorCallOptions(adminToken);
  const client = tls && tlsClient(controller.grpcAddress, { caPem: tls.caPem });
  const channel = createChannel(controller.grpcAddress, client?.credentials, {
    ...clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }),
    ...client?.channelOptions,
  });
  const handle: TestController = {
    controller,
    config,
    dataDir: dir,
    channel,
    nodes: createClient(NodeServiceDefinition, channel, operatorOptions),
    images: createClient(ImageServiceDefinition, channel, operatorOptions),
    gateway: createClient(AgentGatewayServiceDefinition, channel),
    adminToken,
    operatorOptions,
    async stop() {
      channel.close();
      await controller.stop();
    },
    async restart(more = {}) {
      await handle.stop();
      return startTestController({ ...flags, ...more }, dir, tls);
    },
    async destroy() {
      await handle.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return handle;
}

/** Default call options of an operator client: every call presents `token` ('' presents nothing). */
export type OperatorCallOptions = { '*': { metadata?: ReturnType<typeof operatorMetadata> } };

export function operatorCallOptions(token: string): OperatorCallOptions {
  return { '*': token === '' ? {} : { metadata: operatorMetadata(token) } };
}

/** Makes an operator token straight in the store, as `metalcast token create` does; returns the token. */
export async function createTestOperatorToken(store: Store, role: OperatorRole, description = `test ${role}`): Promise<string> {
  const { token, record } = newOperatorToken(role, description);
  await store.createOperatorToken(record);
  return token;
}

/**
 * Short timeouts for tests that exercise heartbeats, the sweep and keepalive:
 * an agent is given up on after 2 s, the sweep looks every 200 ms, and a
 * silent connection is dropped within about a second.
 */
export const FAST_FLAGS: Readonly<Record<string, string>> = {
  heartbeatTimeout: '2s',
  heartbeatIntervalMin: '200ms',
  heartbeatIntervalMax: '400ms',
  sweepInterval: '200ms',
  startupGrace: '0s',
  heartbeatFlushInterval: '50ms',
  keepaliveTime: '500ms',
  keepaliveTimeout: '500ms',
};

/** Scrapes the controller's /metrics as text. */
export async function scrapeMetrics(controller: RunningController): Promise<string> {
  const response = await fetch(`http://${controller.httpAddress}/metrics`);
  if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
  return response.text();
}

/** The value of one sample in Prometheus text, or undefined. Labels match exactly as written. */
export function metricValue(text: string, sample: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith(`${sample} `)) return Number(line.slice(sample.length + 1));
  }
  return undefined;
}

/** Polls `check` until it returns a truthy value or the time runs out. */
export async function eventually<T>(
  check: () => Promise<T | undefined | null | false> | T | undefined | null | false,
  options: { timeoutMs?: number; intervalMs?: number; what?: string } = {},
): Promise<T> {
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  let lastError: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value) return value as T;
    } catch (error) {
      lastError = error;
    }
    await new Promise((r) => setTimeout(r, options.intervalMs ?? 50));
  }
  throw new Error(`timed out waiting for ${options.what ?? 'condition'}${lastError ? `: ${(lastError as Error).message}` : ''}`);
}
