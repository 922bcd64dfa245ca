import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createChannel, createClient } from 'nice-grpc';
import { clientChannelOptions } from '../../common/grpc-options.js';
import { createLogger } from '../../common/logging.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { NodeServiceDefinition, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { MemoryMachine } from '../../lab/bmc/redfish/machine.js';
import { type RedfishFaults, RedfishSimulator } from '../../lab/bmc/redfish/simulator.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { createTestOperatorToken, eventually, operatorCallOptions, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, makeImageContent } from '../helpers/images.js';

/*
 * A controller driving nodes through the redfish driver and the lab's
 * Redfish BMC (a machine in memory behind it; a real agent process on a
 * fake machine stands for what the machine would boot):
 * - boot.method=virtual-media: the controller builds the agent ISO
 *   (grub-mkrescue, from the --boot-dir files and the node's command line),
 *   serves it, the BMC fetches and inserts it, the machine boots once from
 *   Cd; the ISO is ejected when inspection, deploy or clean ends, and on
 *   abort and when the sweep fails a node whose agent never came;
 * - BMC faults (500s, a stall, dropped connections, a wrong password, only
 *   some ResetTypes, no virtual media) fail the step with a last_error that
 *   names the BMC and quotes it, within a bounded time, the node's lock
 *   released, and the password in no log line; an expired session and a
 *   required If-Match do not fail it.
 */

const PASSWORD = 'vm-bmc-Pa55word-secret';
const FAST = {
  'power.redfish.request_timeout': '1s',
  'power.redfish.attempts': '3',
  'power.redfish.power_timeout': '3s',
};

