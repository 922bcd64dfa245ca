/**
 * The agent-start benchmark: how long the packaged agent takes from its
 * process being spawned to its first lookup being answered by a real
 * controller, which is what a PXE-booted ramdisk waits for before the
 * controller knows the machine is there.
 *
 * The controller runs in this process (SQLite in a temporary folder); its
 * log line "agent looked up its node" is taken, with performance.now(), as
 * it is written, right before the answer is sent. Each run gets a fresh fake
 * machine and a node waiting for it in inspect wait (in maintenance, so that
 * the controller does not go on to inspect it); the agent is killed once it
 * looked up. Everything speaks TLS, as in production: each agent start
 * includes making its key and self-signed certificate. The artifacts are copied to an empty folder and run from there,
 * with no node_modules anywhere above.
 *
 * Cases, interleaved run by run because these machines are noisy:
 * - bundle: node dist/agent/metalcast-agent.mjs (npm run package:agent);
 * - sea: the single executable dist/agent/metalcast-agent, where it was built;
 * - tsx: the same agent from the sources, `node bin/metalcast.js agent`;
 * - node -e 0: a bare Node.js start to exit, the floor under every case.
 * Page caches are warm (the first, unmeasured runs warm them): this is the
 * start of a process, not of a machine reading its ramdisk.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createChannel, createClient } from 'nice-grpc';
import { clientChannelOptions } from '../common/grpc-options.js';
import { createLogger } from '../common/logging.js';
import { loadControllerConfig } from '../controller/config.js';
import { startController } from '../controller/controller.js';
import { operatorMetadata } from '../controller/auth/operator-auth.js';
import { readTokenFile } from '../cli/client.js';
import { tlsInit } from '../common/tls-init.js';
import { tlsClient } from '../common/tls.js';
import { uniqueFakeMachine } from '../demo/fake-machine.js';
import { NodeServiceDefinition, ProvisionAction } from '../gen/metalcast/v1/node.js';
import { packageVersion, REPO_ROOT } from '../scripts/build.js';
import { AGENT_ARTIFACT_DIR, AGENT_BUNDLE_NAME, AGENT_SEA_NAME, formatBytes, packageAgent } from '../scripts/package-agent.js';
import {
  type BenchCheck,
  type BenchResult,
  breathe,
  columns,
  formatMs,
  formatRatio,
  type NumberOptions,
  parseNumberOptions,
  summarize,
  withTempDir,
} from './harness.js';

export const description = 'cold start of the packaged agent to its first lookup at a real controller, against tsx and a bare node -e 0';

export const options = {
  runs: { default: 15, integer: true, description: 'measured runs per case, interleaved across cases' },
  warmup: { default: 2, integer: true, description: 'unmeasured runs per case before those' },
} satisfies NumberOptions;

const METALCAST = fileURLToPath(new URL('../bin/metalcast.js', import.meta.url));
const RUN_TIMEOUT_MS = 30_000;

/** Where a lookup answer is awaited: node uuid -> resolve(time answered, agent version). */
type LookupWaiters = Map<string, (at: number, agentVersion: string) => void>;

interface Case {
  key: string;
  label: string;
  /** Command and arguments; agent cases get the agent flags appended. */
  command: string[];
  agent: boolean;
  samples: number[];
  rssBytes: number[];
  versions: Set<string>;
}

