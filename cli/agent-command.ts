import type { Command } from 'commander';
import { AGENT_OPTIONS } from '../agent/config/config.js';
import { agentMain } from '../agent/main.js';
import { addOptionTable } from './options.js';

/**
 * Makes `command` the agent: its description, every option of its table and
 * its action. `metalcast agent` and the bundled agent artifact
 * (cli/agent-entry.ts) both use it, so the two cannot drift apart.
 */
export function defineAgentCommand(command: Command): Command {
  command
    .description('run the agent on a machine to provision: discovers the hardware, looks itself up, heartbeats and serves commands')
    .addHelpText(
      'after',
      [
        '',
        'Every option can also be set through its METALCAST_* environment variable and, all but --root, on the',
        'kernel command line (read from <root>/proc/cmdline) as metalcast.<option>=VALUE with _ for -, for example',
        'metalcast.controller=10.0.0.1:7350 metalcast.log_level=debug. Flags win over the environment, which wins',
        'over the kernel command line. Unknown metalcast.* keys are logged as warnings.',
        'Exit codes: 0 stopped, 1 fatal error, 2 bad configuration, 3 lookup budget exhausted (the service manager should restart it).',
      ].join('\n'),
    )
    .action(async (flags: Record<string, unknown>) => agentMain(flags));
  return addOptionTable(command, AGENT_OPTIONS);
}
