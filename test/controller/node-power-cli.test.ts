import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { MemoryMachine } from '../../lab/bmc/redfish/machine.js';
import { RedfishSimulator } from '../../lab/bmc/redfish/simulator.js';
import { startTestController, type TestController, tempDir } from '../helpers/controller.js';

/*
 * The operator's side of BMCs, through the real `metalcast` command: a node
 * created with its Redfish BMC settings and a password from a file, the
 * password shown nowhere (node show masks it, --json lists only its name),
 * `node validate` as a table with its exit code, `node power on|off|status`,
 * a password changed through stdin, and the warning --bmc-insecure prints.
 */

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
const PASSWORD = 'cli-Bmc-pa55word';

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

describe('metalcast node: BMC settings, power and validate', () => {
  const dir = tempDir('metalcast-power-cli-');
  let t: TestController;
  let sim: RedfishSimulator;
  let machine: MemoryMachine;
  let env: NodeJS.ProcessEnv;

  const cli = (args: string[], stdin?: string): Promise<Run> =>
    new Promise((resolve) => {
      const child = execFile(process.execPath, [BIN, ...args], { env, timeout: 60_000 }, (error, stdout, stderr) =>
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
      child.stdin?.end(stdin ?? '');
    });

  before(async () => {
    t = await startTestController();
    machine = new MemoryMachine();
    sim = await new RedfishSimulator({ machine, name: 'cli-node', users: { admin: PASSWORD }, resetDelayMs: 50 }).start();
    env = { ...process.env, METALCAST_CONTROLLER: t.controller.grpcAddress, METALCAST_TOKEN: t.adminToken, METALCAST_INSECURE: 'true' };
  });
  after(async () => {
    await sim?.stop();
    await t?.destroy();
    dir.remove();
  });

  it('creates a node with its BMC, shows its password masked, validates and powers it', async () => {
    const passwordFile = join(dir.path, 'bmc.pass');
    writeFileSync(passwordFile, `${PASSWORD}\n`);
    const created = await cli([
      'node',
      'create',
      'cli-node',
      '--mac',
      '52:54:00:c1:00:01',
      '--power',
      'redfish',
      '--bmc-address',
      sim.url,
      '--bmc-username',
      'admin',
      '--bmc-password-file',
      passwordFile,
      '--boot-method',
      'virtual-media',
      '--property',
      'power.redfish.request_timeout=2s',
    ]);
    assert.equal(created.code, 0, created.stderr);

    const show = await cli(['node', 'show', 'cli-node']);
    assert.match(show.stdout, /secrets\s+power\.redfish\.password=\*{8}/);
    assert.match(show.stdout, /power\.redfish\.address=http:\/\/127\.0\.0\.1:\d+/);
    const json = await cli(['node', 'show', 'cli-node', '--json']);
    assert.deepEqual(JSON.parse(json.stdout).secretKeys, ['power.redfish.password']);
    for (const output of [show.stdout, json.stdout]) assert.ok(!output.includes(PASSWORD), 'the password is shown');

    const validate = await cli(['node', 'validate', 'cli-node']);
    assert.equal(validate.code, 0, validate.stdout + validate.stderr);
    for (const check of ['reachability', 'credentials', 'system', 'reset types', 'boot override', 'virtual media'])
      assert.match(validate.stdout, new RegExp(`${check}\\s+│\\s+ok`), validate.stdout);

    const on = await cli(['node', 'power', 'on', 'cli-node', '--boot-device', 'network']);
    assert.equal(on.code, 0, on.stderr);
    assert.match(on.stdout, /node cli-node: on done through redfish; power is on/);
    assert.deepEqual(machine.bootedFrom, ['Pxe']);
    assert.equal((await cli(['node', 'power', 'status', 'cli-node'])).stdout, 'on\n');
    const off = await cli(['node', 'power', 'off', 'cli-node', '--json']);
    assert.deepEqual(JSON.parse(off.stdout), { node: 'cli-node', power: 'off', driver: 'redfish' });
    assert.equal(machine.on, false);

    const events = await cli(['node', 'events', 'cli-node']);
    assert.match(events.stdout, /power on \(boot from network\) through redfish: now on/);
    assert.match(events.stdout, /power off through redfish: now off/);
  });

  it('changes the password through stdin, and says what the BMC answered when it is wrong', async () => {
    const set = await cli(['node', 'set', 'cli-node', '--bmc-password-file', '-'], 'not-the-password\n');
    assert.equal(set.code, 0, set.stderr);
    const validate = await cli(['node', 'validate', 'cli-node']);
    assert.equal(validate.code, 1);
    assert.match(
      validate.stdout,
      /credentials\s+│\s+FAILED\s+│\s+BMC http:\/\/127\.0\.0\.1:\d+: the BMC refused the credentials of user 'admin'/,
    );
    const status = await cli(['node', 'power', 'status', 'cli-node']);
    assert.equal(status.code, 1);
    assert.match(
      status.stderr,
      /FAILED_PRECONDITION: reading the power state through redfish failed: BMC .*refused the credentials of user 'admin'/,
    );
    const fixed = await cli(['node', 'set', 'cli-node', '--bmc-password-file', '-'], PASSWORD);
    assert.equal(fixed.code, 0, fixed.stderr);
    assert.equal((await cli(['node', 'power', 'status', 'cli-node'])).stdout, 'off\n');
  });

  it('warns about --bmc-insecure, and refuses BMC flags without a BMC driver', async () => {
    const insecure = await cli(['node', 'set', 'cli-node', '--bmc-insecure']);
    assert.equal(insecure.code, 0, insecure.stderr);
    assert.match(insecure.stderr, /warning: --bmc-insecure: the controller will not verify this BMC's TLS certificate/);
    assert.match((await cli(['node', 'show', 'cli-node'])).stdout, /power\.redfish\.verify_tls=false/);

    const bare = await cli(['node', 'create', 'bare', '--mac', '52:54:00:c1:00:02', '--bmc-address', '10.0.0.9']);
    assert.equal(bare.code, 1);
    assert.match(bare.stderr, /--bmc-address needs a BMC power driver: add --power redfish or --power ipmi/);
    const noDriver = await cli(['node', 'create', 'bare2', '--mac', '52:54:00:c1:00:03']);
    assert.equal(noDriver.code, 0);
    const power = await cli(['node', 'power', 'on', 'bare2']);
    assert.equal(power.code, 1);
    assert.match(power.stderr, /node 'bare2' has no power driver/);
    const emptyPassword = await cli(['node', 'set', 'cli-node', '--bmc-password-file', '-'], '');
    assert.equal(emptyPassword.code, 1);
    assert.match(emptyPassword.stderr, /--bmc-password-file: stdin is empty/);
  });
});
