import { type Command, Option } from 'commander';
import { type OptionSpec, optionHelp } from '../common/config.js';

/**
 * Declares every option of a program's table on a commander command. No
 * defaults are given to commander: resolveOptions applies them after the
 * environment, so that flags > environment > defaults holds.
 */
export function addOptionTable(command: Command, specs: Record<string, OptionSpec>): Command {
  for (const spec of Object.values(specs)) {
    const option = new Option(spec.isSwitch ? `--${spec.flag} [true|false]` : `--${spec.flag} <value>`, optionHelp(spec));
    if (spec.repeatable) option.argParser((value: string, previous: string[] | undefined) => [...(previous ?? []), value]);
    command.addOption(option);
  }
  return command;
}
