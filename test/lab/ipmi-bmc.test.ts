import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createSocket, type Socket } from 'node:dgram';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { IpmiError, Ipmitool } from '../../controller/power/ipmi/ipmitool.js';
import { IPMI_PASSWORD_SECRET, IpmiPowerDriver, ipmiDriverFromNode } from '../../controller/power/ipmi/ipmi-driver.js';
import { PowerDrivers } from '../../controller/power/drivers.js';
import { freeUdpPort, type IpmiBmc, ipmiBmcUnavailable, startIpmiBmc } from '../../lab/bmc/ipmi/ipmi-bmc.js';
import { type Guest, labMac, qemuUnavailable, startGuest } from '../../lab/qemu.js';
import { eventually } from '../helpers/controller.js';

/*
 * The ipmi power driver against a real IPMI BMC: OpenIPMI's ipmi_sim (lab/bmc/ipmi)
 * in front of a running QEMU guest, spoken to by Debian's ipmitool over
 * lanplus. Power on, off, reset and status, and the boot device, are checked
 * on the guest itself (QMP status and the NIC's bootindex), not on what the
 * driver says. Faults: a wrong password and an unknown user fail at once
 * without retries; a BMC that is down and one that never answers fail after
 * a bounded number of tries within a bounded time; errors name the BMC and
 * say what it answered; the password is in no error and in no process's
 * command line while a call runs.
 *
 * Needs ipmi_sim (openipmi), ipmitool and QEMU; skips outside CI without them,
 * fails under CI=true.
 */

const unavailable = ipmiBmcUnavailable() ?? qemuUnavailable();
const skip = unavailable && process.env.CI !== 'true' ? `cannot run an IPMI BMC here: ${unavailable}` : false;
if (skip) process.stderr.write(`ipmi-bmc.test.ts: skipping: ${skip}\n`);

const PASSWORD = 'lab-Secret-7f3a';
const USER = 'labadmin';

