import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { createCertificateAuthority, issueCertificate } from '../../common/certificates.js';
import { createLogger } from '../../common/logging.js';
import { PowerError } from '../../controller/power/power-driver.js';
import { RedfishPowerDriver } from '../../controller/power/redfish/driver.js';
import { RedfishConnections } from '../../controller/power/redfish/pool.js';
import { REDFISH_PASSWORD_SECRET, redfishSettings } from '../../controller/power/redfish/settings.js';
import { MemoryMachine } from '../../lab/bmc/redfish/machine.js';
import { type RedfishFaults, RedfishSimulator, type RedfishSimulatorOptions } from '../../lab/bmc/redfish/simulator.js';
import { tempDir } from '../helpers/controller.js';

/*
 * The redfish power driver against the lab's Redfish BMC (lab/bmc/redfish/,
 * held to sushy by test/lab/redfish-sushy.test.ts), with a machine in
 * memory behind it: every action, and every fault the issue lists: 500s,
 * stalls, dropped connections, expired sessions, a wrong password, no
 * virtual media, If-Match required, only some ResetTypes. Each fault ends in
 * a PowerError naming the BMC and what it said, after a bounded number of
 * requests and time, and the password is in no log line.
 */

const PASSWORD = 'Bmc-pa55word-n0t-in-logs';
const logLines: string[] = [];
const logger = createLogger({ name: 'redfish-test', level: 'trace', destination: { write: (line: string) => logLines.push(line) } });

/** Fast settings: faults must show within seconds. */
const FAST = {
  'power.redfish.request_timeout': '1s',
  'power.redfish.attempts': '3',
  'power.redfish.power_timeout': '2s',
  'power.redfish.soft_off_timeout': '600ms',
};

