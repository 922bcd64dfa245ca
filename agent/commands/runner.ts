import { randomUUID } from 'node:crypto';
import { EventEmitter, on } from 'node:events';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { checkLength, checkText } from '../../common/input.js';
import { truncate } from '../../common/mac.js';
import { type Command, type CommandParameters, type CommandProgress, CommandState } from '../../gen/metalcast/v1/command.js';
import { type CommandHandler, wireName } from './command.js';

/** How often watchers hear about progress at most; the final state is always sent. */
const PROGRESS_EMIT_INTERVAL_MS = 250;
/** Longest request id (and command id) accepted; the controller derives request ids well under it. */
const MAX_ID_LENGTH = 128;

/**
 * Runs commands one at a time in the background and remembers a bounded
 * history. A request id makes RunCommand idempotent: a retry after a
 * timeout gets the command it already started.
 */
export class CommandRunner {
  private readonly handlers = new Map<string, CommandHandler>();
  private readonly history = new Map<string, Command>();
  private readonly byRequestId = new Map<string, string>();
  private readonly events = new EventEmitter();
  private current: Command | undefined;
  private lastProgressEmit = 0;
  private readonly shutdown = new AbortController();

  constructor(
    handlers: CommandHandler[],
    private readonly historySize: number,
    private readonly logger: Logger,
    /** Told when a command ends, for example to send a heartbeat at once. */
    private readonly onFinished: (command: Command) => void = () => {},
  ) {
    for (const handler of handlers) this.handlers.set(handler.name, handler);
    this.events.setMaxListeners(0);
  }

  /** Names of the commands this agent knows, as the wire spells them. */
  get knownCommands(): string[] {
    return [...this.handlers.keys()].map(wireName);
  }

  /** The running command, or the last one to finish. */
  latest(): Command | undefined {
    return this.current ?? [...this.history.values()].at(-1);
  }

  isBusy(): boolean {
    return this.current !== undefined;
  }

  get(id: string): Command | undefined {
    return this.history.get(checkLength(id, 'id', MAX_ID_LENGTH));
  }

  /** Newest first. */
  list(): Command[] {
    return [...this.history.values()].reverse();
  }

  /** Starts a command and returns it at once, RUNNING; errors are MetalcastErrors with the right status. */
  start(requestId: string, parameters: CommandParameters | undefined): Command {
    checkText(requestId, 'request_id', MAX_ID_LENGTH);
    const previousId = requestId === '' ? undefined : this.byRequestId.get(requestId);
    const previous = previousId === undefined ? undefined : this.history.get(previousId);
    if (previous) return previous;

    const chosen = parameters?.command;
    const handler = chosen ? this.handlers.get(chosen.$case) : undefined;
    if (!chosen || !handler) {
      throw new MetalcastError(
        Status.INVALID_ARGUMENT,
        `parameters: no command this agent knows was given${chosen ? ` (got ${truncate(wireName(chosen.$case))})` : ''}; known commands: ${this.knownCommands.join(', ')}`,
      );
    }
    handler.validate?.(chosen.value, `parameters.${wireName(chosen.$case)}`);
    if (this.current && !handler.whileBusy) {
      throw new MetalcastError(
        Status.FAILED_PRECONDITION,
        `agent busy with ${this.current.name} (command ${this.current.id}); wait for it to finish`,
      );
    }

    const command: Command = {
      id: randomUUID(),
      name: wireName(handler.name),
      requestId,
      state: CommandState.COMMAND_STATE_RUNNING,
      startedAt: new Date(),
      finishedAt: undefined,
      progress: undefined,
      error: '',
      result: undefined,
    };
    if (!handler.whileBusy) this.current = command;
    this.remember(command, requestId);
    const log = this.logger.child({ command: command.id, name: command.name });
    log.info('command started');
    this.publish(command);

    const context = {
      signal: this.shutdown.signal,
      logger: log,
      progress: (progress: Partial<CommandProgress>) => {
        command.progress = {
          phase: '',
          doneBytes: 0,
          totalBytes: 0,
          rateBytesPerSecond: 0,
          etaSeconds: 0,
          resumes: 0,
          bytesFromPeers: 0,
          bytesFromController: 0,
          chunksTotal: 0,
          chunksSkipped: 0,
          chunksFetched: 0,
          chunksRefetched: 0,
          ...command.progress,
          ...progress,
        };
        const now = Date.now();
        if (now - this.lastProgressEmit >= PROGRESS_EMIT_INTERVAL_MS) {
          this.lastProgressEmit = now;
          this.publish(command);
        }
      },
    };
    // The handler's chosen case and parameters were checked together above. Wrapped in an async
    // function so that a handler that throws synchronously also becomes a failed command, and every
    // way out (including a throw in finish or a watcher) is handled: an unhandled rejection would
    // end the agent process, stranding the machine until a reboot.
    const run = async () => (handler.run as (p: unknown, c: typeof context) => ReturnType<CommandHandler['run']>)(chosen.value, context);
    run()
      .then(
        (result) => this.finish(command, CommandState.COMMAND_STATE_SUCCEEDED, '', result, log),
        (error: unknown) => this.finish(command, CommandState.COMMAND_STATE_FAILED, failureMessage(error), undefined, log),
      )
      .catch((error: unknown) => {
        log.error({ err: error }, 'finishing the command failed');
        if (this.current === command) this.current = undefined;
      });
    return command;
  }

