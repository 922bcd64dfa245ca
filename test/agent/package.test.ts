import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Worker } from 'node:worker_threads';
import { createChannel, createClient, Status } from 'nice-grpc';
import type { FromLane, LaneSetup, ToLane } from '../../agent/imaging/lanes/lane-protocol.js';
import { onJsonLogLines } from '../../demo/processes.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { build, packageVersion, REPO_ROOT } from '../../scripts/build.js';
import { type AgentArtifacts, bundleLaneWorker, packageAgent } from '../../scripts/package-agent.js';
import { createWaitingNode } from '../helpers/agent-client.js';
import { eventually, operatorCallOptions, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

/** Nothing from this checkout leaks into the artifacts' environment: no NODE_OPTIONS (tsx), no NODE_PATH. */
const BARE_ENV = { PATH: process.env.PATH ?? '/usr/bin:/bin' };

interface LoggedProcess {
  child: ChildProcess;
  logs: Record<string, unknown>[];
  stderr: () => string;
  exited: Promise<number | string>;
  waitForLog(text: string, timeoutMs?: number): Promise<Record<string, unknown>>;
}

/** Spawns a program that logs JSON lines on stdout, as the controller and the agent do. */
function spawnLogged(command: string, args: string[], cwd: string): LoggedProcess {
  const child = spawn(command, args, { cwd, env: BARE_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: Record<string, unknown>[] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  onJsonLogLines(child.stdout, (line) => {
    logs.push(line);
    for (const wake of waiters) wake();
  });
  const exited = once(child, 'exit').then(([code, signal]) => (code ?? signal) as number | string);
  const find = (text: string) => logs.find((line) => typeof line.msg === 'string' && line.msg.includes(text));
  return {
    child,
    logs,
    stderr: () => stderr,
    exited,
    waitForLog(text, timeoutMs = 20_000) {
      return new Promise((resolve, reject) => {
        const done = (error?: Error) => {
          clearTimeout(timer);
          waiters.delete(check);
          if (error) reject(error);
        };
        const check = () => {
          const line = find(text);
          if (line) {
            done();
            resolve(line);
          }
        };
        const timer = setTimeout(() => done(new Error(`'${text}' not logged within ${timeoutMs}ms; stderr: ${stderr}`)), timeoutMs);
        waiters.add(check);
        exited.then((code) => {
          if (waiters.has(check)) done(new Error(`exited (${code}) before logging '${text}'; stderr: ${stderr}`));
        });
        check();
      });
    },
  };
}

async function stop(proc: LoggedProcess): Promise<number | string> {
  if (proc.child.exitCode === null && proc.child.signalCode === null) proc.child.kill('SIGTERM');
  return proc.exited;
}

describe('npm run build', () => {
  it('compiles to dist/, and the compiled command runs on plain Node.js, the controller included', async () => {
    build();
    const dist = join(REPO_ROOT, 'dist');
    const help = execFileSync(process.execPath, [join(dist, 'cli', 'main.js'), '--help'], { env: BARE_ENV, encoding: 'utf8' });
    assert.match(help, /Usage: metalcast \[options\] \[command\]/);
    assert.match(help, /controller \[options\]/);
    assert.equal((JSON.parse(readFileSync(join(dist, 'package.json'), 'utf8')) as { version: string }).version, packageVersion());

    // The controller reads the descriptor set (gen/metalcast.binpb) beside its compiled module at start.
    const dir = tempDir('metalcast-build-');
    const controller = spawnLogged(
      process.execPath,
      [
        join(dist, 'bin', 'metalcast.js'),
        'controller',
        '--listen',
        '127.0.0.1:0',
        '--metrics-listen',
        '127.0.0.1:0',
        '--data-dir',
        dir.path,
        '--controller-id',
        'build-test',
        '--insecure',
      ],
      dir.path,
    );
    try {
      const started = await controller.waitForLog('controller started');
      const channel = createChannel(started.grpc as string);
      try {
        // The first start wrote an admin token beside its database (mode 0600).
        const adminToken = readFileSync(join(dir.path, 'admin.token'), 'utf8').trim();
        const nodes = createClient(NodeServiceDefinition, channel, operatorCallOptions(adminToken));
        const created = await nodes.createNode({ name: 'built-1', macAddresses: ['52:54:00:aa:bb:01'] });
        assert.equal(created.node?.name, 'built-1');
      } finally {
        channel.close();
      }
      assert.equal(await stop(controller), 0);
    } finally {
      controller.child.kill('SIGKILL');
      dir.remove();
    }
  });
});

describe('the agent artifact (npm run package:agent)', () => {
  const dirs = tempDir('metalcast-package-');
  /** A folder with the artifacts and nothing else: no node_modules here or above (it is under the system temp dir). */
  const bare = join(dirs.path, 'bare');
  let artifacts: AgentArtifacts;
  let t: TestController;
  let pki: TestPki;
  let machineIndex = 400;

  before(async () => {
    artifacts = await packageAgent({ outDir: join(dirs.path, 'out') });
    mkdirSync(bare);
    copyFileSync(artifacts.bundle.path, join(bare, 'metalcast-agent.mjs'));
    if (artifacts.sea) copyFileSync(artifacts.sea.path, join(bare, 'metalcast-agent'));
    // Over TLS, as in a ramdisk: the artifact must carry the certificate code (@peculiar/x509) and make its key at start.
    pki = await makeTestPki(dirs.path);
    t = await startTestController(
      { heartbeatIntervalMin: '300ms', heartbeatIntervalMax: '600ms', heartbeatFlushInterval: '50ms', ...pki.controllerFlags },
      undefined,
      { caPem: pki.ca.certPem },
    );
  });
  after(async () => {
    await t?.destroy();
    dirs.remove();
  });

  /** Runs the artifact as a ramdisk would, against the test controller, and checks that it looks up, heartbeats and stops cleanly. */
  const provesItself = async (command: string, args: string[], name: string) => {
    machineIndex += 1;
    const machine = await uniqueFakeMachine(join(dirs.path, `m${machineIndex}`), machineIndex);
    const node = await createWaitingNode(t.nodes, name, [machine.macs[0] as string]);
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'hold in inspect wait' });
    const flags = {
      controller: t.controller.grpcAddress,
      ca: pki.caFile,
      root: machine.root,
      listen: '127.0.0.1:0',
      'log-level': 'debug',
      'lookup-backoff-start': '100ms',
      'lookup-backoff-max': '500ms',
      'power-driver': 'recording',
      'power-record-file': join(machine.root, 'power-actions.log'),
    };
    const agent = spawnLogged(command, [...args, ...Object.entries(flags).flatMap(([k, v]) => [`--${k}`, v])], bare);
    try {
      const found = await agent.waitForLog('looked up: this machine is node');
      assert.equal(found.node, node.uuid);
      await agent.waitForLog('heartbeat stream established');
      const pinned = await eventually(async () => (await t.controller.store.getNode(node.uuid))?.agentCertificatePem, {
        what: 'the certificate the artifact made to be pinned',
      });
      assert.match(pinned, /BEGIN CERTIFICATE/);
      const recorded = await eventually(
        async () => {
          const { node: seen } = await t.nodes.getNode({ node: name });
          return seen?.lastHeartbeatAt ? seen : undefined;
        },
        { what: 'a recorded heartbeat' },
      );
      assert.equal(recorded.agentVersion, packageVersion(), 'the bundle carries the version without a package.json');
      assert.equal(await stop(agent), 0);
      assert.ok(agent.logs.some((line) => line.msg === 'agent stopped'));
    } finally {
      agent.child.kill('SIGKILL');
    }
  };

  it('carries the image lane worker as one script: started with eval, it speaks the lane protocol', async () => {
    // What the bundle starts for --image-streams above 1 (agent/imaging/lanes): no file of the checkout behind it.
    const disk = join(dirs.path, 'lane-disk');
    writeFileSync(disk, Buffer.alloc(1024 * 1024));
    const setup: LaneSetup = {
      endpoint: { address: '127.0.0.1:1', caPem: undefined, keepalive: { timeMs: 10_000, timeoutMs: 10_000 } },
      lane: 0,
      image: 'nothing-listens',
      devicePath: disk,
      chunkSize: 1024 * 1024,
      sizeBytes: 1024 * 1024,
      digests: new Uint8Array(32),
      stallTimeoutMs: 5000,
    };
    const worker = new Worker(await bundleLaneWorker(), { eval: true, workerData: setup, execArgv: [] });
    const said: FromLane[] = [];
    worker.on('message', (message: FromLane) => said.push(message));
    const exited = once(worker, 'exit');
    worker.postMessage({ type: 'fetch', range: { offset: 0, end: 1024 * 1024 }, metadata: {} } satisfies ToLane);
    const failed = await eventually(() => said.find((m) => m.type === 'failed'), { timeoutMs: 20_000, what: 'the lane to fail' });
    assert.deepEqual(failed?.type === 'failed' && failed.failure.kind === 'grpc' && failed.failure.code, Status.UNAVAILABLE);
    worker.postMessage({ type: 'close' } satisfies ToLane);
    await exited;
    assert.equal(said.at(-1)?.type, 'closed');
  });

  it('is one .mjs file that prints its help with nothing but Node.js beside it', () => {
    assert.equal(artifacts.version, packageVersion());
    const help = execFileSync(process.execPath, ['metalcast-agent.mjs', '--help'], { cwd: bare, env: BARE_ENV, encoding: 'utf8' });
    assert.match(help, /Usage: metalcast-agent \[options\]/);
    assert.match(help, /--controller <value>/);
    assert.match(help, /kernel command line/);
    assert.doesNotMatch(readFileSync(artifacts.bundle.path, 'utf8'), /DatabaseSync|node:sqlite/, 'no controller code in the agent');
  });

  it('the bundle looks up and heartbeats against a real controller, and stops on SIGTERM', async () => {
    await provesItself(process.execPath, ['metalcast-agent.mjs'], 'bundled-1');
  });

  it('the single executable does the same, without a separate Node.js', async (context) => {
    if (!artifacts.sea) {
      // This repository's machines are Linux on x86-64, where it must build.
      assert.ok(!(process.platform === 'linux' && process.arch === 'x64'), `no single executable: ${artifacts.seaSkipped}`);
      context.skip(`no single executable: ${artifacts.seaSkipped}`);
      return;
    }
    const help = execFileSync(join(bare, 'metalcast-agent'), ['--help'], { cwd: bare, env: BARE_ENV, encoding: 'utf8' });
    assert.match(help, /Usage: metalcast-agent \[options\]/);
    await provesItself(join(bare, 'metalcast-agent'), [], 'sea-1');
  });
});