describe('redfish power driver', () => {
  const dir = tempDir('metalcast-redfish-');
  const started: RedfishSimulator[] = [];
  let pool: RedfishConnections;
  let isoServer: Server;
  let isoUrl: string;

  before(async () => {
    isoServer = createServer((req, res) => {
      if (req.url === '/missing.iso') res.writeHead(404).end('no such image');
      else res.writeHead(200, { 'content-type': 'application/octet-stream' }).end(Buffer.alloc(64 * 1024, 7));
    });
    await new Promise<void>((resolve) => isoServer.listen(0, '127.0.0.1', resolve));
    isoUrl = `http://127.0.0.1:${(isoServer.address() as AddressInfo).port}/agent.iso`;
  });
  afterEach(async () => {
    await pool?.close();
  });
  after(async () => {
    await Promise.all(started.map((s) => s.stop()));
    isoServer.close();
    dir.remove();
  });

  async function bmc(options: Partial<RedfishSimulatorOptions> & { faults?: RedfishFaults } = {}) {
    const machine = new MemoryMachine();
    const sim = await new RedfishSimulator({
      machine,
      name: 'rack1-node1',
      users: { admin: PASSWORD },
      resetDelayMs: 50,
      ...options,
    }).start();
    started.push(sim);
    pool = new RedfishConnections(logger);
    const driver = (properties: Record<string, string> = {}, password = PASSWORD) =>
      new RedfishPowerDriver(
        redfishSettings(
          { 'power.redfish.address': sim.url, 'power.redfish.username': 'admin', ...FAST, ...properties },
          { [REDFISH_PASSWORD_SECRET]: password },
        ),
        pool,
        { bootMethod: 'virtual-media' },
        logger,
      );
    return { sim, machine, driver };
  }

  /** Rejects with a PowerError that names the BMC first and whose message matches; returns how long it took. */
  async function failsWith(action: Promise<unknown>, pattern: RegExp): Promise<number> {
    const start = Date.now();
    await assert.rejects(action, (error: unknown) => {
      assert.ok(error instanceof PowerError, `expected a PowerError, got ${String(error)}`);
      assert.match(error.message, /^BMC https?:\/\/127\.0\.0\.1:\d+: /, 'the error names the BMC first');
      assert.match(error.message, pattern);
      return true;
    });
    return Date.now() - start;
  }

  it('powers on into a boot override, polls the state, and reads it back', async () => {
    const { sim, machine, driver } = await bmc();
    const d = driver();
    await d.powerOn('network');
    assert.equal(await d.state(), 'on');
    assert.deepEqual(machine.bootedFrom, ['Pxe']);
    assert.deepEqual(machine.actions, ['boot:Pxe:once', 'power_on']);
    // The once override was consumed by that boot.
    assert.equal(sim.bootOverride.enabled, 'Disabled');

    await d.setBootDevice('disk');
    assert.deepEqual(sim.bootOverride, { target: 'Hdd', enabled: 'Continuous', mode: 'UEFI' });
    await d.reset();
    assert.deepEqual(machine.bootedFrom, ['Pxe', 'Hdd']);
    await d.powerOff();
    assert.equal(await d.state(), 'off');
    assert.equal(machine.on, false);

    // powerOn when on is a reset into the new boot device.
    await d.powerOn('cd');
    await d.powerOn('network');
    assert.deepEqual(machine.bootedFrom, ['Pxe', 'Hdd', 'Cd', 'Pxe']);
    assert.ok(machine.actions.includes('reset'));
  });

  it('logs in once with a session shared by every driver of the BMC, sends If-Match with the ETag, and keeps to two requests in flight', async () => {
    const { sim, driver } = await bmc();
    await driver().setBootDevice('network');
    await driver().setBootDevice('disk');
    await Promise.all(Array.from({ length: 8 }, () => driver().state()));
    const logins = sim.requests.filter((r) => r.method === 'POST' && r.path.endsWith('/Sessions'));
    assert.equal(logins.length, 1, 'one session for every driver instance');
    const authed = sim.requests.filter((r) => !r.path.endsWith('/redfish/v1/') && r.method !== 'POST');
    assert.ok(
      authed.every((r) => r.auth === 'session'),
      'every request carries the X-Auth-Token',
    );
    const patches = sim.requests.filter((r) => r.method === 'PATCH');
    assert.equal(patches.length, 2);
    assert.ok(
      patches.every((r) => r.ifMatch?.startsWith('W/"')),
      'PATCH carries If-Match',
    );
    assert.ok(sim.maxInFlight <= 2, `at most 2 requests in flight, saw ${sim.maxInFlight}`);
    await pool.close();
    assert.equal(sim.sessionCount, 0, 'closing the pool ends the session');
  });

  it('sets Legacy mode for boot.mode=bios and refuses a boot target the system lacks', async () => {
    const { sim, driver } = await bmc({ firmware: 'uefi' });
    await driver({ 'boot.mode': 'bios' }).setBootDevice('cd');
    assert.deepEqual(sim.bootOverride, { target: 'Cd', enabled: 'Once', mode: 'Legacy' });
  });

  it('inserts and ejects virtual media under the manager or under the system, replacing another image', async () => {
    for (const where of ['manager', 'system'] as const) {
      const { sim, machine, driver } = await bmc({ virtualMediaUnder: where });
      const d = driver();
      await d.ejectMedia(); // nothing inserted: nothing to do
      await d.insertMedia(isoUrl);
      assert.equal(sim.insertedImage, isoUrl);
      await d.insertMedia(isoUrl); // the same image again: nothing to do
      const other = isoUrl.replace('agent.iso', 'other.iso');
      await d.insertMedia(other);
      assert.equal(sim.insertedImage, other);
      await d.ejectMedia();
      assert.equal(sim.insertedImage, undefined);
      assert.deepEqual(
        machine.actions.filter((a) => a.startsWith('insert') || a === 'eject').map((a) => a.split(':')[0]),
        ['insert', 'eject', 'insert', 'eject'],
        where,
      );
      await pool.close();
    }
  });

  it('says what the BMC said when it cannot fetch the image', async () => {
    const { driver } = await bmc();
    await failsWith(
      driver().insertMedia(isoUrl.replace('agent.iso', 'missing.iso')),
      /^BMC http:\/\/127\.0\.0\.1:\d+: POST \/redfish\/v1\/Managers\/BMC\/VirtualMedia\/Cd\/Actions\/VirtualMedia\.InsertMedia answered 400: .*could not be fetched: HTTP 404/,
    );
  });

  it('finds the system by name through the 307 to its UUID, and says when system_id names none', async () => {
    const { sim, driver } = await bmc();
    assert.equal(await driver({ 'power.redfish.system_id': 'rack1-node1' }).state(), 'off');
    assert.ok(sim.requests.some((r) => r.status === 307));
    const before = sim.requests.length;
    await failsWith(
      driver({ 'power.redfish.system_id': 'nope' }).state(),
      /GET \/redfish\/v1\/Systems\/nope answered 404: .*ResourceMissingAtURI/,
    );
    const tries = sim.requests.slice(before).filter((r) => r.path === '/redfish/v1/Systems/nope');
    assert.equal(tries.length, 1, 'a 4xx is not retried');
  });

  describe('faults', () => {
    it('retries 500s with backoff and succeeds when they stop', async () => {
      const { sim, driver } = await bmc({ faults: { serverErrors: 2 } });
      assert.equal(await driver().state(), 'off');
      assert.equal(sim.requests.filter((r) => r.status === 500).length, 2);
    });

    it('gives up on a BMC that keeps answering 500 after a bounded number of tries, quoting its message', async () => {
      const { sim, driver } = await bmc({ faults: { alwaysFail: true } });
      const took = await failsWith(
        driver().powerOn('network'),
        /^BMC http:\/\/127\.0\.0\.1:\d+: GET \/redfish\/v1\/ answered 500: Base\.1\.8\.InternalError: The BMC encountered an internal error\. — The request failed due to an internal service error\.\s+The service is still operational\.; resolution: Resubmit the request\..* \(after 3 tries\)$/,
      );
      assert.equal(sim.requests.length, 3, 'three tries, no more');
      assert.ok(took < 5000, `gave up after ${took} ms`);
    });

    it('times out a stalled BMC on every try and gives up', async () => {
      const { sim, driver } = await bmc({ faults: { stall: true } });
      const took = await failsWith(driver().state(), /GET \/redfish\/v1\/: no complete answer within 1000 ms \(after 3 tries\)$/);
      assert.equal(sim.requests.length, 3);
      assert.ok(took >= 3000 && took < 9000, `gave up after ${took} ms`);
    });

    it('retries a dropped connection, and says so when the BMC keeps dropping it', async () => {
      const once = await bmc({ faults: { dropConnections: 1 } });
      assert.equal(await once.driver().state(), 'off');
      await pool.close();
      const always = await bmc({ faults: { dropConnections: 100 } });
      await failsWith(always.driver().state(), /GET \/redfish\/v1\/: the BMC closed the connection \(after 3 tries\)$/);
      assert.equal(always.sim.requests.length, 3);
    });

    it('logs in again when the session expired (401), and carries on', async () => {
      const { sim, driver } = await bmc();
      const d = driver();
      await d.state();
      sim.expireSessions();
      assert.equal(await d.state(), 'off');
      const trail = sim.requests.map((r) => `${r.method} ${r.path.replace(/[0-9a-f-]{36}/, 'ID')} ${r.status}`);
      assert.deepEqual(trail.slice(-4), [
        'GET /redfish/v1/Systems/ID 401',
        'GET /redfish/v1/ 200',
        'POST /redfish/v1/SessionService/Sessions 201',
        'GET /redfish/v1/Systems/ID 200',
      ]);
    });

    it('refuses a wrong password at once, without retrying or falling back to Basic', async () => {
      const { sim, driver } = await bmc();
      await failsWith(
        driver({}, 'wrong-password').powerOn('network'),
        /^BMC http:\/\/127\.0\.0\.1:\d+: the BMC refused the credentials of user 'admin' \(check power\.redfish\.username and the secret power\.redfish\.password\): POST \/redfish\/v1\/SessionService\/Sessions answered 401: Base\.1\.8\.NoValidSession: The user name or password is not valid\./,
      );
      assert.equal(sim.requests.filter((r) => r.method === 'POST').length, 1, 'one login attempt: BMCs lock accounts');
      assert.ok(!sim.requests.some((r) => r.auth === 'basic'));
    });

    it('uses Basic when the BMC has no session service', async () => {
      const { sim, driver } = await bmc({ faults: { noSessionService: true } });
      await driver().powerOn('disk');
      const authed = sim.requests.filter((r) => r.path !== '/redfish/v1/');
      assert.ok(authed.length > 0 && authed.every((r) => r.auth === 'basic'));
      await failsWith(driver({}, 'wrong').state(), /refused the credentials of user 'admin'.*answered 401/);
    });

    it('says the BMC has no virtual media', async () => {
      const { driver } = await bmc({ faults: { noVirtualMedia: true } });
      await failsWith(
        driver().insertMedia(isoUrl),
        /has no VirtualMedia, and neither has any manager of it: this BMC has no virtual media/,
      );
    });

    it('meets a BMC that requires If-Match, which refuses a PATCH without one', async () => {
      const { sim, driver } = await bmc({ faults: { requireIfMatch: true } });
      await driver().setBootDevice('network');
      assert.equal(sim.bootOverride.target, 'Pxe');
      const token = await fetch(`${sim.url}/redfish/v1/SessionService/Sessions`, {
        method: 'POST',
        body: JSON.stringify({ UserName: 'admin', Password: PASSWORD }),
      }).then((r) => r.headers.get('x-auth-token') ?? '');
      const bare = await fetch(`${sim.url}${sim.systemPath}`, {
        method: 'PATCH',
        headers: { 'x-auth-token': token },
        body: JSON.stringify({ Boot: { BootSourceOverrideTarget: 'Hdd' } }),
      });
      assert.equal(bare.status, 428);
    });

    it('uses the ResetTypes the system allows, and names them when none fits', async () => {
      const graceful = await bmc({ faults: { resetTypes: ['On', 'GracefulShutdown', 'GracefulRestart'] } });
      await graceful.driver().powerOn('network');
      await graceful.driver().powerOff();
      assert.ok(graceful.machine.actions.includes('power_button'), 'off through GracefulShutdown');
      graceful.machine.acpi = false;
      await graceful.driver().powerOn('network');
      await failsWith(graceful.driver().powerOff(), /was not off 0\.6 s after GracefulShutdown, and it does not allow ForceOff/);
      await pool.close();

      const forced = await bmc({ faults: { resetTypes: ['ForceOn', 'ForceOff'] } });
      await forced.driver().powerOn('network');
      await forced.driver().reset(); // no restart type: off, then on
      assert.deepEqual(forced.machine.actions.slice(-3), ['power_on', 'power_off', 'power_on']);
      await pool.close();

      const offOnly = await bmc({ faults: { resetTypes: ['ForceOff'] } });
      await failsWith(offOnly.driver().powerOn('network'), /allows no ResetType to power on \(On or ForceOn\); it allows ForceOff$/);
    });

    it('falls back from GracefulShutdown to ForceOff when the OS ignores it', async () => {
      const { machine, driver } = await bmc();
      machine.acpi = false;
      await driver().powerOn('network');
      const start = Date.now();
      await driver().softPowerOff();
      assert.ok(Date.now() - start >= 600, 'waited the soft-off timeout');
      assert.deepEqual(machine.actions.slice(-2), ['power_button', 'power_off']);
      assert.equal(machine.on, false);
    });

    it('gives up polling a power state that never changes', async () => {
      const { driver } = await bmc({ faults: { powerStuck: true } });
      const took = await failsWith(driver().powerOn('network'), /did not reach PowerState On within 2 s after ResetType On \(it is Off\)$/);
      assert.ok(took < 6000);
    });
  });

  describe('TLS', () => {
    it('verifies the BMC certificate by default, with power.redfish.ca_file, or not at all when told', async () => {
      const ca = await createCertificateAuthority({ commonName: 'BMC CA', validDays: 2 });
      const leaf = await issueCertificate(ca, { commonName: 'bmc', hosts: ['127.0.0.1'], usage: 'server', validDays: 2 });
      const caFile = join(dir.path, 'bmc-ca.pem');
      writeFileSync(caFile, ca.certPem);
      const { sim, driver } = await bmc({ tls: { key: leaf.keyPem, cert: leaf.certPem } });
      assert.match(sim.url, /^https:/);
      await failsWith(
        driver().state(),
        /the BMC's TLS certificate is not trusted .*power\.redfish\.ca_file.*power\.redfish\.verify_tls=false/,
      );
      assert.equal(sim.requests.length, 0, 'no request got through, and none was retried');
      assert.equal(await driver({ 'power.redfish.ca_file': caFile }).state(), 'off');
      assert.equal(await driver({ 'power.redfish.verify_tls': 'false' }).state(), 'off');
    });
  });

  describe('validate', () => {
    it('reports reachability, credentials, system, reset types, boot override and virtual media', async () => {
      const { driver } = await bmc();
      const rows = await driver().validate();
      assert.deepEqual(
        rows.map((r) => [r.check, r.ok]),
        [
          ['reachability', true],
          ['credentials', true],
          ['system', true],
          ['reset types', true],
          ['boot override', true],
          ['virtual media', true],
        ],
      );
      assert.match(rows[1]?.detail ?? '', /user 'admin' logged in \(session, X-Auth-Token\)/);
      assert.match(rows[5]?.detail ?? '', /\/redfish\/v1\/Managers\/BMC\/VirtualMedia\/Cd \(CD, DVD\), empty/);
    });

    it('fails the rows it cannot pass and says why', async () => {
      const { driver } = await bmc({ faults: { noVirtualMedia: true, resetTypes: ['ForceOff'] } });
      const rows = await driver().validate();
      assert.deepEqual(
        rows.map((r) => [r.check, r.ok]),
        [
          ['reachability', true],
          ['credentials', true],
          ['system', true],
          ['reset types', false],
          ['boot override', true],
          ['virtual media', false],
        ],
      );
      assert.match(rows[3]?.detail ?? '', /cannot power on \(On or ForceOn\); the system allows ForceOff/);
      const refused = await driver({}, 'wrong').validate();
      assert.deepEqual(
        refused.map((r) => r.ok),
        [true, false, false, false, false, false],
      );
      assert.match(refused[1]?.detail ?? '', /refused the credentials/);
      await pool.close();
      const { sim: down, driver: unreachable } = await bmc();
      await down.stop();
      const none = await unreachable().validate();
      assert.equal(none[0]?.ok, false);
      assert.match(none[0]?.detail ?? '', /connection refused/);
    });
  });

  it('writes the password into no log line', () => {
    assert.ok(logLines.length > 20, 'the driver logged');
    const basic = Buffer.from(`admin:${PASSWORD}`).toString('base64');
    assert.deepEqual(
      logLines.filter((line) => line.includes(PASSWORD) || line.includes(basic)),
      [],
    );
  });
});
