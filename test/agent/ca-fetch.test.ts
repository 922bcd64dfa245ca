import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { agentCmdline } from '../../controller/boot/agent-cmdline.js';
import { caPin, caPinOfPem, pinnedCertificate } from '../../common/ca-pin.js';
import { loadControllerConfig } from '../../controller/config.js';
import { startController } from '../../controller/controller.js';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, msg, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir, testLogger } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';
import { X509Certificate } from 'node:crypto';

/*
 * TLS from the first packet: a network-booted agent has no CA baked in. The
 * controller serves its CA at /ca.pem on its HTTP endpoint and puts the CA's
 * sha256 and that URL on the ramdisk's kernel command line; the agent
 * fetches the CA, keeps only the certificate with that fingerprint, and
 * talks TLS with it. A CA that does not match is refused at once; a URL that
 * does not answer is tried a bounded number of times.
 */

const QUICK = {
  heartbeatTimeout: '20s',
  heartbeatIntervalMin: '300ms',
  heartbeatIntervalMax: '600ms',
  sweepInterval: '500ms',
  heartbeatFlushInterval: '50ms',
  startupGrace: '0s',
};

describe('TLS from the first packet: the agent pins the CA it fetches', () => {
  const dirs = tempDir('metalcast-ca-fetch-');
  const agents: AgentProcess[] = [];
  const servers: Server[] = [];
  let pki: TestPki;
  let strangers: TestPki;
  let t: TestController;
  let httpBase: string;
  let pin: string;

  before(async () => {
    pki = await makeTestPki(dirs.path);
    strangers = await makeTestPki(dirs.path, 'strangers-');
    t = await startTestController({ ...QUICK, ...pki.controllerFlags, agentCa: pki.caFile }, undefined, { caPem: pki.ca.certPem });
    httpBase = `http://${t.controller.httpAddress}`;
    pin = caPin(new X509Certificate(pki.ca.certPem));
  });
  afterEach(async () => {
    await Promise.all(agents.splice(0).map((a) => a.kill('SIGKILL')));
  });
  after(async () => {
    for (const server of servers) server.close();
    await t?.destroy();
    dirs.remove();
  });

  /** An HTTP server answering every request with `body`. */
  const serve = async (body: string): Promise<string> => {
    const server = createServer((_req, res) => res.writeHead(200, { 'content-type': 'application/x-pem-file' }).end(body));
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}/ca.pem`;
  };

  it('the controller serves its CA at /ca.pem and pins it on the ramdisk command line, without metalcast.insecure', async () => {
    const served = await (await fetch(`${httpBase}/ca.pem`)).text();
    assert.equal(caPinOfPem(served), pin);
    const machine = await uniqueFakeMachine(join(dirs.path, 'm0'), 400);
    const mac = machine.macs[0] as string;
    await t.nodes.createNode({ name: 'boot1', macAddresses: [mac] });
    await t.nodes.setProvisionState({ node: 'boot1', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setProvisionState({ node: 'boot1', action: ProvisionAction.PROVISION_ACTION_INSPECT });
    const script = await (await fetch(`${httpBase}/ipxe/mac/${mac.replaceAll(':', '-')}`)).text();
    assert.match(script, new RegExp(`metalcast\\.ca_fingerprint=${pin}( |$)`, 'm'));
    assert.match(script, new RegExp(`metalcast\\.ca_url=${httpBase.replaceAll('.', '\\.')}/ca\\.pem( |$)`, 'm'));
    assert.doesNotMatch(script, /metalcast\.insecure/);
  });

  it('an agent with only --ca-url and --ca-fingerprint looks up and heartbeats over TLS', async () => {
    const machine = await uniqueFakeMachine(join(dirs.path, 'm1'), 401);
    await t.nodes.createNode({ name: 'pin1', macAddresses: [machine.macs[0] as string] });
    await t.nodes.setProvisionState({ node: 'pin1', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setProvisionState({ node: 'pin1', action: ProvisionAction.PROVISION_ACTION_INSPECT });
    const agent = spawnAgent({
      controller: t.controller.grpcAddress,
      root: machine.root,
      'ca-url': `${httpBase}/ca.pem`,
      'ca-fingerprint': pin,
    });
    agents.push(agent);
    const fetched = await agent.waitForLog(msg('fetched the controller CA'));
    assert.equal(fetched.fingerprint, pin);
    assert.ok(!agent.logs.some((l) => typeof l.msg === 'string' && l.msg.includes('plaintext')), 'no plaintext warning');
    const node = await eventually(
      async () => {
        const { node } = await t.nodes.getNode({ node: 'pin1' });
        if (node?.lastError) throw new Error(node.lastError);
        return node?.provisionState === ProvisionState.PROVISION_STATE_MANAGEABLE ? node : undefined;
      },
      { timeoutMs: 30_000, what: 'pin1 to be inspected' },
    );
    assert.equal(node.inventory?.interfaces[0]?.macAddress, machine.macs[0]);
  });

  it('only the pinned certificate of a bundle is trusted: a bundle that adds another CA does not smuggle it in', async () => {
    const bundle = `${strangers.ca.certPem}\n${pki.ca.certPem}`;
    const kept = pinnedCertificate(bundle, pin);
    assert.ok(kept);
    assert.equal(caPinOfPem(kept.pem), pin);
    assert.equal((kept.pem.match(/BEGIN CERTIFICATE/g) ?? []).length, 1);
    assert.equal(pinnedCertificate(strangers.ca.certPem, pin), undefined);
  });

  it('refuses a CA that does not match the fingerprint, at once, and never talks to the controller', async () => {
    const machine = await uniqueFakeMachine(join(dirs.path, 'm2'), 402);
    const url = await serve(strangers.ca.certPem);
    const started = Date.now();
    const agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, 'ca-url': url, 'ca-fingerprint': pin });
    agents.push(agent);
    let stderr = '';
    agent.child.stderr?.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    assert.equal(await agent.exited, 1);
    assert.ok(Date.now() - started < 15_000);
    assert.match(
      stderr,
      new RegExp(`refusing the CA from ${url.replaceAll('.', '\\.')}: it holds sha256:[0-9a-f]{64}, not the pinned ${pin}`),
    );
    assert.ok(!agent.logs.some((l) => l.msg === 'looked up'), 'it looked up anyway');
  });

  it('gives up on a CA URL that does not answer after the bounded number of tries, saying which URL', async () => {
    const machine = await uniqueFakeMachine(join(dirs.path, 'm3'), 403);
    // A port that was just free: nothing listens there.
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const deadPort = (probe.address() as AddressInfo).port;
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    const deadUrl = `http://127.0.0.1:${deadPort}/ca.pem`;
    const started = Date.now();
    const agent = spawnAgent({
      controller: t.controller.grpcAddress,
      root: machine.root,
      'ca-url': deadUrl,
      'ca-fingerprint': pin,
      'ca-fetch-attempts': '3',
    });
    agents.push(agent);
    let stderr = '';
    agent.child.stderr?.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    assert.equal(await agent.exited, 1);
    const took = Date.now() - started;
    // Tries 1 s and 2 s apart: about 3 s, far from forever.
    assert.ok(took >= 2900 && took < 20_000, `took ${took} ms`);
    assert.match(
      stderr,
      new RegExp(
        `cannot fetch the controller CA from http://127\\.0\\.0\\.1:${deadPort}/ca\\.pem \\(metalcast\\.ca_url\\) after 3 tries: ECONNREFUSED`,
      ),
    );
    assert.equal(agent.logs.filter((l) => l.msg === 'fetching the controller CA failed').length, 3);
  });

  it('--ca-url without --ca-fingerprint, or with --insecure, is a configuration error (exit code 2)', async () => {
    const machine = await uniqueFakeMachine(join(dirs.path, 'm4'), 404);
    for (const [flags, pattern] of [
      [{ 'ca-url': `${httpBase}/ca.pem` }, /--ca-url \(metalcast\.ca_url\) needs --ca-fingerprint/],
      [{ 'ca-url': `${httpBase}/ca.pem`, 'ca-fingerprint': pin, insecure: 'true' }, /--insecure contradicts --ca-url/],
      [{ 'ca-url': `${httpBase}/ca.pem`, 'ca-fingerprint': 'sha256:ABC' }, /is not of the form sha256:<64 lowercase hex digits>/],
    ] as const) {
      const agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root, ...flags });
      agents.push(agent);
      let stderr = '';
      agent.child.stderr?.on('data', (chunk: Buffer) => {
        stderr += chunk.toString();
      });
      assert.equal(await agent.exited, 2, stderr);
      assert.match(stderr, pattern);
    }
  });

  it('agentCmdline pins the CA only over TLS', () => {
    const ca = { fingerprint: pin, url: 'http://10.0.0.1:9350/ca.pem' };
    assert.equal(
      agentCmdline({ controllerAddress: '10.0.0.1:7350', insecure: false, ca }),
      `console=ttyS0 metalcast.controller=10.0.0.1:7350 metalcast.ca_fingerprint=${pin} metalcast.ca_url=http://10.0.0.1:9350/ca.pem`,
    );
    assert.equal(
      agentCmdline({ controllerAddress: '10.0.0.1:7350', insecure: true, ca }),
      'console=ttyS0 metalcast.controller=10.0.0.1:7350 metalcast.insecure',
    );
  });

  it('a controller refuses to start with an --agent-ca that did not sign its certificate', async () => {
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dirs.path, 'bad'),
        ...pki.controllerFlags,
        agentCa: strangers.caFile,
      },
      {},
    );
    await assert.rejects(startController(config, testLogger()), /--agent-ca .*strangers-ca\.pem .* did not sign --tls-cert/);
  });
});
