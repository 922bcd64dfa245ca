import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { TcpProxy } from './tcp-proxy.js';

/** What the target saw of one connection. */
interface Accepted {
  socket: Socket;
  received: Buffer[];
  ended: Promise<void>;
  closed: Promise<boolean>;
}

describe('TcpProxy', () => {
  let target: Server;
  let accepted: Accepted[];
  let echo: boolean;
  let proxy: TcpProxy;
  const clients: Socket[] = [];

  beforeEach(async () => {
    accepted = [];
    echo = true;
    target = createServer({ allowHalfOpen: true }, (socket) => {
      const received: Buffer[] = [];
      socket.on('error', () => {});
      socket.on('data', (chunk: Buffer) => {
        received.push(chunk);
        if (echo) socket.write(chunk);
      });
      const ended = new Promise<void>((resolve) => socket.on('end', () => resolve()));
      // Echo the half-close too, once everything was echoed.
      ended.then(() => echo && socket.end());
      const closed = new Promise<boolean>((resolve) => socket.on('close', (hadError) => resolve(hadError)));
      accepted.push({ socket, received, ended, closed });
    });
    await new Promise<void>((resolve) => target.listen(0, '127.0.0.1', resolve));
    proxy = await TcpProxy.start(`127.0.0.1:${(target.address() as AddressInfo).port}`);
  });
  afterEach(async () => {
    for (const client of clients.splice(0)) client.destroy();
    await proxy.close();
    for (const a of accepted) a.socket.destroy();
    await new Promise<void>((resolve) => target.close(() => resolve()));
  });

  async function client(): Promise<{ socket: Socket; received: Buffer[]; ended: Promise<void>; closed: Promise<Error | undefined> }> {
    const socket = connect({ host: '127.0.0.1', port: proxy.port, allowHalfOpen: true });
    clients.push(socket);
    const received: Buffer[] = [];
    let error: Error | undefined;
    socket.on('data', (chunk: Buffer) => received.push(chunk));
    socket.on('error', (e) => {
      error = e;
    });
    const ended = new Promise<void>((resolve) => socket.on('end', () => resolve()));
    const closed = new Promise<Error | undefined>((resolve) => socket.on('close', () => resolve(error)));
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return { socket, received, ended, closed };
  }
  const waitFor = async (check: () => boolean, what: string, timeoutMs = 5000) => {
    const deadline = Date.now() + timeoutMs;
    while (!check()) {
      if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
      await sleep(5);
    }
  };
  const total = (chunks: Buffer[]) => chunks.reduce((n, c) => n + c.length, 0);

  it('forwards both ways, passes a half-close on, and counts bytes each way', async () => {
    const c = await client();
    c.socket.write('hello');
    await waitFor(() => Buffer.concat(c.received).toString() === 'hello', 'the echo');
    c.socket.end('!');
    await c.ended;
    assert.equal(Buffer.concat(c.received).toString(), 'hello!');
    assert.equal(Buffer.concat(accepted[0]?.received ?? []).toString(), 'hello!');
    await c.closed;
    await waitFor(() => proxy.stats.connections === 0, 'the link to close');
    assert.deepEqual(proxy.stats, { connections: 0, acceptedConnections: 1, bytesToTarget: 6, bytesFromTarget: 6, bufferedBytes: 0 });
  });

  it('black-holes data and ends in both directions, keeping the sockets open, until restored', async () => {
    const c = await client();
    await waitFor(() => accepted.length === 1, 'the upstream connection');
    const server = accepted[0] as Accepted;
    proxy.blackhole();
    c.socket.write('lost?');
    server.socket.write('from the target');
    c.socket.end();
    let serverEnded = false;
    server.ended.then(() => {
      serverEnded = true;
    });
    await sleep(300);
    assert.equal(total(server.received), 0, 'nothing reached the target');
    assert.equal(total(c.received), 0, 'nothing reached the client');
    assert.equal(serverEnded, false, 'no FIN passed');
    assert.equal(c.socket.destroyed, false);
    assert.equal(server.socket.destroyed, false);
    assert.equal(proxy.stats.connections, 1);

    proxy.restore();
    await server.ended;
    assert.equal(Buffer.concat(server.received).toString(), 'lost?');
    await c.ended;
    assert.equal(Buffer.concat(c.received).toString(), 'from the targetlost?');
  });

  it('holds back a reset while black-holed and passes it on when restored', async () => {
    const c = await client();
    await waitFor(() => accepted.length === 1, 'the upstream connection');
    proxy.blackhole();
    (accepted[0] as Accepted).socket.resetAndDestroy();
    await sleep(200);
    assert.equal(c.socket.destroyed, false, 'the reset is hidden by the black hole');
    proxy.restore();
    const error = await c.closed;
    assert.equal((error as NodeJS.ErrnoException | undefined)?.code, 'ECONNRESET');
  });

  it('bounds its memory while black-holed: the sender feels TCP backpressure, and nothing is lost on restore', async () => {
    echo = false;
    const c = await client();
    await waitFor(() => accepted.length === 1, 'the upstream connection');
    proxy.blackhole();
    const payload = randomBytes(16 * 1024 * 1024);
    c.socket.write(payload);
    await sleep(300);
    assert.ok(proxy.stats.bufferedBytes <= 512 * 1024, `proxy buffered ${proxy.stats.bufferedBytes} bytes`);
    assert.ok(c.socket.writableLength > 8 * 1024 * 1024, `the sender still holds ${c.socket.writableLength} bytes`);
    proxy.restore();
    const server = accepted[0] as Accepted;
    await waitFor(() => total(server.received) === payload.length, 'the whole payload', 10_000);
    const digest = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    assert.equal(digest(Buffer.concat(server.received)), digest(payload));
    assert.equal(proxy.stats.bytesToTarget, payload.length);
  });

  it('resets every connection on both sides with resetAll', async () => {
    const a = await client();
    const b = await client();
    await waitFor(() => accepted.length === 2, 'two upstream connections');
    proxy.resetAll();
    for (const c of [a, b]) assert.equal(((await c.closed) as NodeJS.ErrnoException | undefined)?.code, 'ECONNRESET');
    for (const s of accepted) assert.equal(await s.closed, true, 'the target saw an error close');
    assert.equal(proxy.stats.connections, 0);
    // The proxy still accepts new connections.
    const c = await client();
    c.socket.write('again');
    await waitFor(() => Buffer.concat(c.received).toString() === 'again', 'the echo after a reset');
  });

  it('throttles each direction to the given rate', async () => {
    echo = false;
    proxy.throttle(400 * 1024);
    const c = await client();
    const started = Date.now();
    c.socket.write(randomBytes(200 * 1024));
    await waitFor(() => accepted.length === 1 && total((accepted[0] as Accepted).received) === 200 * 1024, 'the data');
    const elapsed = Date.now() - started;
    // 200 KiB at 400 KiB/s, less the initial burst of 20 KiB: about 440 ms.
    assert.ok(elapsed >= 380, `took only ${elapsed}ms`);
    assert.ok(elapsed < 3000, `took ${elapsed}ms`);
    proxy.throttle(0);
    const fast = Date.now();
    c.socket.write(randomBytes(1024 * 1024));
    await waitFor(() => total((accepted[0] as Accepted).received) === 1224 * 1024, 'the unthrottled data');
    assert.ok(Date.now() - fast < 1000);
  });

  it('delays every chunk each way', async () => {
    proxy.delay(150);
    const c = await client();
    const started = Date.now();
    c.socket.write('ping');
    await waitFor(() => Buffer.concat(c.received).toString() === 'ping', 'the echo');
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 290, `round trip took only ${elapsed}ms`);
    assert.ok(elapsed < 2000, `round trip took ${elapsed}ms`);
  });

  it('resets the client when the target refuses the connection', async () => {
    await new Promise<void>((resolve) => target.close(() => resolve()));
    const c = await client();
    const error = await c.closed;
    assert.ok(error === undefined || (error as NodeJS.ErrnoException).code === 'ECONNRESET', String(error));
    assert.equal(c.socket.destroyed, true);
    // beforeEach's server is closed already; give afterEach one to close.
    target = createServer();
    await new Promise<void>((resolve) => target.listen(0, '127.0.0.1', resolve));
  });

  it('closes every connection and stops listening on close()', async () => {
    const c = await client();
    await waitFor(() => accepted.length === 1, 'the upstream connection');
    await proxy.close();
    await c.ended;
    assert.equal(await accepted[0]?.closed, false, 'the target saw a clean close');
    await assert.rejects(client(), (error: NodeJS.ErrnoException) => error.code === 'ECONNREFUSED');
  });
});
