import { type Command, Option } from 'commander';
import { duration } from '../../common/config.js';
import { asCli } from '../parsers.js';
import type { NodeServiceClient } from '../../gen/metalcast/v1/node.js';
import { EXIT } from '../../common/exit-codes.js';
import { stateName } from '../node-format.js';
import { watchNodes } from './node-watch.js';

/**
 * `--wait` on the provision actions: follow the node until it rests in a
 * state no agent or step is working on (manageable, available, active, a
 * failed state …), so that a script can run `inspect --wait` and then
 * `provide --wait` without polling.
 */

/** States in which nothing happens to a node until an operator acts. */
const RESTING = new Set(['enroll', 'manageable', 'available', 'active', 'inspect_failed', 'clean_failed', 'deploy_failed'] as const);

export function addWaitOptions(command: Command): Command {
  return command
    .option('--wait', 'wait until the node rests (manageable, available, active or failed), printing each change; exit 1 when it failed')
    .addOption(
      new Option('--wait-timeout <duration>', 'give up waiting after this long (exit 5)')
        .default(3_600_000, '1h')
        .argParser(asCli(duration({ min: 1000 }))),
    );
}

/** Waits as addWaitOptions describes; returns the exit code. */
export async function waitForRest(
  nodes: NodeServiceClient<{ deadline?: number }>,
  name: string,
  timeoutMs: number,
  json: boolean,
): Promise<number> {
  const timeout = AbortSignal.timeout(timeoutMs);
  const watched = await watchNodes(nodes, [name], RESTING as Set<never>, json, timeout);
  const node = [...watched.values()][0];
  const state = node ? stateName(node.provisionState) : 'unknown';
  if (!node || !RESTING.has(state as never)) {
    process.stderr.write(`error: node ${name} is still ${state} after ${Math.round(timeoutMs / 1000)}s (--wait-timeout)\n`);
    return EXIT.UNAVAILABLE;
  }
  if (state.endsWith('_failed')) {
    process.stderr.write(`error: node ${name} is ${state}: ${node.lastError || 'no reason recorded'}\n`);
    return EXIT.FAILED;
  }
  if (!json) process.stdout.write(`node ${name} is ${state}\n`);
  return EXIT.OK;
}
