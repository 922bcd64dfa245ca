import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { AGENT_KERNEL_CMDLINE_KEYS, loadAgentConfig, resolveAgentRoot } from '../../agent/config/config.js';
import { kernelCmdlineNotes, parseKernelCmdline, readKernelCmdline, splitKernelCmdline } from '../../agent/config/kernel-cmdline.js';
import { ConfigError } from '../../common/config.js';
import { ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode } from '../helpers/agent-client.js';
import { type AgentProcess, msg, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

const parse = (text: string) => parseKernelCmdline(text, AGENT_KERNEL_CMDLINE_KEYS);

describe('the kernel command line', () => {
  it('splits like the kernel: spaces separate except in double quotes, and quotes around a value or a parameter go', () => {
    assert.deepEqual(
      splitKernelCmdline('BOOT_IMAGE=/vmlinuz  root=/dev/ram0 metalcast.x="a b" "metalcast.y=c d" quiet\tip=dhcp -- init-arg\n'),
      ['BOOT_IMAGE=/vmlinuz', 'root=/dev/ram0', 'metalcast.x=a b', 'metalcast.y=c d', 'quiet', 'ip=dhcp', '--', 'init-arg'],
    );
    assert.deepEqual(splitKernelCmdline('a="unterminated value'), ['a=unterminated value']);
    assert.deepEqual(splitKernelCmdline('   \n'), []);
  });

  it('takes metalcast.* options with _ or - for -, keeps the last of a repeated key, and leaves other parameters alone', () => {
    const cmdline = parse(
      'ro quiet controller=10.9.9.9:1 metalcast.controller=10.0.0.1:7350,10.0.0.2:7350 metalcast.log_level=warn ' +
        'metalcast.lookup-budget=20m metalcast.Log_Level=debug metalcast.advertise_address="10.0.0.7:9999"',
    );
    assert.deepEqual(Object.fromEntries([...cmdline.options].map(([flag, s]) => [flag, s.value])), {
      controller: '10.0.0.1:7350,10.0.0.2:7350',
      'log-level': 'debug',
      'lookup-budget': '20m',
      'advertise-address': '10.0.0.7:9999',
    });
    assert.equal(cmdline.options.get('log-level')?.key, 'metalcast.Log_Level');
    assert.deepEqual(cmdline.unknown, []);
    assert.deepEqual(cmdline.ignored, []);
  });

  it('takes metalcast.ca and metalcast.insecure (a key alone turns a switch on), refuses metalcast.root, and lists unknown keys once', () => {
    const cmdline = parse(
      'metalcast.ca=/etc/metalcast/ca.pem metalcast.insecure metalcast.root=/mnt metalcast.contoller=10.0.0.1:7350 metalcast.colour metalcast.colour=blue',
    );
    assert.deepEqual(Object.fromEntries([...cmdline.options].map(([flag, s]) => [flag, s.value])), {
      ca: '/etc/metalcast/ca.pem',
      insecure: '',
    });
    const config = loadAgentConfig({}, {}, cmdline);
    assert.equal(config.ca, '/etc/metalcast/ca.pem');
    assert.equal(config.insecure, true);
    assert.equal(loadAgentConfig({}, {}, parse('metalcast.insecure=false')).insecure, false);
    assert.deepEqual(
      cmdline.ignored.map((i) => i.key),
      ['metalcast.root'],
    );
    assert.deepEqual(cmdline.unknown, ['metalcast.contoller', 'metalcast.colour']);

    const notes = kernelCmdlineNotes(cmdline, AGENT_KERNEL_CMDLINE_KEYS);
    assert.deepEqual(
      notes.map((n) => n.level),
      ['info', 'warn', 'warn'],
    );
    assert.match(notes[1]?.message ?? '', /metalcast\.root .* --root \(or METALCAST_ROOT\) decides/);
    const unknown = notes[2];
    assert.equal(unknown?.message, 'unknown keys on the kernel command line ignored: metalcast.contoller, metalcast.colour');
    const known = unknown?.fields.known as string[];
    for (const key of ['metalcast.controller', 'metalcast.log_level', 'metalcast.advertise_address', 'metalcast.ca'])
      assert.ok(known.includes(key), key);
  });

  it('ranks flags over the environment over the kernel command line over the defaults', () => {
    const cmdline = parse('metalcast.controller=10.0.0.1:7350 metalcast.log_level=debug metalcast.call_timeout=5s');
    const fromCmdline = loadAgentConfig({}, {}, cmdline);
    assert.deepEqual(fromCmdline.controller, ['10.0.0.1:7350']);
    assert.equal(fromCmdline.logLevel, 'debug');
    assert.equal(fromCmdline.callTimeout, 5000);
    assert.equal(fromCmdline.keepaliveTime, 10_000, 'untouched options keep their defaults');

    const envWins = loadAgentConfig({}, { METALCAST_CONTROLLER: '10.0.0.2:7350', METALCAST_LOG_LEVEL: '' }, cmdline);
    assert.deepEqual(envWins.controller, ['10.0.0.2:7350']);
    assert.equal(envWins.logLevel, 'debug', 'an empty variable is unset, so the kernel command line applies');

    const flagWins = loadAgentConfig({ controller: '10.0.0.3:7350' }, { METALCAST_CONTROLLER: '10.0.0.2:7350' }, cmdline);
    assert.deepEqual(flagWins.controller, ['10.0.0.3:7350']);
    assert.deepEqual(loadAgentConfig({}, {}).controller, ['127.0.0.1:7350']);
  });

  it('names the kernel command line key in errors, with the other problems', () => {
    const cmdline = parse('metalcast.controller=nowhere metalcast.lookup_budget=soon');
    assert.throws(
      () => loadAgentConfig({ listen: 'x' }, {}, cmdline),
      (error: unknown) => {
        assert.ok(error instanceof ConfigError);
        assert.equal(error.problems.length, 3);
        assert.match(error.message, /metalcast\.controller= \(kernel command line\): 'nowhere' is not of the form host:port/);
        assert.match(error.message, /metalcast\.lookup_budget= \(kernel command line\): 'soon' is not a duration/);
        assert.match(error.message, /--listen: 'x' is not of the form host:port/);
        return true;
      },
    );
    // A key without a value is there, and empty.
    assert.throws(
      () => loadAgentConfig({}, {}, parse('metalcast.controller')),
      /metalcast\.controller= \(kernel command line\): at least one/,
    );
  });

  it('reads <root>/proc/cmdline, where --root or METALCAST_ROOT point', async () => {
    const dir = tempDir('metalcast-cmdline-');
    try {
      assert.equal(resolveAgentRoot({ root: dir.path }, { METALCAST_ROOT: '/elsewhere' }), dir.path);
      assert.equal(resolveAgentRoot({}, { METALCAST_ROOT: dir.path }), dir.path);
      assert.equal(resolveAgentRoot({}, {}), '/');
      assert.equal(await readKernelCmdline(dir.path), undefined, 'no proc/cmdline is an empty command line');
      const machine = await uniqueFakeMachine(join(dir.path, 'm'), 1);
      await writeFile(join(machine.root, 'proc', 'cmdline'), 'quiet metalcast.controller=10.0.0.1:7350\n');
      assert.equal(await readKernelCmdline(machine.root), 'quiet metalcast.controller=10.0.0.1:7350\n');
    } finally {
      dir.remove();
    }
  });
});

describe('an agent configured by its kernel command line', () => {
  let t: TestController;
  let pki: TestPki;
  const dirs = tempDir('metalcast-cmdline-agent-');
  const agents: AgentProcess[] = [];

  before(async () => {
    pki = await makeTestPki(dirs.path);
    t = await startTestController(
      { heartbeatIntervalMin: '300ms', heartbeatIntervalMax: '600ms', heartbeatFlushInterval: '50ms', ...pki.controllerFlags },
      undefined,
      { caPem: pki.ca.certPem },
    );
  });
  afterEach(async () => {
    await Promise.all(agents.splice(0).map((a) => a.kill('SIGKILL')));
  });
  after(async () => {
    await t.destroy();
    dirs.remove();
  });

  it('finds its controller and the CA to trust it with there, and warns about the keys it does not know', async () => {
    const machine = await uniqueFakeMachine(join(dirs.path, 'm1'), 301);
    const node = await createWaitingNode(t.nodes, 'cmdline-1', [machine.macs[0] as string]);
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'hold in inspect wait' });
    await writeFile(
      join(machine.root, 'proc', 'cmdline'),
      `BOOT_IMAGE=/vmlinuz initrd=ramdisk.img metalcast.controller=${t.controller.grpcAddress} metalcast.ca=${pki.caFile} metalcast.colour=blue quiet\n`,
    );
    // No --controller: the default 127.0.0.1:7350 would find nothing. No --ca either (the helper's --insecure turned off).
    const agent = spawnAgent({ root: machine.root, insecure: 'false' });
    agents.push(agent);
    await agent.waitForLog(msg('heartbeat stream established'));
    assert.equal(t.controller.sessions.agentEndpoint(node.uuid) !== undefined, true);

    const settings = agent.logs.find(msg('settings from the kernel command line'));
    assert.deepEqual(settings?.settings, [`metalcast.controller=${t.controller.grpcAddress}`, `metalcast.ca=${pki.caFile}`]);
    assert.notEqual((await agent.waitForLog(msg('agent API listening'))).tls, 'off (--insecure)', 'TLS, with the CA from there');
    const unknown = agent.logs.find(msg('unknown key on the kernel command line ignored: metalcast.colour'));
    assert.equal(unknown?.level, 40);
    assert.ok((unknown?.known as string[] | undefined)?.includes('metalcast.controller'));
    assert.equal((await t.nodes.getNode({ node: 'cmdline-1' })).node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
  });

  it('a flag beats the kernel command line, and a bad value there exits 2 naming the key', async () => {
    const machine = await uniqueFakeMachine(join(dirs.path, 'm2'), 302);
    await writeFile(join(machine.root, 'proc', 'cmdline'), 'metalcast.controller=not-an-address metalcast.log_level=loud\n');
    const bad = spawnAgent({ root: machine.root, 'log-level': 'info' });
    agents.push(bad);
    let stderr = '';
    bad.child.stderr?.on('data', (chunk: string) => {
      stderr += chunk;
    });
    assert.equal(await bad.exited, 2);
    assert.match(stderr, /metalcast\.controller= \(kernel command line\): 'not-an-address' is not of the form host:port/);
    assert.doesNotMatch(stderr, /log_level/, '--log-level on the command line wins over metalcast.log_level');

    const node = await createWaitingNode(t.nodes, 'cmdline-2', [machine.macs[0] as string]);
    await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'hold in inspect wait' });
    const good = spawnAgent({ root: machine.root, controller: t.controller.grpcAddress, 'log-level': 'debug', ca: pki.caFile });
    agents.push(good);
    await good.waitForLog(msg('heartbeat stream established'));
    await eventually(() => t.controller.sessions.agentEndpoint(node.uuid), { what: 'the agent to heartbeat' });
  });
});
