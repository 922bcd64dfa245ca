/**
 * Entry point of the agent artifact (npm run package:agent): the agent
 * alone, without the controller or the operator commands, so that the bundle
 * carries only what a ramdisk runs. `metalcast-agent [options]` takes the
 * same options as `metalcast agent`.
 */
import { Command } from 'commander';
import { tuneHeapForBulkTransfers } from '../common/v8-heap-tuning.js';
import { defineAgentCommand } from './agent-command.js';

tuneHeapForBulkTransfers();
const program = defineAgentCommand(new Command('metalcast-agent')).showHelpAfterError('(run with --help for usage)');
// No top-level await: the single executable application runs this bundled as CommonJS.
program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(`metalcast-agent: ${(error as Error).stack ?? String(error)}\n`);
  process.exit(1);
});
