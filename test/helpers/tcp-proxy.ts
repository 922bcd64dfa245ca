import { createServer, connect, type AddressInfo, type Server, type Socket } from 'node:net';

/** Bytes a pipe holds before it pauses its source; bounds memory per direction of each connection. */
const HIGH_WATER_BYTES = 256 * 1024;

export interface TcpProxyStats {
  /** Connections open now. */
  connections: number;
  /** Connections accepted since the proxy started. */
  acceptedConnections: number;
  /** Bytes forwarded from clients to the target. */
  bytesToTarget: number;
  /** Bytes forwarded from the target to clients. */
  bytesFromTarget: number;
  /** Bytes received and not yet forwarded, over all connections (bounded: see the class comment). */
  bufferedBytes: number;
}

/** Fault settings shared by every pipe of a proxy. */
interface Faults {
  blackholed: boolean;
  delayMs: number;
  /** Bytes per second for each direction of each connection; 0 means unlimited. */
  bytesPerSecond: number;
}

/**
 * A TCP proxy for fault tests: it listens on 127.0.0.1:0 and forwards each
 * connection to the target, and a test can make the path misbehave the way
 * real networks do.
 *
 * - blackhole(): nothing passes in either direction, not even FIN or RST,
 *   but every socket stays open; a peer sees a link that went silent.
 * - restore(): forwarding resumes, including ends and resets that arrived
 *   meanwhile.
 * - resetAll(): every connection is destroyed with RST on both sides.
 * - throttle(bytesPerSecond), delay(ms): slow links.
 *
 * Memory is bounded: each direction of each connection holds at most about
 * 256 KiB before it stops reading its source, so a black-holed or throttled
 * transfer pushes back on the sender through TCP instead of piling up here.
 */
export class TcpProxy {
  private readonly links = new Set<Link>();
  private readonly faults: Faults = { blackholed: false, delayMs: 0, bytesPerSecond: 0 };
  private accepted = 0;
  private closing = false;
  private closedBytesToTarget = 0;
  private closedBytesFromTarget = 0;

  private constructor(
    private readonly server: Server,
    /** The port the proxy listens on (127.0.0.1). */
    readonly port: number,
    private readonly target: { host: string; port: number },
  ) {
    server.on('connection', (client) => this.accept(client));
  }

  /** Starts a proxy to `target` ("host:port"). */
  static async start(target: string): Promise<TcpProxy> {
    const index = target.lastIndexOf(':');
    const host = target.slice(0, index).replace(/^\[|\]$/g, '');
    const port = Number(target.slice(index + 1));
    if (!host || !Number.isInteger(port) || port <= 0) throw new Error(`'${target}' is not host:port`);
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    return new TcpProxy(server, (server.address() as AddressInfo).port, { host, port });
  }

  /** host:port to connect clients to. */
  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  get stats(): TcpProxyStats {
    let toTarget = this.closedBytesToTarget;
    let fromTarget = this.closedBytesFromTarget;
    let buffered = 0;
    for (const link of this.links) {
      toTarget += link.up.bytes;
      fromTarget += link.down.bytes;
      buffered += link.up.buffered + link.down.buffered;
    }
    return {
      connections: this.links.size,
      acceptedConnections: this.accepted,
      bytesToTarget: toTarget,
      bytesFromTarget: fromTarget,
      bufferedBytes: buffered,
    };
  }

  get blackholed(): boolean {
    return this.faults.blackholed;
  }

  /** Stops forwarding in both directions and keeps every socket open: no data, no FIN, no RST. */
  blackhole(): void {
    this.faults.blackholed = true;
    for (const link of this.links) link.pause();
  }

  /** Resumes forwarding, delivering what was held and any end or reset that arrived meanwhile. */
  restore(): void {
    this.faults.blackholed = false;
    for (const link of [...this.links]) link.resume();
  }

  /** Destroys every connection with RST on both sides. New connections are still accepted. */
  resetAll(): void {
    for (const link of [...this.links]) link.reset();
  }

  /** Limits each direction of each connection to `bytesPerSecond`; 0 or Infinity removes the limit. */
  throttle(bytesPerSecond: number): void {
    if (!(bytesPerSecond >= 0)) throw new Error(`throttle: ${bytesPerSecond} is not a rate in bytes per second`);
    this.faults.bytesPerSecond = Number.isFinite(bytesPerSecond) ? bytesPerSecond : 0;
    for (const link of this.links) link.kick();
  }

  /** Delays every chunk received from now on by `ms` before forwarding it; 0 removes the delay. */
  delay(ms: number): void {
    if (!(ms >= 0) || !Number.isFinite(ms)) throw new Error(`delay: ${ms} is not a number of milliseconds`);
    this.faults.delayMs = ms;
  }

  /** Stops listening and closes every connection (FIN to both sides, no waiting for their data). Idempotent. */
  async close(): Promise<void> {
    this.closing = true;
    for (const link of [...this.links]) link.destroy();
    if (!this.server.listening) return;
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: Socket): void {
    if (this.closing) {
      client.destroy();
      return;
    }
    this.accepted++;
    const upstream = connect({ host: this.target.host, port: this.target.port, allowHalfOpen: true });
    const link = new Link(client, upstream, this.faults, () => {
      this.links.delete(link);
      this.closedBytesToTarget += link.up.bytes;
      this.closedBytesFromTarget += link.down.bytes;
    });
    this.links.add(link);
    if (this.faults.blackholed) link.pause();
    else link.resume();
  }
}

/** One proxied connection: a client socket, its upstream socket and a pipe each way. */
class Link {
  readonly up: Pipe;
  readonly down: Pipe;
  private finished = false;

