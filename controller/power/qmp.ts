import { createConnection, type Socket } from 'node:net';

/**
 * A minimal client for the QEMU Machine Protocol over a unix socket
 * (docs/interop/qmp-spec): read the greeting, negotiate capabilities, then
 * send commands one JSON object per line and match each reply by its id.
 * Asynchronous events (SHUTDOWN, RESET, STOP, ...) are kept in order and
 * can be waited for.
 */

/** A QMP event as QEMU sends it. */
export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** A command QEMU answered with an error. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    description: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${description}`);
    this.name = 'QmpError';
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;

export class QmpClient {
  /** Every event received, oldest first. */
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<string, Pending>();
  private readonly eventWaiters = new Set<() => void>();
  private readonly listeners = new Set<(event: QmpEvent) => void>();
  private nextId = 1;
  private buffer = '';
  private closedWith: Error | undefined;

  private constructor(private readonly socket: Socket) {}

  /**
   * Connects, waits for the greeting and leaves capabilities negotiation
   * mode. Retries the connection until `timeoutMs` (QEMU creates the socket
   * a moment after it starts), unless `givenUp` says to stop.
   */
  static async connect(path: string, options: { timeoutMs?: number; givenUp?: () => string | undefined } = {}): Promise<QmpClient> {
    const deadline = Date.now() + (options.timeoutMs ?? 10_000);
    for (;;) {
      try {
        return await QmpClient.connectOnce(path, Math.max(1000, deadline - Date.now()));
      } catch (error) {
        const why = options.givenUp?.();
        if (why) throw new Error(`QMP socket ${path}: ${why}`);
        if (Date.now() >= deadline) throw new Error(`cannot connect to the QMP socket ${path}: ${(error as Error).message}`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
  }

  private static connectOnce(path: string, timeoutMs: number): Promise<QmpClient> {
    return new Promise((resolve, reject) => {
      const socket = createConnection(path);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`no QMP greeting within ${timeoutMs} ms`));
      }, timeoutMs);
      let greeting = '';
      const onData = (data: Buffer) => {
        greeting += data.toString('utf8');
        const newline = greeting.indexOf('\n');
        if (newline < 0) return;
        clearTimeout(timer);
        socket.off('data', onData);
        socket.off('error', onError);
        const client = new QmpClient(socket);
        client.attach(greeting.slice(newline + 1));
        client
          .execute('qmp_capabilities')
          .then(() => resolve(client))
          .catch((error: Error) => {
            client.close();
            reject(error);
          });
      };
      const onError = (error: Error) => {
        clearTimeout(timer);
        reject(error);
      };
      socket.on('data', onData);
      socket.once('error', onError);
    });
  }

  private attach(rest: string): void {
    this.socket.setEncoding('utf8');
    this.socket.on('data', (text: string) => this.receive(text));
    this.socket.on('error', (error) => this.fail(error));
    this.socket.on('close', () => this.fail(new Error('QMP connection closed (QEMU exited?)')));
    if (rest) this.receive(rest);
  }

  private receive(text: string): void {
    this.buffer += text;
    for (let newline = this.buffer.indexOf('\n'); newline >= 0; newline = this.buffer.indexOf('\n')) {
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (line === '') continue;
      let message: Record<string, unknown>;
      try {
        message = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if (typeof message.event === 'string') {
        const event = message as unknown as QmpEvent;
        this.events.push(event);
        for (const listener of this.listeners) listener(event);
        for (const wake of this.eventWaiters) wake();
        continue;
      }
      const pending = this.pending.get(String(message.id));
      if (!pending) continue;
      this.pending.delete(String(message.id));
      clearTimeout(pending.timer);
      const error = message.error as { class?: string; desc?: string } | undefined;
      if (error) pending.reject(new QmpError(pending.command, error.class ?? 'GenericError', error.desc ?? ''));
      else pending.resolve(message.return);
    }
  }

  private fail(error: Error): void {
    this.closedWith ??= error;
    for (const [id, pending] of this.pending) {
      clearTimeout(pending.timer);
      pending.reject(new Error(`QMP ${pending.command}: ${error.message}`));
      this.pending.delete(id);
    }
    for (const wake of this.eventWaiters) wake();
  }

  /** Calls `listener` with every event from now on. */
  onEvent(listener: (event: QmpEvent) => void): void {
    this.listeners.add(listener);
  }

  /** Whether the connection is still open. */
  get open(): boolean {
    return this.closedWith === undefined;
  }

  /** Runs one command and returns its `return` value; rejects with QmpError when QEMU says no. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = DEFAULT_COMMAND_TIMEOUT_MS): Promise<T> {
    if (this.closedWith) return Promise.reject(new Error(`QMP ${command}: ${this.closedWith.message}`));
    const id = String(this.nextId++);
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (value: unknown) => void, reject, timer });
      this.socket.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`);
    });
  }

  /**
   * The first event named `name` at or after index `since` of `events`
   * (default: any received so far). Rejects after timeoutMs, or when the
   * connection closes before it comes.
   */
  waitForEvent(name: string, timeoutMs: number, since = 0): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = this.events.slice(since).find((e) => e.event === name);
        if (found) return done(() => resolve(found));
        if (this.closedWith) return done(() => reject(new Error(`QMP event ${name}: ${this.closedWith?.message}`)));
      };
      const timer = setTimeout(() => done(() => reject(new Error(`no QMP event ${name} within ${timeoutMs} ms`))), timeoutMs);
      const done = (settle: () => void) => {
        clearTimeout(timer);
        this.eventWaiters.delete(check);
        settle();
      };
      this.eventWaiters.add(check);
      check();
    });
  }

  close(): void {
    this.fail(new Error('QMP connection closed by us'));
    this.socket.destroy();
  }
}
