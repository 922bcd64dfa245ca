/**
 * The socket baselines of bench/transfer.ts, one process per side, the same
 * topology as controller -> agent (the sender listens, the receiver connects):
 *
 *   node bench/transfer-socket.ts send    '<json SocketSend>'     reads the image, sends it
 *   node bench/transfer-socket.ts receive '<json SocketReceive>'  receives, sha256, writes, fsync
 *
 * Made as fast as Node allows, so that it is a fair bar: the sender reads the
 * image in 4 MiB blocks into fresh buffers with one read ahead and writes each
 * block to the socket as it is (no copy); the receiver hashes every socket
 * chunk as it arrives and writes them in 4 MiB batches with writev at their
 * positions, two batches in flight, pausing the socket beyond that (bounded
 * memory), and fsyncs once at the end. TLS uses the same certificate (ECDSA
 * P-256) and the same Node/OpenSSL as the controller.
 *
 * Each side prints JSON lines: the sender { type: 'listening', port } and
 * both a final { type: 'result', ... } with its CPU time (process-wide, all
 * threads) over the transfer.
 */
import { createHash } from 'node:crypto';
import { open, readFile } from 'node:fs/promises';
import { connect as netConnect, createServer as netServer, type Socket } from 'node:net';
import { connect as tlsConnect, createServer as tlsServer } from 'node:tls';

export interface SocketSend {
  tls: boolean;
  file: string;
  size: number;
  cert: string;
  key: string;
}

export interface SocketReceive {
  tls: boolean;
  port: number;
  target: string;
  size: number;
  ca: string;
}

const BLOCK = 4 * 1024 * 1024;

function out(line: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function cpuMs(since: NodeJS.CpuUsage): number {
  const used = process.cpuUsage(since);
  return (used.user + used.system) / 1000;
}

async function send(setup: SocketSend): Promise<void> {
  const file = await open(setup.file, 'r');
  const serve = async (socket: Socket) => {
    const cpu = process.cpuUsage();
    const startedAt = Date.now();
    let position = 0;
    const readBlock = async (at: number) => {
      const buffer = Buffer.allocUnsafeSlow(Math.min(BLOCK, setup.size - at));
      let done = 0;
      while (done < buffer.length) {
        const { bytesRead } = await file.read(buffer, done, buffer.length - done, at + done);
        if (bytesRead === 0) throw new Error(`${setup.file} ended at ${at + done}`);
        done += bytesRead;
      }
      return buffer;
    };
    let next = position < setup.size ? readBlock(position) : undefined;
    while (next) {
      const block = await next;
      position += block.length;
      next = position < setup.size ? readBlock(position) : undefined;
      if (!socket.write(block)) await new Promise((resolve) => socket.once('drain', resolve));
    }
    await new Promise<void>((resolve) => socket.end(resolve));
    out({ type: 'result', role: 'send', bytes: position, cpuMs: cpuMs(cpu), startedAt, endedAt: Date.now() });
  };
  const onConnection = (socket: Socket) => {
    server.close();
    socket.setNoDelay(true);
    serve(socket).then(
      () => file.close(),
      (error: unknown) => {
        out({ type: 'result', role: 'send', error: String(error) });
        process.exit(1);
      },
    );
  };
  const server = setup.tls
    ? tlsServer({ cert: await readFile(setup.cert), key: await readFile(setup.key) }, onConnection)
    : netServer(onConnection);
  server.listen(0, '127.0.0.1', () => {
    const address = server.address();
    out({ type: 'listening', port: typeof address === 'object' && address ? address.port : 0 });
  });
}

async function receive(setup: SocketReceive): Promise<void> {
  const target = await open(setup.target, 'r+');
  const hash = createHash('sha256');
  const cpu = process.cpuUsage();
  const startedAt = Date.now();
  const socket = setup.tls
    ? tlsConnect({ host: '127.0.0.1', port: setup.port, ca: await readFile(setup.ca) })
    : netConnect({ host: '127.0.0.1', port: setup.port });
  let batch: Buffer[] = [];
  let batchBytes = 0;
  let position = 0;
  let received = 0;
  let inflight = 0;
  let failure: unknown;
  const writes = new Set<Promise<void>>();
  const flush = () => {
    const parts = batch;
    const at = position;
    position += batchBytes;
    batch = [];
    batchBytes = 0;
    inflight++;
    const write = (async () => {
      let list = parts;
      let offset = at;
      while (list.length > 0) {
        const { bytesWritten } = await target.writev(list, offset);
        offset += bytesWritten;
        let skip = bytesWritten;
        while (list.length > 0 && skip >= list[0]!.length) skip -= list.shift()!.length;
        if (skip > 0) list = [list[0]!.subarray(skip), ...list.slice(1)];
      }
    })().then(
      () => {
        inflight--;
        writes.delete(write);
        if (inflight < 2) socket.resume();
      },
      (error: unknown) => {
        failure = error;
        socket.destroy();
      },
    );
    writes.add(write);
    if (inflight >= 2) socket.pause();
  };
  await new Promise<void>((resolve, reject) => {
    socket.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      batch.push(chunk);
      batchBytes += chunk.length;
      received += chunk.length;
      if (batchBytes >= BLOCK) flush();
    });
    socket.once('end', resolve);
    socket.once('error', reject);
  });
  if (batchBytes > 0) flush();
  await Promise.all(writes);
  if (failure) throw failure;
  await target.sync();
  await target.close();
  const endedAt = Date.now();
  out({
    type: 'result',
    role: 'receive',
    bytes: received,
    sha256: hash.digest('hex'),
    ms: endedAt - startedAt,
    cpuMs: cpuMs(cpu),
    startedAt,
    endedAt,
  });
}

const [role, json] = process.argv.slice(2);
try {
  if (role === 'send') await send(JSON.parse(json ?? '{}') as SocketSend);
  else if (role === 'receive') await receive(JSON.parse(json ?? '{}') as SocketReceive);
  else throw new Error(`usage: transfer-socket.ts send|receive '<json>'`);
} catch (error) {
  out({ type: 'result', role, error: String(error) });
  process.exitCode = 1;
}