export async function run(args: string[]): Promise<BenchResult> {
  const o = parseNumberOptions(args, options);
  const artifacts = await ensureArtifacts();
  return withTempDir('metalcast-bench-agent-start-', async (dir) => {
    const bare = join(dir, 'bare');
    mkdirSync(bare);
    copyFileSync(artifacts.bundle, join(bare, AGENT_BUNDLE_NAME));
    if (artifacts.sea) copyFileSync(artifacts.sea, join(bare, AGENT_SEA_NAME));

    const waiters: LookupWaiters = new Map();
    const logger = createLogger({
      name: 'bench-controller',
      level: 'info',
      destination: {
        write(line: string) {
          if (!line.includes('agent looked up its node')) return;
          const at = performance.now();
          const entry = JSON.parse(line) as { node: string; agentVersion: string };
          waiters.get(entry.node)?.(at, entry.agentVersion);
        },
      },
    });
    const pki = await tlsInit({ dir: join(dir, 'tls'), hosts: ['127.0.0.1'], days: 1 });
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dir, 'controller'),
        controllerId: 'bench',
        logLevel: 'info',
        tlsCert: pki.controller,
        tlsKey: pki.controllerKey,
      },
      {},
    );
    const controller = await startController(config, logger);
    const secure = tlsClient(controller.grpcAddress, { caPem: readFileSync(pki.ca, 'utf8') });
    const channel = createChannel(controller.grpcAddress, secure.credentials, {
      ...clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }),
      ...secure.channelOptions,
    });
    // The controller's first start wrote an admin operator token beside its database.
    const adminToken = readTokenFile(join(dir, 'controller', 'admin.token')) ?? '';
    const nodes = createClient(NodeServiceDefinition, channel, { '*': { metadata: operatorMetadata(adminToken) } });
    try {
      const cases: Case[] = [
        newCase('node', 'node -e 0 (bare Node.js start to exit)', [process.execPath, '-e', '0'], false),
        newCase('bundle', `bundle: node ${AGENT_BUNDLE_NAME}`, [process.execPath, join(bare, AGENT_BUNDLE_NAME)], true),
        ...(artifacts.sea ? [newCase('sea', `single executable: ./${AGENT_SEA_NAME}`, [join(bare, AGENT_SEA_NAME)], true)] : []),
        newCase('tsx', 'sources through tsx: node bin/metalcast.js agent', [process.execPath, METALCAST, 'agent'], true),
      ];
      console.log(
        `agent-start: spawn to first lookup answered, ${o.runs} runs per case after ${o.warmup} warm-up, Node ${process.version}, controller in this process`,
      );
      console.log(
        `  bundle ${formatBytes(artifacts.bundleBytes)}` +
          (artifacts.sea ? `, single executable ${formatBytes(artifacts.seaBytes)}` : `, no single executable: ${artifacts.seaSkipped}`),
      );

      let machineIndex = 0;
      const runOnce = async (c: Case, measured: boolean) => {
        if (!c.agent) {
          const started = performance.now();
          const child = spawn(c.command[0] as string, c.command.slice(1), { stdio: 'ignore' });
          const [code] = await once(child, 'exit');
          if (code !== 0) throw new Error(`${c.label} exited ${code}`);
          if (measured) c.samples.push(performance.now() - started);
          return;
        }
        machineIndex += 1;
        const result = await agentRun(c, join(dir, `m${machineIndex}`), machineIndex, bare, controller.grpcAddress, nodes, waiters, pki.ca);
        if (measured) {
          c.samples.push(result.ms);
          if (result.rssBytes > 0) c.rssBytes.push(result.rssBytes);
        }
        c.versions.add(result.agentVersion);
      };
      for (let i = 0; i < o.warmup; i++) for (const c of cases) await runOnce(c, false);
      for (let i = 0; i < o.runs; i++) {
        // Rotate the order, so that no case always runs right after the same other one.
        for (let j = 0; j < cases.length; j++) await runOnce(cases[(i + j) % cases.length] as Case, true);
        await breathe();
      }

      const byKey = Object.fromEntries(cases.map((c) => [c.key, { ...c, t: summarize(c.samples) }]));
      const node = byKey.node!.t.median;
      const bundle = byKey.bundle!.t.median;
      const rows = [
        ['case', 'median', 'p90', 'min', 'max', '× node -e 0', 'RSS at lookup'],
        ...Object.values(byKey).map((c) => [
          c.label,
          formatMs(c.t.median),
          formatMs(c.t.p90),
          formatMs(c.t.min),
          formatMs(c.t.max),
          formatRatio(c.t.median / node),
          c.rssBytes.length > 0 ? formatBytes(summarize(c.rssBytes).median) : '',
        ]),
      ];
      console.log('');
      for (const line of columns(rows, [false, true, true, true, true, true, true])) console.log(`  ${line}`);
      const tsx = byKey.tsx!.t.median;
      console.log(`\n  the bundle starts ${formatRatio(tsx / bundle)} faster than the sources through tsx`);
      if (byKey.sea) console.log(`  the single executable takes ${formatRatio(byKey.sea.t.median / bundle)} the bundle's time`);

      const version = packageVersion();
      const checks: BenchCheck[] = [
        {
          name: 'the bundle reports the package version without a package.json beside it',
          ok: [...byKey.bundle!.versions].every((v) => v === version),
          detail: `versions seen: ${[...byKey.bundle!.versions].join(', ')}; package.json: ${version}`,
        },
      ];
      if (byKey.sea) {
        checks.push({
          name: 'the single executable reports the package version',
          ok: [...byKey.sea.versions].every((v) => v === version),
          detail: `versions seen: ${[...byKey.sea.versions].join(', ')}`,
        });
      }
      const metrics: Record<string, number> = {
        bundle_bytes: artifacts.bundleBytes,
        node_e0_ms: round(node),
        bundle_ms: round(bundle),
        tsx_ms: round(tsx),
        bundle_over_node_ratio: round(bundle / node),
        tsx_over_bundle_ratio: round(tsx / bundle),
      };
      const bundleRss = byKey.bundle!.rssBytes;
      if (bundleRss.length > 0) metrics.bundle_rss_bytes = summarize(bundleRss).median;
      if (byKey.sea) {
        metrics.sea_bytes = artifacts.seaBytes;
        metrics.sea_ms = round(byKey.sea.t.median);
        metrics.sea_over_bundle_ratio = round(byKey.sea.t.median / bundle);
      }
      return {
        headline:
          `bundle ${formatBytes(artifacts.bundleBytes)}: ${formatMs(bundle)} to first lookup (${formatRatio(bundle / node)} node -e 0, ` +
          `tsx ${formatRatio(tsx / bundle)} slower)` +
          (byKey.sea ? `; single executable ${formatBytes(artifacts.seaBytes)}: ${formatMs(byKey.sea.t.median)}` : ''),
        metrics,
        checks,
      };
    } finally {
      channel.close();
      await controller.stop();
    }
  });
}

