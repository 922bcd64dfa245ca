import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { connectOperator, type OperatorClients } from '../cli/client.js';
import { watchNodes } from '../cli/commands/node-watch.js';
import { printTable } from '../cli/output.js';
import { type Node, ProvisionAction, ProvisionState } from '../gen/metalcast/v1/node.js';
import { type FakeMachine, uniqueFakeMachine } from './fake-machine.js';
import { type Program, startProgram } from './processes.js';
import { describeError } from '../common/errors.js';
import { tlsInit } from '../common/tls-init.js';

export interface DemoOptions {
  nodes: number;
  imageBytes: number;
  keep: boolean;
}

const MIB = 1024 * 1024;
const say = (text: string) => process.stdout.write(`\n== ${text}\n`);

/**
 * The whole product on one machine: a controller with a fresh data
 * directory, a generated image, agents on fake machines; enrol, inspect,
 * provide and deploy them all with live progress, check every disk against
 * the image, undeploy one through cleaning, and report. Returns true only
 * if every check passed; cleans up after itself either way.
 */
export async function runDemo(options: DemoOptions): Promise<boolean> {
  const began = Date.now();
  const dir = await mkdtemp(join(tmpdir(), 'metalcast-demo-'));
  const programs: Program[] = [];
  let clients: OperatorClients | undefined;
  const checks: [string, boolean][] = [];
  const check = (name: string, ok: boolean) => {
    checks.push([name, ok]);
    process.stdout.write(`   ${ok ? 'ok  ' : 'FAIL'} ${name}\n`);
  };
  const stopAll = async () => {
    clients?.close();
    await Promise.all(programs.splice(0).map((p) => p.stop()));
  };
  const onSignal = () => void stopAll().then(() => rm(dir, { recursive: true, force: true }).finally(() => process.exit(130)));
  process.once('SIGINT', onSignal);
  try {
    say('making a CA, a controller certificate and an operator certificate (metalcast tls init)');
    const tls = await tlsInit({ dir: join(dir, 'tls'), hosts: ['127.0.0.1', 'localhost'], days: 1 });
    process.stdout.write(`   ${tls.ca}, ${tls.controller} (TLS 1.3 everywhere; each agent makes its own key, which the controller pins)\n`);

    say(`starting a controller (data and logs in ${dir})`);
    const controller = await startProgram(
      [
        'controller',
        '--listen=127.0.0.1:0',
        '--metrics-listen=127.0.0.1:0',
        `--tls-cert=${tls.controller}`,
        `--tls-key=${tls.controllerKey}`,
        `--data-dir=${join(dir, 'controller')}`,
        '--heartbeat-timeout=60s',
        '--heartbeat-interval-min=1s',
        '--heartbeat-interval-max=2s',
        '--sweep-interval=2s',
        '--startup-grace=0s',
      ],
      join(dir, 'controller.log'),
      (line) => line.msg === 'controller started',
    );
    programs.push(controller.program);
    const grpc = controller.readyLine.grpc as string;
    const http = controller.readyLine.http as string;
    process.stdout.write(`   gRPC ${grpc}, metrics http://${http}/metrics\n`);
    // The controller's first start wrote an admin operator token beside its database.
    const adminToken = (await readFile(join(dir, 'controller', 'admin.token'), 'utf8')).trim();
    clients = connectOperator(grpc, 30_000, adminToken, { caPem: await readFile(tls.ca, 'utf8') });
    const { nodes, images } = clients;

    say(`generating a ${Math.round(options.imageBytes / MIB)} MiB sample image and uploading it`);
    const image = sampleImage(options.imageBytes);
    const imageSha = createHash('sha256').update(image).digest('hex');
    await writeFile(join(dir, 'sample.img'), image);
    const uploaded = await images.uploadImage(
      (async function* () {
        yield { part: { $case: 'header' as const, value: { name: 'demo-os', sha256: imageSha, sizeBytes: image.length } } };
        for (let at = 0; at < image.length; at += MIB) yield { part: { $case: 'data' as const, value: image.subarray(at, at + MIB) } };
      })(),
      { deadline: 120_000 },
    );
    check(`image uploaded and verified by the controller (sha256 ${imageSha.slice(0, 16)}…)`, uploaded.image?.sha256 === imageSha);

    say(`starting ${options.nodes} agents on fake machines`);
    const machines: FakeMachine[] = [];
    for (let i = 0; i < options.nodes; i++) {
      const machine = await uniqueFakeMachine(join(dir, 'machines', `node-${i + 1}`), 9000 + i, {
        disks: [
          {
            name: 'sda',
            sizeBytes: Math.max(2 * options.imageBytes, 64 * MIB),
            model: 'DEMO DISK',
            serial: `DEMO${i + 1}`,
            rotational: false,
          },
        ],
      });
      machines.push(machine);
      // Old data on the disk, as on a machine that ran something before.
      const disk = await open((machine.disks[0] as { path: string }).path, 'r+');
      await disk.write(Buffer.alloc(MIB, 0x5a), 0, MIB, 0);
      await disk.close();
      const agent = await startProgram(
        [
          'agent',
          `--controller=${grpc}`,
          `--ca=${tls.ca}`,
          '--listen=127.0.0.1:0',
          `--root=${machine.root}`,
          '--power-driver=recording',
          `--power-record-file=${join(machine.root, 'power.log')}`,
          '--lookup-backoff-start=200ms',
          '--lookup-backoff-max=1s',
          '--reconnect-delay=1s',
          '--min-heartbeat-gap=1s',
        ],
        join(dir, `agent-${i + 1}.log`),
        (line) => line.msg === 'agent API listening',
      );
      programs.push(agent.program);
    }
    const names = machines.map((_, i) => `node-${i + 1}`);

    say('enrolling and inspecting');
    for (const [i, name] of names.entries()) {
      await nodes.createNode({ name, macAddresses: machines[i]?.macs ?? [], properties: { rack: 'demo' } });
      await act(nodes, name, ProvisionAction.PROVISION_ACTION_MANAGE);
      await act(nodes, name, ProvisionAction.PROVISION_ACTION_INSPECT);
    }
    const inspected = await waitAll(nodes, names, ProvisionState.PROVISION_STATE_MANAGEABLE);
    check(
      'every node inspected: its disk and MACs found',
      inspected.every(
        (n, i) => n.inventory?.disks[0]?.serial === `DEMO${i + 1}` && n.inventory?.interfaces.length === machines[i]?.macs.length,
      ),
    );

    say(`providing (cleaning) and deploying, with ${process.stdout.isTTY ? 'live progress' : 'a line per state change'}`);
    for (const name of names) await act(nodes, name, ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitAll(nodes, names, ProvisionState.PROVISION_STATE_AVAILABLE);
    for (const name of names) await act(nodes, name, ProvisionAction.PROVISION_ACTION_DEPLOY, 'demo-os');
    await watchNodes(nodes, names, new Set(['active', 'deploy_failed']), false);
    const deployed = await waitAll(nodes, names, ProvisionState.PROVISION_STATE_ACTIVE);
    check('every node active', deployed.length === names.length);

    say("checking every disk's sha256 against the image");
    for (const [i, machine] of machines.entries()) {
      const disk = await readFile((machine.disks[0] as { path: string }).path);
      const ok = createHash('sha256').update(disk.subarray(0, image.length)).digest('hex') === imageSha;
      check(`${names[i]}: disk holds the image`, ok);
    }

    say(`undeploying ${names[0]} through cleaning`);
    await act(nodes, names[0] as string, ProvisionAction.PROVISION_ACTION_UNDEPLOY);
    await waitAll(nodes, [names[0] as string], ProvisionState.PROVISION_STATE_AVAILABLE);
    const erased = await readFile(((machines[0] as FakeMachine).disks[0] as { path: string }).path);
    check(
      `${names[0]}: available again, its disk erased`,
      erased.subarray(0, MIB).every((b) => b === 0),
    );

    const controllerLog = (await readFile(join(dir, 'controller.log'), 'utf8')).split('\n');
    const pinned = new Set(
      controllerLog
        .filter((line) => line.includes('agent certificate pinned for this node'))
        .map((line) => JSON.parse(line).node as string),
    );
    const offending = controllerLog.filter((line) => line.includes('not calling the agent') || line.includes('plaintext'));
    check(
      `every agent's own certificate pinned by the controller, and every call to an agent made over TLS with it (${pinned.size} of ${names.length} nodes pinned${offending.length > 0 ? `; but the controller logged: ${offending.map((line) => (JSON.parse(line) as { msg?: string }).msg).join(' | ')}` : ''})`,
      pinned.size === names.length && offending.length === 0,
    );

    say('summary');
    const { nodes: final } = await nodes.listNodes({ provisionState: 0, pageSize: 100, pageToken: '', maintenance: undefined });
    printTable(
      ['node', 'state', 'last error'],
      final.map((n) => [
        n.name,
        ProvisionState[n.provisionState]?.replace('PROVISION_STATE_', '').toLowerCase() ?? '?',
        n.lastError || '-',
      ]),
    );
    const metrics = await (await fetch(`http://${http}/metrics`)).text();
    process.stdout.write('\na few lines of /metrics:\n');
    for (const line of metrics.split('\n')) {
      if (
        /^metalcast_(nodes\{provision_state="(active|available)"\}|heartbeats_total|lookups_total\{result="found"\}|image_bytes_served_total|image_transfer_resumes_total) /.test(
          line,
        )
      ) {
        process.stdout.write(`   ${line}\n`);
      }
    }
  } catch (error) {
    check(`the demo ran to the end (${describeError(error)})`, false);
  } finally {
    process.off('SIGINT', onSignal);
    await stopAll();
    if (options.keep) process.stdout.write(`\nkept ${dir}\n`);
    else await rm(dir, { recursive: true, force: true });
  }
  const failed = checks.filter(([, ok]) => !ok);
  const seconds = ((Date.now() - began) / 1000).toFixed(1);
  process.stdout.write(`\n${checks.length - failed.length} passed, ${failed.length} failed, in ${seconds} s\n`);
  return failed.length === 0;
}

async function act(nodes: OperatorClients['nodes'], node: string, action: ProvisionAction, image?: string): Promise<void> {
  await nodes.setProvisionState({ node, action, deploy: image ? { image, target: undefined } : undefined });
}

/** Waits until every node is in `state`; fails at once on a failed state. */
async function waitAll(nodes: OperatorClients['nodes'], names: string[], state: ProvisionState, timeoutMs = 120_000): Promise<Node[]> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const found = await Promise.all(names.map(async (name) => (await nodes.getNode({ node: name })).node as Node));
    const failed = found.find((n) => n.provisionState !== state && n.lastError !== '');
    if (failed) throw new Error(`${failed.name}: ${failed.lastError}`);
    if (found.every((n) => n.provisionState === state)) return found;
    await sleep(200);
  }
  throw new Error(`nodes did not reach ${ProvisionState[state]} within ${timeoutMs / 1000}s`);
}

/** Random data with zero stretches, like a real disk image's unused space. */
function sampleImage(size: number): Buffer {
  const image = randomBytes(size);
  for (let at = 0; at < size; at += 4 * MIB) image.fill(0, at + 2 * MIB, Math.min(size, at + 3 * MIB));
  return image;
}
