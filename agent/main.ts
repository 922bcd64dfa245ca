import { ConfigError } from '../common/config.js';
import { createLogger } from '../common/logging.js';
import { startAgent } from './agent.js';
import { missingAgentTools } from './configdrive/tools.js';
import { AGENT_KERNEL_CMDLINE_KEYS, loadAgentConfig, resolveAgentRoot } from './config/config.js';
import { type KernelCmdline, kernelCmdlineNotes, parseKernelCmdline, readKernelCmdline } from './config/kernel-cmdline.js';
import { LookupBudgetExhausted } from './controller/lookup.js';

/** Exit codes a service manager can tell apart. */
export const AGENT_EXIT = { ok: 0, fatal: 1, config: 2, lookupBudget: 3 } as const;

/** `metalcast agent`: read the config (flags, environment, kernel command line), build the logger, run until stopped or a fatal error. */
export async function agentMain(flags: Record<string, unknown>): Promise<void> {
  let config: ReturnType<typeof loadAgentConfig>;
  let kernelCmdline: KernelCmdline | undefined;
  try {
    // --root says where proc/cmdline is, so it is settled first, without the kernel command line.
    const text = await readKernelCmdline(resolveAgentRoot(flags, process.env));
    kernelCmdline = text === undefined ? undefined : parseKernelCmdline(text, AGENT_KERNEL_CMDLINE_KEYS);
    config = loadAgentConfig(flags, process.env, kernelCmdline);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`metalcast agent: ${error.message}\n`);
      process.exit(AGENT_EXIT.config);
    }
    throw error;
  }
  // sgdisk, sfdisk…: missing tools are found at boot, not in the middle of a deploy. A real machine (root /)
  // cannot write a config drive without them, so the agent stops; a fake machine (--root: the demo, tests,
  // a developer's laptop without gdisk) runs on, and a deploy with a config drive fails naming the tool.
  const missingTools = missingAgentTools(process.env.PATH ?? '');
  if (missingTools !== undefined && config.root === '/') {
    process.stderr.write(`metalcast agent: ${missingTools}\n`);
    process.exit(AGENT_EXIT.config);
  }
  const logger = createLogger({ name: 'metalcast-agent', level: config.logLevel });
  if (missingTools !== undefined)
    logger.warn({ root: config.root }, `${missingTools}; a fake machine runs without them until a deploy writes a config drive`);
  for (const note of kernelCmdline ? kernelCmdlineNotes(kernelCmdline, AGENT_KERNEL_CMDLINE_KEYS) : []) {
    logger[note.level](note.fields, note.message);
  }
  // A last line of defence, not the way errors are handled: every command settles its own promises
  // (agent/commands/runner.ts). Node's default for an unhandled rejection is to end the process, which on
  // a ramdisk strands the machine until someone reboots it; logged at error level so that tests and
  // operators see the bug, while the agent keeps heartbeating.
  process.on('unhandledRejection', (reason) => {
    logger.error({ err: reason }, 'unhandled rejection (a bug in the agent); the agent keeps running');
  });
  const exit = (code: number) => {
    logger.flush();
    process.exit(code);
  };
  let agent: Awaited<ReturnType<typeof startAgent>>;
  try {
    agent = await startAgent(config, logger);
  } catch (error) {
    // An unreadable --ca is found only now: still a configuration error.
    if (error instanceof ConfigError) {
      process.stderr.write(`metalcast agent: ${error.message}\n`);
      return exit(AGENT_EXIT.config);
    }
    logger.fatal({ err: error }, 'agent failed to start');
    process.stderr.write(`metalcast agent: ${(error as Error).message}\n`);
    return exit(AGENT_EXIT.fatal);
  }
  const onSignal = (signal: string) => {
    logger.info({ signal }, 'signal received');
    agent.stop().then(() => exit(AGENT_EXIT.ok));
  };
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);
  agent.done.catch(async (error: unknown) => {
    if (error instanceof LookupBudgetExhausted) {
      // One sentence for the operator; the raw gRPC error (its cause) only at debug.
      logger.debug({ err: error.cause }, 'the last lookup failure as gRPC reported it');
      logger.fatal(`giving up: ${error.message}; exiting so that the service manager restarts the agent`);
      await agent.stop();
      return exit(AGENT_EXIT.lookupBudget);
    }
    logger.fatal({ err: error }, 'agent failed');
    await agent.stop();
    exit(AGENT_EXIT.fatal);
  });
}