function newCase(key: string, label: string, command: string[], agent: boolean): Case {
  return { key, label, command, agent, samples: [], rssBytes: [], versions: new Set() };
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}

/** One agent start: a fresh machine and a node waiting for it; spawn to lookup answered. */
async function agentRun(
  c: Case,
  machineDir: string,
  index: number,
  cwd: string,
  controller: string,
  nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>,
  waiters: LookupWaiters,
  ca: string,
): Promise<{ ms: number; rssBytes: number; agentVersion: string }> {
  const machine = await uniqueFakeMachine(machineDir, index);
  const created = await nodes.createNode({ name: `start-${c.key}-${index}`, macAddresses: [machine.macs[0] as string] });
  const uuid = created.node!.uuid;
  await nodes.setProvisionState({ node: uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
  await nodes.setProvisionState({ node: uuid, action: ProvisionAction.PROVISION_ACTION_INSPECT });
  await nodes.setMaintenance({ node: uuid, enabled: true, reason: 'benchmark: hold in inspect wait' });

  const flags = {
    controller,
    ca,
    root: machine.root,
    listen: '127.0.0.1:0',
    'log-level': 'info',
    'power-driver': 'recording',
    'power-record-file': join(machine.root, 'power-actions.log'),
  };
  const answered = new Promise<{ at: number; agentVersion: string }>((resolve) => {
    waiters.set(uuid, (at, agentVersion) => resolve({ at, agentVersion }));
  });
  let child: ChildProcess | undefined;
  try {
    const args = [...c.command.slice(1), ...Object.entries(flags).flatMap(([k, v]) => [`--${k}`, v])];
    const env = { PATH: process.env.PATH ?? '/usr/bin:/bin' };
    const started = performance.now();
    child = spawn(c.command[0] as string, args, { cwd, env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-2000);
    });
    const exited = once(child, 'exit').then(([code]) => {
      throw new Error(`${c.label} exited (${code}) before its lookup: ${stderr}`);
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${c.label}: no lookup within ${RUN_TIMEOUT_MS} ms: ${stderr}`)), RUN_TIMEOUT_MS);
    });
    try {
      const { at, agentVersion } = await Promise.race([answered, exited, timeout]);
      return { ms: at - started, rssBytes: rssOf(child.pid), agentVersion };
    } finally {
      clearTimeout(timer);
      exited.catch(() => {});
    }
  } finally {
    waiters.delete(uuid);
    if (child && child.exitCode === null && child.signalCode === null) {
      const gone = once(child, 'exit');
      child.kill('SIGKILL');
      await gone;
    }
  }
}

/** Resident memory of a process from /proc, or 0 where there is no /proc. */
function rssOf(pid: number | undefined): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kib = /^VmRSS:\s+(\d+) kB/m.exec(status)?.[1];
    return kib ? Number(kib) * 1024 : 0;
  } catch {
    return 0;
  }
}

/**
 * The artifacts of npm run package:agent, built first when they are missing
 * or older than the sources they come from.
 */
async function ensureArtifacts(): Promise<{
  bundle: string;
  bundleBytes: number;
  sea?: string;
  seaBytes: number;
  seaSkipped?: string;
}> {
  const bundle = join(AGENT_ARTIFACT_DIR, AGENT_BUNDLE_NAME);
  const sea = join(AGENT_ARTIFACT_DIR, AGENT_SEA_NAME);
  const sources = newestMtime(['agent', 'cli', 'common', 'gen', 'package-lock.json'].map((p) => join(REPO_ROOT, p)));
  let seaSkipped: string | undefined;
  const stale = (path: string) => statSync(path).mtimeMs < sources;
  if (!existsSync(bundle) || stale(bundle) || (existsSync(sea) && stale(sea))) {
    console.log('agent-start: packaging the agent first (npm run package:agent) ...');
    const made = await packageAgent();
    seaSkipped = made.seaSkipped;
  }
  const hasSea = existsSync(sea);
  return {
    bundle,
    bundleBytes: statSync(bundle).size,
    sea: hasSea ? sea : undefined,
    seaBytes: hasSea ? statSync(sea).size : 0,
    seaSkipped: hasSea ? undefined : (seaSkipped ?? 'not built (npm run package:agent builds it where it can)'),
  };
}

function newestMtime(paths: string[]): number {
  let newest = 0;
  for (const path of paths) {
    const stat = statSync(path, { throwIfNoEntry: false });
    if (!stat) continue;
    if (stat.isDirectory()) {
      newest = Math.max(newest, newestMtime(readdirSync(path).map((entry) => join(path, entry))));
    } else {
      newest = Math.max(newest, stat.mtimeMs);
    }
  }
  return newest;
}
