import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { freePort } from '../helpers/controller-process.js';
import { startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

/*
 * What a real agent process says when its lookups fail, line by line, for the
 * mistakes a new user makes: --insecure against a TLS controller, and the
 * controller's metrics port (printed right next to its gRPC port) as
 * --controller. It used to say "cannot reach the controller … check the
 * address and the network" for both; it now says what is wrong, as the CLI
 * does. A port where nothing listens still gets "cannot reach".
 */
describe('agent: why a lookup fails', () => {
  const dir = tempDir('metalcast-agent-diagnosis-');
  let pki: TestPki;
  let t: TestController;
  let agent: AgentProcess | undefined;
  let root: string;

  before(async () => {
    pki = await makeTestPki(dir.path);
    t = await startTestController({ ...pki.controllerFlags }, undefined, { caPem: pki.ca.certPem });
    root = (await uniqueFakeMachine(join(dir.path, 'm0'), 880)).root;
  });
  afterEach(async () => {
    await agent?.kill('SIGTERM');
    agent = undefined;
  });
  after(async () => {
    await t?.destroy();
    dir.remove();
  });

  const lookupFailures = (a: AgentProcess) =>
    a.logs.filter((l) => typeof l.msg === 'string' && l.msg.startsWith('lookup failed: ')).map((l) => l.msg as string);

  it('says the controller speaks TLS when the agent runs with --insecure', async () => {
    const controller = t.controller.grpcAddress;
    agent = spawnAgent({ controller, root, insecure: 'true' });
    const expected = `lookup failed: the controller at ${controller} speaks TLS, and this agent runs with --insecure (plaintext): give the agent --ca (metalcast.ca= on the kernel command line) with the CA bundle that signed the controller's certificate`;
    await agent.waitForLog((l) => l.msg === expected && (l.attempt as number) >= 2, 20_000);
    assert.deepEqual(
      lookupFailures(agent).filter((m) => m !== expected),
      [],
      'every lookup failure says so, the first included',
    );
  });

  it('says the metrics port is an HTTP endpoint, with TLS and without', async () => {
    const metrics = t.controller.httpAddress;
    const expected = `lookup failed: the controller at ${metrics} is an HTTP endpoint, not the gRPC API (it is the controller's --metrics-listen port, which serves /metrics and network boot?): give --controller (metalcast.controller=) the gRPC address, the --listen one (port 7350 by default)`;
    for (const flags of [{ ca: pki.caFile }, { insecure: 'true' }] as Record<string, string>[]) {
      agent = spawnAgent({ controller: metrics, root, ...flags });
      await agent.waitForLog((l) => l.msg === expected && (l.attempt as number) >= 2, 20_000);
      assert.deepEqual(
        lookupFailures(agent).filter((m) => m !== expected),
        [],
        JSON.stringify(flags),
      );
      await agent.kill('SIGTERM');
    }
  });

  it('still says "cannot reach" where nothing listens, and keeps the raw gRPC text to debug lines', async () => {
    const port = await freePort();
    agent = spawnAgent({ controller: `127.0.0.1:${port}`, root, ca: pki.caFile });
    const expected = `lookup failed: cannot reach the controller at 127.0.0.1:${port}: check the address (--controller, metalcast.controller=) and the network`;
    await agent.waitForLog((l) => l.msg === expected && (l.attempt as number) >= 2, 20_000);
    const warnings = agent.logs.filter((l) => (l.level as number) >= 40).map((l) => JSON.stringify(l));
    assert.deepEqual(
      warnings.filter((line) => /Resolution note|No connection established/.test(line)),
      [],
      'no raw grpc-js text above debug',
    );
  });
});
