import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { connect } from 'node:net';
import { createChannel, createClient } from 'nice-grpc';
import { createLogger } from '../../common/logging.js';
import { tlsClient } from '../../common/tls.js';
import { BoundedShutdown, UncleanShutdownError } from '../../controller/shutdown/bounded-shutdown.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { spawnController } from '../helpers/controller-process.js';
import { eventually, startTestController, tempDir } from '../helpers/controller.js';
import { postgresSchema, postgresSkipReason } from '../helpers/postgres.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';
import { makeTestPki } from '../helpers/tls.js';

const skipPostgres = await postgresSkipReason();

/** A controller in this process over TLS that cancels calls after 1 s and gives up by 5 s: a stop that abandons something rejects. */
async function tlsControllerThatStopsFast(dir: string) {
  const pki = await makeTestPki(dir);
  const t = await startTestController({ ...pki.controllerFlags, shutdownTimeout: '1s', shutdownDeadline: '5s' }, undefined, {
    caPem: pki.ca.certPem,
  });
  return { pki, t };
}

describe('bounded shutdown', () => {
  it('leaves a phase that never settles at its limit, goes on with the next, and says what it abandoned', async () => {
    const lines: Record<string, unknown>[] = [];
    const logger = createLogger({ name: 't', level: 'info', destination: { write: (l: string) => void lines.push(JSON.parse(l)) } });
    const shutdown = new BoundedShutdown(10_000, logger);
    const ran: string[] = [];
    const started = Date.now();
    await shutdown.phase('never', () => new Promise(() => {}), 200);
    await shutdown.phase('fails', () => Promise.reject(new Error('boom')));
    await shutdown.phase('next', () => void ran.push('next'));
    assert.ok(Date.now() - started < 2000, 'the hung phase was left at its limit');
    assert.deepEqual(ran, ['next']);
    assert.throws(
      () => shutdown.finish(),
      (error: unknown) => error instanceof UncleanShutdownError && error.abandoned.join() === 'never',
    );
    assert.ok(lines.some((line) => line.msg === 'shutdown: never did not finish within 200ms; going on without it'));
    assert.ok(lines.some((line) => line.msg === 'shutdown: fails failed; going on'));
  });

  it('never waits past the deadline, whatever the phases ask for', async () => {
    const shutdown = new BoundedShutdown(300, createLogger({ name: 't', level: 'silent' }));
    const started = Date.now();
    for (let i = 0; i < 5; i++) await shutdown.phase(`hung ${i}`, () => new Promise(() => {}), 60_000);
    assert.ok(Date.now() - started < 2000, `${Date.now() - started} ms`);
    assert.throws(() => shutdown.finish(), /hung 0, hung 1, hung 2, hung 3, hung 4/);
  });

  it('a TLS connection still in its handshake when the stop begins does not hold the stop open', async () => {
    // An agent that reconnects just as the controller stops (its heartbeat stream was ended) is accepted but not yet a
    // gRPC session: grpc-js's forceShutdown does not know it, and Node gives a TLS handshake 120 s. The stop must end it
    // (without that, this test fails with UncleanShutdownError: calls).
    const dir = tempDir('metalcast-shutdown-tls-');
    try {
      const { t } = await tlsControllerThatStopsFast(dir.path);
      const [host, port] = [t.controller.grpcAddress.replace(/:\d+$/, ''), Number(t.controller.grpcAddress.split(':').pop())];
      const silent = connect({ host, port }); // connects, never sends a ClientHello
      await new Promise<void>((resolve, reject) => silent.once('connect', resolve).once('error', reject));
      const closed = new Promise<void>((resolve) => silent.once('close', () => resolve()));
      silent.on('error', () => {});
      const started = Date.now();
      await t.stop(); // rejects with UncleanShutdownError when a phase was abandoned
      assert.ok(Date.now() - started < 4000, `stopped in ${Date.now() - started} ms`);
      await closed;
    } finally {
      dir.remove();
    }
  });

  it('a session whose peer went silent (a machine powered off) does not hold the stop open', async () => {
    // What the lab showed at every stop: the agent of a guest just powered off. The stop first closes sessions
    // gracefully (GOAWAY), and Node's http2 then only ends (FIN) the socket of a session that was closed so, even when
    // grpc-js's forceShutdown destroys it: it waits for the peer's FIN, which a silent peer never sends.
    const dir = tempDir('metalcast-shutdown-silent-');
    let proxy: TcpProxy | undefined;
    try {
      const { pki, t } = await tlsControllerThatStopsFast(dir.path);
      proxy = await TcpProxy.start(t.controller.grpcAddress);
      const client = tlsClient(proxy.address, { caPem: pki.ca.certPem });
      const channel = createChannel(proxy.address, client.credentials, client.channelOptions);
      const nodes = createClient(NodeServiceDefinition, channel, t.operatorOptions);
      await nodes.listNodes({}); // a session through the proxy
      proxy.blackhole(); // from now on nothing passes, not even a FIN
      const started = Date.now();
      await t.stop(); // rejects with UncleanShutdownError when a phase was abandoned
      assert.ok(Date.now() - started < 4000, `stopped in ${Date.now() - started} ms`);
      channel.close();
    } finally {
      await proxy?.close();
      dir.remove();
    }
  });

  describe('a controller process', { skip: skipPostgres }, () => {
    const dir = tempDir('metalcast-shutdown-');
    let schema: Awaited<ReturnType<typeof postgresSchema>> | undefined;
    let database: TcpProxy | undefined;

    after(async () => {
      await database?.close();
      await schema?.drop();
      dir.remove();
    });

    it('exits by --shutdown-deadline after SIGTERM with a call that never ends and a database that stopped answering', async () => {
      schema = await postgresSchema();
      const target = new URL(schema.url);
      database = await TcpProxy.start(`${target.hostname}:${target.port || '5432'}`);
      const viaProxy = new URL(schema.url);
      viaProxy.host = database.address;
      const controller = await spawnController({
        'data-dir': dir.path,
        database: viaProxy.toString(),
        'shutdown-timeout': '1s',
        'shutdown-deadline': '6s',
        'controller-touch-interval': '1s',
        'controller-dead-after': '3s',
      });
      // A call that never ends by itself: a watch, whose client never cancels it.
      const watch = createClient(NodeServiceDefinition, controller.channel, controller.operatorOptions).watchNodes({});
      void watch[Symbol.asyncIterator]()
        .next()
        .catch(() => {});
      await eventually(
        async () => {
          const text = await (await fetch(`http://${controller.httpAddress}/metrics`)).text();
          return /grpc_server_started_total\{[^}]*grpc_method="WatchNodes"[^}]*\} [1-9]/.test(text);
        },
        { timeoutMs: 10_000, intervalMs: 100, what: 'the watch to be open on the controller' },
      );
      // The database stops answering (no data, no FIN, no RST): every query from now on hangs.
      database.blackhole();
      const signalledAt = Date.now();
      controller.child.kill('SIGTERM');
      const timeout = new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 20_000).unref());
      const code = await Promise.race([controller.exited, timeout]);
      const tookMs = Date.now() - signalledAt;
      if (code === 'hung') controller.child.kill('SIGKILL');
      controller.channel.close();
      assert.notEqual(code, 'hung', 'the controller did not exit within 20 s of SIGTERM');
      assert.ok(tookMs < 6000 + 3000, `exited ${tookMs} ms after SIGTERM; the deadline is 6 s`);
      assert.equal(code, 1, 'an unclean stop exits non-zero');
      const messages = controller.logs.map((line) => String(line.msg));
      assert.ok(messages.includes('calls did not finish in time; cancelling them'), messages.join('\n'));
      assert.ok(
        messages.some((msg) => /^shutdown: .* did not finish within \d+ms; going on without it$/.test(msg)),
        messages.join('\n'),
      );
      database.restore();
    });
  });
});