  constructor(
    private readonly client: Socket,
    private readonly upstream: Socket,
    faults: Faults,
    private readonly onFinished: () => void,
  ) {
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    this.up = new Pipe(client, upstream, faults);
    this.down = new Pipe(upstream, client, faults);
    for (const socket of [client, upstream]) {
      // Errors end in 'close' with hadError; the reset is passed on from there.
      socket.on('error', () => {});
      socket.on('close', (hadError) => this.onClose(socket, hadError));
    }
  }

  pause(): void {
    this.up.pause();
    this.down.pause();
  }

  resume(): void {
    this.up.resume();
    this.down.resume();
  }

  kick(): void {
    this.up.pump();
    this.down.pump();
  }

  reset(): void {
    this.up.dispose();
    this.down.dispose();
    if (!this.client.destroyed) this.client.resetAndDestroy();
    if (!this.upstream.destroyed) this.upstream.resetAndDestroy();
    this.finish();
  }

  destroy(): void {
    this.up.dispose();
    this.down.dispose();
    this.client.destroy();
    this.upstream.destroy();
    this.finish();
  }

  private onClose(socket: Socket, hadError: boolean): void {
    const pipe = socket === this.client ? this.up : this.down;
    if (hadError) pipe.sourceReset();
    // A clean close means both directions of this socket finished; the other pipe handles the rest.
    if (this.client.destroyed && this.upstream.destroyed) {
      this.up.dispose();
      this.down.dispose();
      this.finish();
    }
  }

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    this.onFinished();
  }
}

/**
 * One direction of a connection. Chunks wait in a queue until their delay
 * has passed, the rate limit allows them and the link is not black-holed;
 * the source is paused while the queue is full or the link is black-holed.
 */
class Pipe {
  /** Bytes delivered to the destination. */
  bytes = 0;
  private readonly queue: { chunk: Buffer; dueAt: number }[] = [];
  private queuedBytes = 0;
  private sourceEnded = false;
  private resetPending = false;
  private destinationBlocked = false;
  private timer: NodeJS.Timeout | undefined;
  private tokens = 0;
  private tokensAt = 0;
  private disposed = false;

  constructor(
    private readonly source: Socket,
    private readonly destination: Socket,
    private readonly faults: Faults,
  ) {
    source.on('data', (chunk: Buffer) => {
      this.queue.push({ chunk, dueAt: Date.now() + this.faults.delayMs });
      this.queuedBytes += chunk.length;
      if (this.queuedBytes >= HIGH_WATER_BYTES || this.faults.blackholed) source.pause();
      this.pump();
    });
    source.on('end', () => {
      this.sourceEnded = true;
      this.pump();
    });
  }

  get buffered(): number {
    return this.queuedBytes;
  }

  pause(): void {
    this.source.pause();
    this.clearTimer();
  }

  resume(): void {
    if (this.disposed) return;
    if (this.queuedBytes < HIGH_WATER_BYTES && !this.source.destroyed) this.source.resume();
    this.pump();
  }

  /** The source was reset: pass the reset on, unless the link is black-holed (then on restore). */
  sourceReset(): void {
    this.resetPending = true;
    this.pump();
  }

  dispose(): void {
    this.disposed = true;
    this.clearTimer();
    this.queue.length = 0;
    this.queuedBytes = 0;
  }

  /** Delivers what may be delivered now and schedules the rest. */
  pump(): void {
    if (this.disposed || this.faults.blackholed || this.destinationBlocked) return;
    this.clearTimer();
    if (this.resetPending) {
      this.dispose();
      if (!this.destination.destroyed) this.destination.resetAndDestroy();
      return;
    }
    while (this.queue.length > 0) {
      if (this.destination.destroyed) {
        this.dispose();
        return;
      }
      const head = this.queue[0] as { chunk: Buffer; dueAt: number };
      const now = Date.now();
      if (head.dueAt > now) {
        this.schedule(head.dueAt - now);
        return;
      }
      let piece = head.chunk;
      const rate = this.faults.bytesPerSecond;
      if (rate > 0) {
        const burst = Math.max(1, Math.floor(rate / 20));
        this.refill(now, rate, burst);
        const wanted = Math.min(head.chunk.length, burst);
        if (this.tokens < wanted) {
          this.schedule(Math.max(1, Math.ceil(((wanted - this.tokens) / rate) * 1000)));
          return;
        }
        piece = head.chunk.subarray(0, wanted);
        this.tokens -= wanted;
      }
      if (piece.length === head.chunk.length) this.queue.shift();
      else head.chunk = head.chunk.subarray(piece.length);
      this.queuedBytes -= piece.length;
      this.bytes += piece.length;
      if (!this.destination.write(piece)) {
        this.destinationBlocked = true;
        this.destination.once('drain', () => {
          this.destinationBlocked = false;
          this.pump();
        });
        break;
      }
    }
    if (this.queuedBytes < HIGH_WATER_BYTES && !this.sourceEnded && !this.source.destroyed) this.source.resume();
    if (this.queue.length === 0 && this.sourceEnded && !this.destination.writableEnded && !this.destination.destroyed) {
      this.destination.end();
    }
  }

  private refill(now: number, rate: number, burst: number): void {
    if (this.tokensAt === 0) this.tokens = burst;
    else this.tokens = Math.min(burst, this.tokens + ((now - this.tokensAt) / 1000) * rate);
    this.tokensAt = now;
  }

  private schedule(ms: number): void {
    this.clearTimer();
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.pump();
    }, ms);
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }
}