describe('ipmi power driver against ipmi_sim and a QEMU guest', { skip }, () => {
  let work: string;
  let guest: Guest;
  let bmc: IpmiBmc;
  let driver: IpmiPowerDriver;
  let keep = false;

  before(async () => {
    work = mkdtempSync(join(tmpdir(), 'metalcast-ipmi-'));
    const bmcSocket = join(work, 'guest.bmc');
    bmc = await startIpmiBmc({ name: 'ipmi-guest', dir: join(work, 'bmc'), username: USER, password: PASSWORD, qmpSocketPath: bmcSocket });
    guest = await startGuest({
      name: 'ipmi-guest',
      mac: labMac(0x1e0001),
      diskPath: join(work, 'disk.img'),
      diskSizeBytes: 16 * 1024 * 1024,
      boot: 'disk',
      // Never fetched: the guest's disk is empty and its NIC boots only when asked to.
      netBootUrl: 'http://10.0.2.2:9/boot.ipxe',
      consolePath: join(work, 'console.log'),
      qmpSocketPath: join(work, 'guest.qmp'),
      bmcSocketPath: bmcSocket,
      memoryMiB: 256,
      poweredOn: false,
      extraArgs: bmc.qemuArgs(),
    });
    const drivers = new PowerDrivers();
    const made = drivers.forNode({
      name: 'ipmi-guest',
      properties: {
        'power.driver': 'ipmi',
        'power.ipmi.address': bmc.address,
        'power.ipmi.port': String(bmc.port),
        'power.ipmi.username': USER,
        'boot.mode': 'bios',
      },
      secrets: { [IPMI_PASSWORD_SECRET]: PASSWORD },
    });
    assert.ok(made instanceof IpmiPowerDriver);
    driver = made;
  });
  after(async () => {
    await guest?.stop();
    await bmc?.stop();
    if (keep) process.stderr.write(`ipmi-bmc.test.ts: files kept in ${work}\n`);
    else rmSync(work, { recursive: true, force: true });
  });

  const status = async () => (await guest.qmp<{ status: string }>('query-status')).status;
  const nicBootIndex = () => guest.qmp<number>('qom-get', { path: '/machine/peripheral/nic0', property: 'bootindex' });
  const track = async (body: () => Promise<void>) => {
    try {
      await body();
    } catch (error) {
      keep = true;
      throw new Error(`${(error as Error).message}\n--- ipmi_sim log:\n${readLog(bmc.logPath)}\n--- console:\n${guest.consoleTail(20)}`, {
        cause: error,
      });
    }
  };

  it('powers the guest on into network boot, reads its state, resets it, sets disk boot and powers it off', () =>
    track(async () => {
      assert.equal(await driver.state(), 'off');
      assert.equal(await status(), 'prelaunch');

      await driver.powerOn('network');
      assert.equal(await status(), 'running');
      assert.equal(await nicBootIndex(), 1, 'bootdev pxe puts the NIC first');
      assert.equal(await driver.state(), 'on');
      // The machine really runs: SeaBIOS writes to the serial console.
      await guest.waitForConsole(/SeaBIOS|iPXE/, 60_000);

      const resetsBefore = guest.events.filter((event) => event.event === 'RESET').length;
      await driver.reset();
      await eventually(async () => guest.events.filter((event) => event.event === 'RESET').length > resetsBefore || undefined, {
        timeoutMs: 10_000,
      });
      assert.equal(await status(), 'running');

      await driver.setBootDevice('disk');
      assert.equal(await nicBootIndex(), 3, 'bootdev disk puts the NIC after the disk');

      await driver.powerOff();
      assert.notEqual(await status(), 'running');
      assert.equal(await driver.state(), 'off');
      // Idempotent: off again is nothing.
      await driver.powerOff();

      await driver.powerOn('disk');
      assert.equal(await status(), 'running');
      assert.equal(await nicBootIndex(), 3);
      await driver.powerOff();
    }));

  it('reports a boot device the BMC refuses with what the BMC said', () =>
    track(async () => {
      await assert.rejects(driver.setBootDevice('cd'), (error: Error) => {
        assert.ok(error instanceof IpmiError);
        assert.equal(error.kind, 'refused');
        assert.match(error.message, new RegExp(`IPMI BMC 127\\.0\\.0\\.1:${bmc.port}`));
        assert.match(error.message, /Set Chassis Boot Parameter 5 failed/);
        assert.match(error.message, /boot device override/);
        return true;
      });
    }));

  it('validate() logs in and reads the boot flags', () =>
    track(async () => {
      const checks = await driver.validate();
      assert.deepEqual(
        checks.map((check) => [check.check, check.ok]),
        [
          ['credentials', true],
          ['boot override', true],
          ['virtual media', false],
        ],
      );
    }));

  it('a wrong password fails at once, without retries, naming the BMC and the user, and never showing the password', () =>
    track(async () => {
      const wrong = 'Wrong-Pass-19';
      const tool = new Ipmitool(
        { address: bmc.address, port: bmc.port, username: USER, password: wrong, cipherSuite: 3 },
        { attempts: 3, backoffMs: 5000 },
      );
      const started = Date.now();
      await assert.rejects(tool.run(['chassis', 'power', 'status']), (error: Error) => {
        assert.ok(error instanceof IpmiError);
        assert.equal(error.kind, 'auth');
        assert.match(error.message, /rejected the password of user 'labadmin'/);
        assert.match(error.message, /RAKP 2 HMAC is invalid/);
        assert.doesNotMatch(error.message, /gave up after/);
        assert.ok(!error.message.includes(wrong) && !error.message.includes(PASSWORD));
        return true;
      });
      // No retry: the 5 s backoff would show.
      assert.ok(Date.now() - started < 4000, `took ${Date.now() - started} ms`);

      const nobody = new Ipmitool({ address: bmc.address, port: bmc.port, username: 'nobody', password: PASSWORD, cipherSuite: 3 });
      await assert.rejects(nobody.run(['chassis', 'power', 'status']), /has no user 'nobody'/);
    }));

  it('a cipher suite the BMC lacks is named', () =>
    track(async () => {
      const tool = new Ipmitool({ address: bmc.address, port: bmc.port, username: USER, password: PASSWORD, cipherSuite: 17 });
      await assert.rejects(tool.run(['chassis', 'power', 'status']), /does not offer cipher suite 17/);
    }));
});

