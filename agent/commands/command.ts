import type { Logger } from '../../common/logging.js';
import type { CommandParameters, CommandProgress, CommandResult } from '../../gen/metalcast/v1/command.js';

/** The parameters of one command kind, by its oneof case. */
export type ParametersOf<Name extends NonNullable<CommandParameters['command']>['$case']> = Extract<
  NonNullable<CommandParameters['command']>,
  { $case: Name }
>['value'];

/** What a running command can use. */
export interface CommandContext {
  /** Reports progress; cheap, may be called often (watchers are throttled). */
  progress(progress: Partial<CommandProgress>): void;
  /** Aborted when the agent shuts down. */
  signal: AbortSignal;
  logger: Logger;
}

/**
 * One command the agent knows, in the manner of ironic-python-agent's
 * extensions: a name, and a function that runs in the background and
 * returns a result or throws an Error whose message becomes the command's
 * error (and so the node's last_error).
 */
export interface CommandHandler<
  Name extends NonNullable<CommandParameters['command']>['$case'] = NonNullable<CommandParameters['command']>['$case'],
> {
  name: Name;
  /**
   * Checks the parameters before the command starts, throwing a MetalcastError
   * (INVALID_ARGUMENT naming the field, under `field`, e.g. "parameters.write_image")
   * so that RunCommand refuses a malformed command instead of starting one that fails.
   */
  validate?(parameters: ParametersOf<Name>, field: string): void;
  /**
   * Runs even while another command runs, without making the agent busy:
   * power_off and reboot, which end whatever runs anyway (an aborted deploy
   * must be able to stop a machine in the middle of writing its disk).
   */
  whileBusy?: boolean;
  run(parameters: ParametersOf<Name>, context: CommandContext): Promise<CommandResult | undefined>;
}

/** snake_case wire name of a command, e.g. "write_image" for "writeImage". */
export function wireName(name: string): string {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}