  /**
   * Yields the command now and at every change until it ends (the final
   * state included), or until the signal aborts.
   */
  async *watch(id: string, signal: AbortSignal): AsyncGenerator<Command> {
    const command = this.history.get(checkLength(id, 'id', MAX_ID_LENGTH));
    if (!command)
      throw new MetalcastError(Status.NOT_FOUND, `no command ${truncate(id)} on this agent; ListCommands shows the recent ones`);
    // Listen before the first yield: events buffer here, so a command that
    // ends while the caller is busy with the first message is not missed.
    const changes = on(this.events, id, { signal }) as AsyncIterableIterator<[Command]>;
    try {
      yield structuredClone(command);
      if (command.state !== CommandState.COMMAND_STATE_RUNNING) return;
      for await (const [changed] of changes) {
        yield changed;
        if (changed.state !== CommandState.COMMAND_STATE_RUNNING) return;
      }
    } finally {
      await changes.return?.();
    }
  }

  /** Aborts the running command's signal (agent shutdown). */
  abort(): void {
    this.shutdown.abort();
  }

  private finish(command: Command, state: CommandState, error: string, result: Command['result'], log: Logger): void {
    command.state = state;
    command.error = error;
    command.result = result;
    command.finishedAt = new Date();
    if (this.current === command) this.current = undefined;
    if (state === CommandState.COMMAND_STATE_SUCCEEDED) log.info({ seconds: elapsed(command) }, 'command succeeded');
    else log.warn({ seconds: elapsed(command), error }, 'command failed');
    this.publish(command);
    this.onFinished(command);
  }

  private publish(command: Command): void {
    // Watchers get a snapshot, so that later mutation cannot change what they already sent.
    this.events.emit(command.id, structuredClone(command));
  }

  private remember(command: Command, requestId: string): void {
    this.history.set(command.id, command);
    if (requestId !== '') this.byRequestId.set(requestId, command.id);
    while (this.history.size > this.historySize) {
      const oldest = this.history.values().next().value as Command;
      if (oldest === this.current) break;
      this.history.delete(oldest.id);
      if (oldest.requestId !== '') this.byRequestId.delete(oldest.requestId);
    }
  }
}

/** The command's error text: the Error's message, or whatever was thrown, never empty. */
function failureMessage(error: unknown): string {
  if (error instanceof Error) return error.message || error.name;
  const text = String(error);
  return text === '' ? 'the command failed without saying why' : text;
}

function elapsed(command: Command): number {
  return ((command.finishedAt?.getTime() ?? Date.now()) - (command.startedAt?.getTime() ?? Date.now())) / 1000;
}
