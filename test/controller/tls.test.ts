import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes, X509Certificate } from 'node:crypto';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { ServerCredentials } from '@grpc/grpc-js';
import { ClientError, createChannel, createClient, createServer, Metadata, Status } from 'nice-grpc';
import { HealthDefinition, HealthServiceImpl } from 'nice-grpc-server-health';
import { createCertificateAuthority, issueCertificate } from '../../common/certificates.js';
import { loadServerTls, TLS_MIN_VERSION, tlsClient } from '../../common/tls.js';
import { CLIENT_CERTIFICATE_KEY } from '../../controller/auth/operator-tls.js';
import type { UploadImageRequest } from '../../gen/metalcast/v1/image.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { spawnController } from '../helpers/controller-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
const run = promisify(execFile);

/** Runs `metalcast controller` with these flags and returns how it exited (it should not get as far as serving). */
async function controllerExit(args: string[], dataDir: string): Promise<{ code: number; stderr: string }> {
  return run(
    process.execPath,
    [BIN, 'controller', '--listen', '127.0.0.1:0', '--metrics-listen', '127.0.0.1:0', '--data-dir', dataDir, ...args],
    {
      timeout: 20_000,
      env: { ...process.env, METALCAST_INSECURE: '', METALCAST_TLS_CERT: '', METALCAST_TLS_KEY: '' },
    },
  ).then(
    () => ({ code: 0, stderr: '' }),
    (error: { code: number; stderr: string }) => ({ code: error.code, stderr: error.stderr }),
  );
}

/** The protocol a raw TLS client offering [min, max] ends up with, or the error. */
function handshake(port: number, minVersion: tls.SecureVersion, maxVersion: tls.SecureVersion): Promise<string> {
  return new Promise((resolve) => {
    const socket = tls.connect({ host: '127.0.0.1', port, minVersion, maxVersion, ALPNProtocols: ['h2'], rejectUnauthorized: false });
    socket.once('secureConnect', () => {
      resolve(`${socket.getProtocol()} ${socket.alpnProtocol}`);
      socket.destroy();
    });
    socket.once('error', (error) => resolve(`error: ${error.message}`));
  });
}