describe('ipmi power driver faults without a BMC', { skip: skip || ipmiToolMissing() }, () => {
  let silent: Socket | undefined;
  after(() => silent?.close());

  it('a BMC that is down: bounded tries, a clear error, no hang', async () => {
    const port = await freeUdpPort(); // nothing listens: every datagram is refused
    const tool = new Ipmitool(
      { address: '127.0.0.1', port, username: USER, password: PASSWORD, cipherSuite: 3 },
      { attempts: 2, backoffMs: 100, callTimeoutMs: 15_000 },
    );
    const started = Date.now();
    await assert.rejects(tool.run(['chassis', 'power', 'status']), (error: Error) => {
      assert.ok(error instanceof IpmiError);
      assert.equal(error.kind, 'unreachable');
      assert.match(error.message, new RegExp(`IPMI BMC 127\\.0\\.0\\.1:${port} \\(user labadmin\\)`));
      assert.match(error.message, /no answer from the BMC/);
      assert.match(error.message, /gave up after 2 tries/);
      assert.ok(!error.message.includes(PASSWORD));
      return true;
    });
    assert.ok(Date.now() - started < 40_000, `took ${Date.now() - started} ms`);
  });

  it('a BMC that never answers: each call is killed at its timeout, the password is on no command line meanwhile', async () => {
    silent = createSocket('udp4');
    await new Promise<void>((resolve) => silent?.bind(0, '127.0.0.1', resolve));
    const port = silent.address().port;
    let datagrams = 0;
    silent.on('message', () => datagrams++);
    const tool = new Ipmitool(
      { address: '127.0.0.1', port, username: USER, password: PASSWORD, cipherSuite: 3 },
      { attempts: 2, backoffMs: 100, callTimeoutMs: 1500 },
    );
    const started = Date.now();
    const call = tool.run(['chassis', 'power', 'status']);
    // While ipmitool waits on the silent BMC, no process shows the password in its arguments.
    const seen = await eventually(() => processesWithArgument(`${port}`).length > 0 || undefined, { timeoutMs: 5000 });
    assert.ok(seen);
    for (const cmdline of processesWithArgument(`${port}`))
      assert.ok(!cmdline.includes(PASSWORD), `password on a command line: ${cmdline}`);
    const ps = spawnSync('ps', ['-eo', 'args'], { encoding: 'utf8' }).stdout;
    assert.ok(!ps.includes(PASSWORD), 'ps shows the password');
    await assert.rejects(call, (error: Error) => {
      assert.ok(error instanceof IpmiError);
      assert.equal(error.kind, 'timeout');
      assert.match(error.message, /got no answer within 1\.5 s \(gave up after 2 tries\)/);
      return true;
    });
    const took = Date.now() - started;
    assert.ok(took >= 3000 && took < 10_000, `took ${took} ms`);
    assert.ok(datagrams > 0, 'ipmitool sent nothing to the silent BMC');
  });

  it('the factory names what to fix and never a secret', () => {
    const drivers = new PowerDrivers();
    const base = { 'power.driver': 'ipmi', 'power.ipmi.address': '10.0.0.5', 'power.ipmi.username': 'admin' };
    assert.throws(() => drivers.forNode({ name: 'n1', properties: base, secrets: {} }), /node 'n1': .*node secret power\.ipmi\.password/);
    assert.throws(
      () => drivers.forNode({ name: 'n1', properties: { ...base, 'power.ipmi.port': '99999' }, secrets: { [IPMI_PASSWORD_SECRET]: 'x' } }),
      /power\.ipmi\.port: '99999' is not a whole number from 1 to 65535/,
    );
    assert.throws(() => ipmiDriverFromNode({ ...base, 'power.ipmi.address': '' }, { [IPMI_PASSWORD_SECRET]: 'x' }), /power\.ipmi\.address/);
    assert.throws(() => ipmiDriverFromNode({ ...base, 'boot.mode': 'efi' }, { [IPMI_PASSWORD_SECRET]: 'x' }), /boot\.mode: 'efi'/);
  });
});

function ipmiToolMissing(): string | false {
  return spawnSync('sh', ['-c', 'command -v ipmitool']).status === 0 ? false : 'ipmitool is not installed';
}

/** Command lines (NUL-separated arguments joined by spaces) of this machine's processes that have `word` among their arguments. */
function processesWithArgument(word: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    try {
      const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (args.includes(word)) found.push(args.join(' '));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

function readLog(path: string): string {
  try {
    return readFileSync(path, 'utf8').slice(-4000);
  } catch {
    return '(no log)';
  }
}