describe('redfish nodes through a controller', () => {
  const dirs = tempDir('metalcast-redfish-ctl-');
  const logLines: string[] = [];
  const sims: RedfishSimulator[] = [];
  const agents: AgentProcess[] = [];
  let controller: RunningController;
  let channel: ReturnType<typeof createChannel>;
  let nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;

  before(async () => {
    // The ISO builder cares only that these files exist: small stand-ins keep the build quick.
    const bootDir = join(dirs.path, 'boot');
    mkdirSync(bootDir);
    writeFileSync(join(bootDir, 'vmlinuz'), Buffer.alloc(64 * 1024, 1));
    writeFileSync(join(bootDir, 'initramfs.cpio.gz'), Buffer.alloc(128 * 1024, 2));
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dirs.path, 'data'),
        controllerId: 'redfish-test',
        insecure: 'true',
        bootDir,
        // Long enough for an agent process to start on a busy machine; the sweep test waits this out once.
        heartbeatTimeout: '12s',
        heartbeatIntervalMin: '300ms',
        heartbeatIntervalMax: '600ms',
        sweepInterval: '500ms',
        heartbeatFlushInterval: '50ms',
        startupGrace: '0s',
        imageChunkSize: '256K',
        logLevel: 'debug',
      },
      {},
    );
    const logger = createLogger({ name: 'controller', level: 'debug', destination: { write: (line: string) => logLines.push(line) } });
    controller = await startController(config, logger);
    const token = await createTestOperatorToken(controller.store, 'admin');
    channel = createChannel(controller.grpcAddress, undefined, clientChannelOptions({ timeMs: 60_000, timeoutMs: 10_000 }));
    nodes = createClient(NodeServiceDefinition, channel, operatorCallOptions(token));
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    channel?.close();
    await controller?.stop();
    await Promise.all(sims.map((s) => s.stop()));
    dirs.remove();
  });

  async function redfishNode(
    name: string,
    mac: string,
    options: { faults?: RedfishFaults; virtualMedia?: boolean; password?: string } = {},
  ) {
    const machine = new MemoryMachine();
    const sim = await new RedfishSimulator({
      machine,
      name,
      users: { admin: PASSWORD },
      resetDelayMs: 50,
      faults: options.faults,
    }).start();
    sims.push(sim);
    await nodes.createNode({
      name,
      macAddresses: [mac],
      properties: {
        'power.driver': 'redfish',
        'power.redfish.address': sim.url,
        'power.redfish.username': 'admin',
        ...FAST,
        // Faults show within seconds at 1 s a request; a healthy BMC gets room for a busy machine (the ISO fetch on InsertMedia).
        ...(options.faults ? {} : { 'power.redfish.request_timeout': '5s' }),
        ...(options.virtualMedia === false ? {} : { 'boot.method': 'virtual-media' }),
        'boot.kernel_args': `metalcast.node_hint=${name}`,
      },
      secrets: { 'power.redfish.password': options.password ?? PASSWORD },
    });
    await nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    return { sim, machine };
  }

  const act = (node: string, action: ProvisionAction, image?: string) =>
    nodes.setProvisionState({ node, action, deploy: image ? { image, target: undefined } : undefined });
  const waitFor = (name: string, state: ProvisionState) =>
    eventually(
      async () => {
        const { node } = await nodes.getNode({ node: name });
        if (node?.provisionState === state) return node;
        if (node?.lastError) throw new Error(`node ${name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
        return undefined;
      },
      { timeoutMs: 30_000, what: `${name} to reach ${ProvisionState[state]}` },
    );

  it('boots the agent from an ISO the BMC inserts, and ejects it when inspection, cleaning and deploy end', async () => {
    const fake = await uniqueFakeMachine(join(dirs.path, 'vm1'), 501);
    const { sim, machine } = await redfishNode('vm1', fake.macs[0] as string);
    const { node: waiting } = await act('vm1', ProvisionAction.PROVISION_ACTION_INSPECT);
    assert.equal(waiting?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT, waiting?.lastError);
    const image = sim.insertedImage ?? '';
    assert.match(image, /^http:\/\/127\.0\.0\.1:\d+\/virtual-media\/[0-9a-f]{64}\.iso$/);
    assert.deepEqual(machine.bootedFrom, ['Cd'], 'booted once from the virtual CD');
    assert.equal(sim.bootOverride.enabled, 'Disabled', 'the once override was used');

    // The ISO the BMC got: bootable for BIOS and UEFI, with the node's command line in GRUB's menu.
    const iso = Buffer.from(await (await fetch(image)).arrayBuffer());
    const isoFile = join(dirs.path, 'fetched.iso');
    writeFileSync(isoFile, iso);
    const report = execFileSync('xorriso', ['-indev', isoFile, '-report_el_torito', 'plain'], { encoding: 'utf8', stdio: 'pipe' });
    assert.match(report, /El Torito boot img :\s+1\s+BIOS/);
    assert.match(report, /El Torito boot img :\s+2\s+UEFI/);
    const grub = execFileSync(
      'xorriso',
      ['-osirrox', 'on', '-indev', isoFile, '-extract', '/boot/grub/grub.cfg', join(dirs.path, 'grub.cfg')],
      {
        stdio: 'pipe',
      },
    );
    void grub;
    const cfg = execFileSync('cat', [join(dirs.path, 'grub.cfg')], { encoding: 'utf8' });
    assert.match(
      cfg,
      /linux \/boot\/vmlinuz 'console=ttyS0' 'metalcast\.controller=127\.0\.0\.1:\d+' 'metalcast\.insecure' 'metalcast\.node_hint=vm1'/,
    );
    // Byte ranges, as BMCs read virtual media.
    const part = await fetch(image, { headers: { range: 'bytes=32768-32773' } });
    assert.equal(part.status, 206);
    assert.equal(Buffer.from(await part.arrayBuffer()).toString('latin1'), '\u0001CD001');

    agents.push(spawnAgent({ controller: controller.grpcAddress, root: fake.root }));
    await waitFor('vm1', ProvisionState.PROVISION_STATE_MANAGEABLE);
    // The conductor ejects right after the node moved, still holding its lock.
    await eventually(() => sim.insertedImage === undefined, { what: 'the ISO ejected when inspection ended' });
    await eventually(async () => (await nodes.getNode({ node: 'vm1' })).node?.reservation === '', { what: 'the lock released' });

    machine.actions.length = 0;
    await act('vm1', ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitFor('vm1', ProvisionState.PROVISION_STATE_AVAILABLE);
    assert.equal(sim.insertedImage, undefined, 'ejected when cleaning ended');
    await eventually(async () => (await nodes.getNode({ node: 'vm1' })).node?.reservation === '', { what: 'the lock released' });
    const cleanTrail = machine.actions.map((a) => a.replace(/^insert:.*/, 'insert'));
    assert.deepEqual(cleanTrail.slice(0, 3), ['insert', 'boot:Cd:once', 'reset']);
    assert.deepEqual(cleanTrail.slice(-2), ['eject', 'power_off'], 'out before the power off');

    await addImage(controller, 'vm-os', makeImageContent(1024 * 1024 + 5));
    machine.actions.length = 0;
    await act('vm1', ProvisionAction.PROVISION_ACTION_DEPLOY, 'vm-os');
    await waitFor('vm1', ProvisionState.PROVISION_STATE_ACTIVE);
    const deployTrail = machine.actions.map((a) => a.replace(/^insert:.*/, 'insert'));
    assert.deepEqual(deployTrail.slice(-3), ['eject', 'boot:Hdd:continuous', 'reset'], 'the ISO out, then the disk, then restart');
    assert.equal(sim.insertedImage, undefined);
    assert.equal(machine.bootedFrom.at(-1), 'Hdd');
  });

  it('shares one ISO between nodes with the same command line, and ejects it on abort', async () => {
    const a = await redfishNode('vm2', '52:54:00:6b:00:02');
    await act('vm2', ProvisionAction.PROVISION_ACTION_INSPECT);
    const first = a.sim.insertedImage;
    assert.ok(first);
    const { node } = await act('vm2', ProvisionAction.PROVISION_ACTION_ABORT);
    assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
    assert.equal(a.sim.insertedImage, undefined, 'ejected on abort');
    assert.equal((await nodes.getNode({ node: 'vm2' })).node?.reservation, '', 'no lock held');
    // A second inspect of the same node: the same ISO, not built again.
    await act('vm2', ProvisionAction.PROVISION_ACTION_MANAGE);
    await act('vm2', ProvisionAction.PROVISION_ACTION_INSPECT);
    assert.equal(a.sim.insertedImage, first);
    await act('vm2', ProvisionAction.PROVISION_ACTION_ABORT);
  });

  it('ejects the ISO of a node the sweep failed because its agent never came', async () => {
    const { sim } = await redfishNode('vm3', '52:54:00:6b:00:03');
    await act('vm3', ProvisionAction.PROVISION_ACTION_INSPECT);
    assert.ok(sim.insertedImage);
    await eventually(
      async () => (await nodes.getNode({ node: 'vm3' })).node?.provisionState === ProvisionState.PROVISION_STATE_INSPECT_FAILED,
      {
        timeoutMs: 40_000,
        what: 'the sweep to fail vm3',
      },
    );
    await eventually(() => sim.insertedImage === undefined, { what: 'the ISO ejected after the sweep' });
  });

  describe('BMC faults fail the step, bounded, naming the BMC, with the lock released', () => {
    const failsInspect = async (name: string, mac: string, faults: RedfishFaults | undefined, pattern: RegExp, password?: string) => {
      const { sim } = await redfishNode(name, mac, { faults, virtualMedia: false, password });
      const start = Date.now();
      const { node } = await act(name, ProvisionAction.PROVISION_ACTION_INSPECT);
      const took = Date.now() - start;
      assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
      assert.match(node?.lastError ?? '', pattern);
      assert.ok(node?.lastError.includes(sim.url), 'the error names the BMC');
      assert.equal((await nodes.getNode({ node: name })).node?.reservation, '', 'no lock held');
      const events = (await nodes.listNodeEvents({ node: name })).events.map((e) => e.message);
      assert.ok(
        events.some((m) => m === `inspect wait -> inspect failed: ${node?.lastError}`),
        events.join('\n'),
      );
      // The node can be worked on again at once.
      const again = await act(name, ProvisionAction.PROVISION_ACTION_MANAGE);
      assert.equal(again.node?.provisionState, ProvisionState.PROVISION_STATE_MANAGEABLE);
      return { sim, took };
    };

    it('a BMC answering 500', async () => {
      const { sim, took } = await failsInspect(
        'f500',
        '52:54:00:6b:01:01',
        { alwaysFail: true },
        /^power on through redfish failed: BMC http:\/\/127\.0\.0\.1:\d+: GET \/redfish\/v1\/ answered 500: Base\.1\.8\.InternalError: .* \(after 3 tries\)$/,
      );
      assert.equal(sim.requests.length, 3);
      assert.ok(took < 10_000, `${took} ms`);
    });

    it('a BMC that stalls', async () => {
      const { took } = await failsInspect(
        'fstall',
        '52:54:00:6b:01:02',
        { stall: true },
        /no complete answer within 1000 ms \(after 3 tries\)$/,
      );
      assert.ok(took < 12_000, `${took} ms`);
    });

    it('a wrong password', async () => {
      const { sim } = await failsInspect(
        'fpass',
        '52:54:00:6b:01:03',
        undefined,
        /the BMC refused the credentials of user 'admin' .*answered 401/,
        'not-the-password',
      );
      assert.equal(sim.requests.filter((r) => r.method === 'POST').length, 1);
    });

    it('a BMC that keeps dropping the connection', async () => {
      const { sim, took } = await failsInspect(
        'fdrop',
        '52:54:00:6b:01:05',
        { dropConnections: 1000 },
        /^power on through redfish failed: BMC http:\/\/127\.0\.0\.1:\d+: GET \/redfish\/v1\/: the BMC closed the connection \(after 3 tries\)$/,
      );
      assert.equal(sim.requests.length, 3, 'three tries, no more');
      assert.ok(took < 10_000, `${took} ms`);
    });

    it('a system that allows only some ResetTypes, none of them a power on', async () => {
      const { sim } = await failsInspect(
        'fresets',
        '52:54:00:6b:01:06',
        { resetTypes: ['ForceOff', 'GracefulShutdown'] },
        /allows no ResetType to power on \(On or ForceOn\); it allows ForceOff, GracefulShutdown$/,
      );
      assert.ok(!sim.requests.some((r) => r.path.endsWith('ComputerSystem.Reset')), 'no Reset the BMC would refuse was sent');
    });

    it('a BMC that requires If-Match and whose session expired between steps: the next step logs in again and goes on', async () => {
      const { sim, machine } = await redfishNode('fexpire', '52:54:00:6b:01:07', { faults: { requireIfMatch: true } });
      const first = await act('fexpire', ProvisionAction.PROVISION_ACTION_INSPECT);
      assert.equal(first.node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT, first.node?.lastError);
      await act('fexpire', ProvisionAction.PROVISION_ACTION_ABORT);
      await act('fexpire', ProvisionAction.PROVISION_ACTION_MANAGE);
      // As after a BMC reboot: the token the controller holds is now unknown to the BMC.
      sim.expireSessions();
      const before = sim.requests.length;
      const second = await act('fexpire', ProvisionAction.PROVISION_ACTION_INSPECT);
      assert.equal(second.node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT, second.node?.lastError);
      const trail = sim.requests.slice(before);
      const refused = trail.findIndex((r) => r.status === 401 && r.auth === 'bad');
      assert.ok(refused >= 0, `the old token was refused: ${trail.map((r) => `${r.method} ${r.path} ${r.auth} ${r.status}`).join('; ')}`);
      const logins = trail.filter((r) => r.method === 'POST' && r.path.endsWith('/Sessions'));
      assert.equal(logins.length, 1, 'one new login');
      assert.ok(trail.indexOf(logins[0] as (typeof trail)[number]) > refused, 'logged in again after the 401');
      assert.ok(
        trail.filter((r) => r.method === 'PATCH').every((r) => r.ifMatch && r.status !== 428),
        'every PATCH carried If-Match',
      );
      assert.deepEqual(machine.bootedFrom, ['Cd', 'Cd']);
      await act('fexpire', ProvisionAction.PROVISION_ACTION_ABORT);
      assert.equal((await nodes.getNode({ node: 'fexpire' })).node?.reservation, '', 'no lock held');
    });

    it('a BMC without virtual media for a virtual-media node', async () => {
      const { sim } = await redfishNode('fnovm', '52:54:00:6b:01:04', { faults: { noVirtualMedia: true } });
      const { node } = await act('fnovm', ProvisionAction.PROVISION_ACTION_INSPECT);
      assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
      assert.match(node?.lastError ?? '', /^virtual media boot through redfish failed: BMC .*: .*this BMC has no virtual media$/);
      assert.ok(!sim.requests.some((r) => r.path.endsWith('ComputerSystem.Reset')), 'not powered on without its ISO');
    });
  });

  it('refuses kernel arguments the agent ISO cannot pass to the kernel when the node is created', async () => {
    await assert.rejects(
      nodes.createNode({
        name: 'badargs',
        macAddresses: ['52:54:00:6b:02:01'],
        properties: {
          'power.driver': 'redfish',
          'power.redfish.address': 'https://10.0.0.5',
          'power.redfish.username': 'admin',
          'boot.method': 'virtual-media',
          'boot.kernel_args': "metalcast.note=it's",
        },
        secrets: { 'power.redfish.password': PASSWORD },
      }),
      (error: Error) =>
        /INVALID_ARGUMENT/.test(error.message) &&
        error.message.includes("boot.kernel_args: the kernel parameter metalcast.note=it's cannot go on the agent ISO"),
    );
    // Network boot has no GRUB in the way: the same arguments are fine there.
    await nodes.createNode({
      name: 'netargs',
      macAddresses: ['52:54:00:6b:02:02'],
      properties: { 'boot.kernel_args': "metalcast.note=it's" },
    });
  });

  it('wrote no BMC password into any log line', () => {
    assert.ok(logLines.length > 50);
    const basic = Buffer.from(`admin:${PASSWORD}`).toString('base64');
    assert.deepEqual(
      logLines.filter((line) => line.includes(PASSWORD) || line.includes(basic) || line.includes('not-the-password')),
      [],
    );
  });
});
