/**
 * The socket baselines of bench/transfer.ts, one process per side, the same
 * topology as controller -> agent (the sender listens, the receiver connects):
 *
 *   node bench/transfer-socket.ts send    '<json SocketSend>'     reads the image, sends it
 *   node bench/transfer-socket.ts receive '<json SocketReceive>'  receives, sha256, writes, fsync
 *
 * Made as fast as Node allows, so that it is a fair bar: the sender reads the
 * image in 4 MiB blocks with one read ahead and writes each block to the
 * socket as it is (no copy), into buffers used again once the socket has
 * taken them; the receiver has the socket read straight into 4 MiB batch
 * buffers (`onread`), hashes each read as it lands, writes full batches at
 * their positions, two in flight, pausing the socket beyond that (bounded
 * memory), with O_DIRECT from page-aligned buffers as the agent does, and
 * fsyncs once at the end. Neither allocates per block or per
 * read: no garbage collection to pay for (metalcast's controller pools its
 * chunk buffers the same way). TLS uses the same certificate (ECDSA
 * P-256) and the same Node/OpenSSL as the controller.
 *
 * Each side prints JSON lines: the sender { type: 'listening', port } and
 * both a final { type: 'result', ... } with its CPU time (process-wide, all
 * threads) over the transfer.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { connect as netConnect, createServer as netServer, type Socket } from 'node:net';
import { type ConnectionOptions, connect as tlsConnect, createServer as tlsServer } from 'node:tls';
import { AlignedBlocks, DirectWriter } from '../common/disk-writes/direct-writes.js';

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
    // Blocks are read into buffers used again once the socket has taken their bytes (the write callback), so
    // that the sender allocates nothing per block: a fresh 4 MiB buffer per block costs a full garbage
    // collection every ~64 MiB, which the controller no longer pays either (its chunk pool).
    const free: Buffer[] = [];
    const take = () => free.pop() ?? Buffer.allocUnsafeSlow(BLOCK);
    let position = 0;
    const readBlock = async (at: number) => {
      const length = Math.min(BLOCK, setup.size - at);
      const buffer = take();
      let done = 0;
      while (done < length) {
        const { bytesRead } = await file.read(buffer, done, length - done, at + done);
        if (bytesRead === 0) throw new Error(`${setup.file} ended at ${at + done}`);
        done += bytesRead;
      }
      return { buffer, length };
    };
    let next = position < setup.size ? readBlock(position) : undefined;
    while (next) {
      const { buffer, length } = await next;
      position += length;
      next = position < setup.size ? readBlock(position) : undefined;
      const written = socket.write(buffer.subarray(0, length), () => {
        if (free.length < 4) free.push(buffer);
      });
      if (!written) await new Promise((resolve) => socket.once('drain', resolve));
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
  // Batches are written with O_DIRECT, as the agent writes (common/disk-writes/direct-writes.ts): the fastest way
  // to a disk file this machine has, so the baseline does not pay the page cache the agent no longer pays.
  const blocks = new AlignedBlocks(5, BLOCK);
  const target = await DirectWriter.open(setup.target, blocks);
  const hash = createHash('sha256');
  const cpu = process.cpuUsage();
  const startedAt = Date.now();
  // The socket reads straight into 4 MiB batch buffers (net's `onread`, which TLS sockets honour too): no
  // buffer per socket read for the garbage collector. A full batch is written at its position, two in
  // flight, the socket paused beyond that (bounded memory), and its buffer used again once written.
  const take = () => blocks.take(BLOCK);
  let batch = take();
  let filled = 0;
  let position = 0;
  let received = 0;
  let inflight = 0;
  let failure: unknown;
  let paused = false;
  let socket: Socket | undefined;
  const writes = new Set<Promise<void>>();
  const flush = () => {
    const buffer = batch;
    const length = filled;
    const at = position;
    position += length;
    batch = take();
    filled = 0;
    inflight++;
    const write = target.write(buffer.subarray(0, length), at).then(
      () => {
        inflight--;
        writes.delete(write);
        blocks.giveBack(buffer);
        if (paused && inflight < 2) {
          paused = false;
          socket?.resume();
        }
      },
      (error: unknown) => {
        failure = error;
        socket?.destroy();
      },
    );
    writes.add(write);
  };
  const onread = {
    buffer: () => {
      if (filled === BLOCK) flush();
      return batch.subarray(filled);
    },
    callback: (nread: number, buffer: Uint8Array): boolean => {
      hash.update(buffer.subarray(0, nread));
      filled += nread;
      received += nread;
      if (filled === BLOCK) flush();
      if (inflight >= 2) {
        paused = true;
        return false;
      }
      return true;
    },
  };
  await new Promise<void>((resolve, reject) => {
    socket = setup.tls
      ? // Node's tls.connect takes `onread` (documented), @types/node's ConnectionOptions lacks it.
        tlsConnect({ host: '127.0.0.1', port: setup.port, ca: readFileSync(setup.ca), onread } as ConnectionOptions)
      : netConnect({ host: '127.0.0.1', port: setup.port, onread });
    socket.once('end', resolve);
    socket.once('error', reject);
  });
  if (filled > 0) flush();
  await Promise.all(writes);
  if (failure) throw failure;
  await target.file.sync();
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