describe('controller TLS', () => {
  const dir = tempDir('metalcast-tls-');
  let pki: TestPki;
  let other: TestPki;

  before(async () => {
    pki = await makeTestPki(dir.path);
    other = await makeTestPki(dir.path, 'other-');
  });
  after(() => dir.remove());

  it('refuses to start without TLS or --insecure, or with files it cannot use: exit code 2 and what to do', async () => {
    const data = join(dir.path, 'refused');
    const none = await controllerExit([], data);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /the gRPC API serves TLS: give --tls-cert and --tls-key .*metalcast tls init.*or --insecure/);

    const mismatched = await controllerExit(['--tls-cert', pki.controller.cert, '--tls-key', pki.admin.key], data);
    assert.equal(mismatched.code, 2);
    assert.match(mismatched.stderr, /--tls-key .*admin-key\.pem does not match the certificate in --tls-cert .*controller\.pem/);

    const unreadable = await controllerExit(['--tls-cert', join(dir.path, 'missing.pem'), '--tls-key', pki.controller.key], data);
    assert.equal(unreadable.code, 2);
    assert.match(unreadable.stderr, /--tls-cert: cannot read .*missing\.pem: no such file/);

    const swapped = await controllerExit(['--tls-cert', pki.controller.key, '--tls-key', pki.controller.cert], data);
    assert.equal(swapped.code, 2);
    assert.match(swapped.stderr, /holds no PEM certificate \(it holds a private key: is it the key file\?\)/);
    assert.match(swapped.stderr, /--tls-key .* holds no usable PEM private key/);

    const expiredCa = await createCertificateAuthority({ commonName: 'old CA', validDays: 10, now: Date.now() - 30 * 86_400_000 });
    const expired = await issueCertificate(expiredCa, {
      commonName: 'old',
      hosts: ['127.0.0.1'],
      usage: 'server',
      validDays: 10,
      now: Date.now() - 30 * 86_400_000,
    });
    await writeFile(join(dir.path, 'expired.pem'), expired.certPem);
    await writeFile(join(dir.path, 'expired-key.pem'), expired.keyPem);
    const old = await controllerExit(['--tls-cert', join(dir.path, 'expired.pem'), '--tls-key', join(dir.path, 'expired-key.pem')], data);
    assert.equal(old.code, 2);
    assert.match(old.stderr, /the certificate expired on .*; make a new one/);

    const both = await controllerExit(['--insecure', '--tls-cert', pki.controller.cert, '--tls-key', pki.controller.key], data);
    assert.equal(both.code, 2);
    assert.match(both.stderr, /--insecure contradicts --tls-cert, --tls-key/);
  });

  it('says at start that --insecure serves plaintext, and with TLS which certificate it serves', async () => {
    const insecure = await spawnController({ 'data-dir': join(dir.path, 'insecure'), 'operator-auth': 'none' });
    try {
      const warning = insecure.logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith('serving gRPC in plaintext (--insecure)'));
      assert.equal(warning?.level, 40);
      assert.equal(insecure.logs.find((l) => l.msg === 'controller started')?.tls, 'off (--insecure)');
    } finally {
      await insecure.kill('SIGTERM');
    }
    const secure = await spawnController(
      { 'data-dir': join(dir.path, 'secure'), 'operator-auth': 'none', 'tls-cert': pki.controller.cert, 'tls-key': pki.controller.key },
      20_000,
      { caPem: pki.ca.certPem },
    );
    try {
      const started = secure.logs.find((l) => l.msg === 'controller started');
      const summary = started?.tls as { subject: string; names: string; fingerprint: string };
      assert.equal(summary.subject, 'CN=test controller');
      assert.match(summary.names, /IP Address:127\.0\.0\.1/);
      assert.match(summary.fingerprint, /^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
      assert.ok(!secure.logs.some((l) => typeof l.msg === 'string' && l.msg.includes('plaintext')));
      // The helper's TLS channel works: the API is there.
      const health = createClient(HealthDefinition, secure.channel);
      assert.equal((await health.check({ service: '' })).status, 1);

      // A plaintext client fails, and the controller says who and why.
      const plain = createChannel(secure.grpcAddress);
      try {
        await assert.rejects(
          createClient(HealthDefinition, plain).check({ service: '' }, { signal: AbortSignal.timeout(5000) }),
          (error: unknown) => {
            assert.ok(error instanceof ClientError);
            assert.equal(error.code, Status.UNAVAILABLE);
            return true;
          },
        );
      } finally {
        plain.close();
      }
      const refused = await eventually(
        () => secure.logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith('a client spoke plaintext to this controller')),
        { what: 'the log line about the plaintext client' },
      );
      assert.equal(refused.level, 40);
      assert.match(refused.peer as string, /^127\.0\.0\.1:\d+$/);
      assert.match(refused.msg as string, /agents need --ca/);
    } finally {
      await secure.kill('SIGTERM');
    }
  });

  it("'metalcast tls init' writes a CA, a controller certificate for the hosts and an admin certificate, and never overwrites", async () => {
    const out = join(dir.path, 'init');
    const init = () =>
      run(process.execPath, [BIN, 'tls', 'init', '--dir', out, '--host', 'ctl1.example.net,10.0.0.5'], { timeout: 20_000 }).then(
        ({ stdout }) => ({ code: 0, stdout, stderr: '' }),
        (error: { code: number; stdout: string; stderr: string }) => ({ code: error.code, stdout: error.stdout, stderr: error.stderr }),
      );
    const first = await init();
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /--tls-cert .*controller\.pem --tls-key .*controller-key\.pem/);
    const file = (name: string) => join(out, name);
    for (const key of ['ca-key.pem', 'controller-key.pem', 'admin-key.pem']) assert.equal(statSync(file(key)).mode & 0o777, 0o600, key);
    const ca = new X509Certificate(readFileSync(file('ca.pem')));
    const controller = new X509Certificate(readFileSync(file('controller.pem')));
    const admin = new X509Certificate(readFileSync(file('admin.pem')));
    assert.ok(ca.ca);
    assert.ok(controller.verify(ca.publicKey) && admin.verify(ca.publicKey), 'signed by the CA');
    assert.equal(controller.checkHost('ctl1.example.net'), 'ctl1.example.net');
    assert.equal(controller.checkIP('10.0.0.5'), '10.0.0.5');
    assert.match(admin.subject, /OU=admin/);
    assert.doesNotThrow(() => loadServerTls({ cert: file('controller.pem'), key: file('controller-key.pem'), clientCa: file('ca.pem') }));
    const before = readFileSync(file('ca.pem'), 'utf8');

    const again = await init();
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already exist; not overwriting/);
    assert.equal(readFileSync(file('ca.pem'), 'utf8'), before);
  });

  describe('protocol versions', () => {
    const saved = { min: tls.DEFAULT_MIN_VERSION, ciphers: tls.DEFAULT_CIPHERS };
    let t: TestController;
    let control: ReturnType<typeof createServer>;
    let controlPort: number;

    before(async () => {
      // What Node would accept if told to (--tls-min-v1.0, a cipher list at security level 0): only our floor refuses it then.
      tls.DEFAULT_MIN_VERSION = 'TLSv1';
      tls.DEFAULT_CIPHERS = 'DEFAULT@SECLEVEL=0';
      t = await startTestController({ ...pki.controllerFlags, operatorAuth: 'none' }, undefined, { caPem: pki.ca.certPem });
      control = createServer();
      control.add(HealthDefinition, HealthServiceImpl());
      controlPort = await control.listen(
        '127.0.0.1:0',
        ServerCredentials.createSsl(null, [
          { private_key: Buffer.from(pki.controller.keyPem), cert_chain: Buffer.from(pki.controller.certPem) },
        ]),
      );
    });
    after(async () => {
      control.forceShutdown();
      await t.destroy();
      tls.DEFAULT_MIN_VERSION = saved.min;
      tls.DEFAULT_CIPHERS = saved.ciphers;
    });

    it('negotiates TLS 1.3 with h2, still accepts 1.2, and refuses 1.1 and 1.0', async () => {
      assert.equal(TLS_MIN_VERSION, 'TLSv1.2');
      const port = Number(t.controller.grpcAddress.split(':').at(-1));
      assert.equal(await handshake(port, 'TLSv1.2', 'TLSv1.3'), 'TLSv1.3 h2');
      assert.equal(await handshake(port, 'TLSv1.2', 'TLSv1.2'), 'TLSv1.2 h2');
      assert.match(await handshake(port, 'TLSv1', 'TLSv1.1'), /^error: .*alert protocol version/);
      assert.match(await handshake(port, 'TLSv1', 'TLSv1'), /^error: .*alert protocol version/);
      // The control: grpc-js's own createSsl() would have taken 1.1 here.
      assert.equal(await handshake(controlPort, 'TLSv1', 'TLSv1.1'), 'TLSv1.1 h2');
    });
  });

  describe('operator client certificates (--tls-client-ca)', () => {
    let t: TestController;
    const channels: ReturnType<typeof createChannel>[] = [];
    const nodesAs = (client?: { certPem: string; keyPem: string }, caPem = pki.ca.certPem) => {
      const secure = tlsClient(t.controller.grpcAddress, { caPem, client });
      const channel = createChannel(t.controller.grpcAddress, secure.credentials, secure.channelOptions);
      channels.push(channel);
      return createClient(NodeServiceDefinition, channel);
    };
    const code = (promise: Promise<unknown>) =>
      promise.then(
        () => 'OK',
        (error: unknown) => (error instanceof ClientError ? Status[error.code] : String(error)),
      );

    before(async () => {
      t = await startTestController({ ...pki.controllerFlags, tlsClientCa: pki.caFile }, undefined, { caPem: pki.ca.certPem });
    });
    after(async () => {
      for (const channel of channels) channel.close();
      await t.destroy();
    });

    it('gives OU=admin the admin role and OU=reader the reader role; other certificates and none count for nothing', async () => {
      const admin = nodesAs(pki.admin);
      const reader = nodesAs(pki.reader);
      assert.equal(await code(admin.createNode({ name: 'by-cert', macAddresses: ['52:54:00:aa:00:01'] })), 'OK');
      assert.equal(await code(reader.listNodes({})), 'OK');
      assert.equal(await code(reader.getNode({ node: 'by-cert' })), 'OK');
      assert.equal(await code(reader.deleteNode({ node: 'by-cert' })), 'PERMISSION_DENIED');
      // A certificate from another CA: the handshake succeeds (agents have none either), the certificate gives nothing.
      assert.equal(await code(nodesAs(other.admin).listNodes({})), 'UNAUTHENTICATED');
      assert.equal(await code(nodesAs(undefined).listNodes({})), 'UNAUTHENTICATED');
      // A token still works beside certificates.
      assert.equal(await code(t.nodes.listNodes({})), 'OK');
    });

    it('the CLI verifies the controller with --ca, presents --cert/--key, and says what is wrong when TLS does not fit', async () => {
      const cli = (args: string[], env: Record<string, string> = {}) =>
        run(process.execPath, [BIN, 'node', 'list', '--json', ...args], {
          timeout: 20_000,
          cwd: dir.path,
          env: {
            ...Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('METALCAST_'))),
            METALCAST_CONTROLLER: t.controller.grpcAddress,
            ...env,
          },
        }).then(
          ({ stdout }) => ({ code: 0, stdout, stderr: '' }),
          (error: { code: number; stdout: string; stderr: string }) => ({ code: error.code, stdout: error.stdout, stderr: error.stderr }),
        );
      const byCertificate = await cli(['--ca', pki.caFile, '--cert', pki.reader.cert, '--key', pki.reader.key]);
      assert.equal(byCertificate.code, 0, byCertificate.stderr);
      const byEnvironment = await cli([], { METALCAST_CA: pki.caFile, METALCAST_TOKEN: t.adminToken });
      assert.equal(byEnvironment.code, 0, byEnvironment.stderr);

      const untrusted = await cli(['--token', t.adminToken]);
      assert.equal(untrusted.code, 5);
      assert.match(untrusted.stderr, /the certificate of the controller at .* is not signed by a CA in Node's bundled CAs \(give --ca\)/);
      const plaintext = await cli(['--insecure', '--token', t.adminToken]);
      assert.equal(plaintext.code, 5);
      assert.match(plaintext.stderr, /the controller at .* speaks TLS: leave out --insecure \(METALCAST_INSECURE\) and give --ca/);
      const contradictory = await cli(['--insecure', '--ca', pki.caFile]);
      assert.equal(contradictory.code, 2);
      assert.match(contradictory.stderr, /--insecure contradicts --ca/);
      const mismatched = await cli(['--ca', pki.caFile, '--cert', pki.reader.cert, '--key', pki.admin.key]);
      assert.equal(mismatched.code, 2);
      assert.match(mismatched.stderr, /--key .* does not match the certificate in --cert/);
    });

    it('cannot be forged with call metadata, over TLS or plaintext', async () => {
      const forged = { metadata: Metadata({ [CLIENT_CERTIFICATE_KEY]: 'fingerprint=AA&cn=mallory&ou=admin' }) };
      assert.equal(await code(nodesAs(undefined).listNodes({}, forged)), 'UNAUTHENTICATED');
      const plain = await startTestController({});
      try {
        assert.equal(await code(createClient(NodeServiceDefinition, plain.channel).listNodes({}, forged)), 'UNAUTHENTICATED');
      } finally {
        await plain.destroy();
      }
    });
  });
  it('controllers copy images from each other over TLS, verifying each other with --tls-ca', async () => {
    const database = `sqlite:${join(dir.path, 'shared.db')}`;
    const common = { database, imageSyncInterval: '500ms', ...pki.controllerFlags, tlsCa: pki.caFile };
    const a = await startTestController({ ...common, controllerId: 'a', dataDir: join(dir.path, 'a') }, undefined, {
      caPem: pki.ca.certPem,
    });
    const b = await startTestController({ ...common, controllerId: 'b', dataDir: join(dir.path, 'b') }, undefined, {
      caPem: pki.ca.certPem,
    });
    try {
      await eventually(async () => (await b.controller.store.listControllers()).length === 2, { what: 'both controllers registered' });
      const content = randomBytes(3 * 1024 * 1024 + 17);
      const uploaded = await a.images.uploadImage(
        (async function* (): AsyncGenerator<UploadImageRequest> {
          yield { part: { $case: 'header', value: { name: 'over-tls', sha256: '', sizeBytes: content.byteLength } } };
          yield { part: { $case: 'data', value: content } };
        })(),
      );
      const sha = createHash('sha256').update(content).digest('hex');
      assert.equal(uploaded.image?.sha256, sha);
      // B has no copy until it fetched one from A's DownloadImage, over TLS (A's advertised address is 127.0.0.1).
      await eventually(() => existsSync(b.controller.imageFiles.blobPath(sha)), { timeoutMs: 30_000, what: 'B to copy the image from A' });
    } finally {
      await b.destroy();
      await a.destroy();
    }
  });
});
