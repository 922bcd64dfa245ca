import { Command, Option } from 'commander';
import { CONTROLLER_OPTIONS } from '../controller/config.js';
import { controllerMain } from '../controller/main.js';
import { byteSize, duration, hostPort, integer, switchValue } from '../common/config.js';
import { defineAgentCommand } from './agent-command.js';
import { registerBootCommands } from './commands/boot.js';
import { registerImageCommands } from './commands/image.js';
import { registerNodeCommands } from './commands/node.js';
import { registerTlsCommands } from './commands/tls.js';
import { registerTokenCommands } from './commands/token.js';
import { addOptionTable } from './options.js';
import { asCli } from './parsers.js';
import { EXIT } from '../common/exit-codes.js';

/** Options every operator command group takes (node, image, ...). */
export function addOperatorOptions(command: Command): Command {
  return command
    .addOption(
      new Option('--controller <host:port>', 'controller gRPC address')
        .env('METALCAST_CONTROLLER')
        .default('127.0.0.1:7350')
        .argParser(asCli(hostPort)),
    )
    .addOption(
      new Option('--timeout <duration>', 'deadline for each call, e.g. 10s')
        .env('METALCAST_TIMEOUT')
        .default(10_000, '10s')
        .argParser(asCli(duration({ min: 100 }))),
    )
    .addOption(
      new Option(
        '--token <token>',
        "operator token (from 'metalcast token create'; default: the file ./metalcast-data/admin.token when it exists)",
      ).env('METALCAST_TOKEN'),
    )
    .addOption(
      new Option(
        '--ca <file>',
        "PEM CA bundle to verify the controller's certificate with (default: ./metalcast-data/tls/ca.pem when it exists, which a controller started here with --tls-generate made; else Node's bundled CAs)",
      ).env('METALCAST_CA'),
    )
    .addOption(
      new Option('--cert <file>', 'PEM client certificate for operator mTLS (its OU, admin or reader, is the role); with --key').env(
        'METALCAST_CERT',
      ),
    )
    .addOption(new Option('--key <file>', 'PEM private key of --cert').env('METALCAST_KEY'))
    .addOption(
      new Option('--insecure [true|false]', 'connect in plaintext, without TLS (a controller run with --insecure)')
        .env('METALCAST_INSECURE')
        .argParser((raw: string | boolean) => (typeof raw === 'boolean' ? raw : asCli(switchValue)(raw))),
    )
    .option('--json', 'print machine-readable JSON instead of tables')
    .addOption(new Option('--debug', 'on failure, also print the raw gRPC error (status, details, cause)').env('METALCAST_DEBUG'));
}

/** The `metalcast` command: one entry point for the programs and the operator tools. */
export function buildProgram(): Command {
  const program = new Command('metalcast')
    .description('bare-metal provisioning over gRPC: the controller, the agent, and the operator CLI')
    .showHelpAfterError('(run with --help for usage)')
    // A wrong command line exits 2 (docs/exit-codes.md), not commander's 1, which means "the operation failed".
    .exitOverride((error) => process.exit(error.exitCode === 0 ? EXIT.OK : EXIT.USAGE));

  const controller = program
    .command('controller')
    .description('run the controller: node database, agent gateway, operator API, sweeps and /metrics')
    .addHelpText('after', '\nEvery option can also be set through its METALCAST_* environment variable; flags win over the environment.')
    .action(async (flags: Record<string, unknown>) => controllerMain(flags));
  addOptionTable(controller, CONTROLLER_OPTIONS);

  defineAgentCommand(program.command('agent'));

  registerNodeCommands(program, addOperatorOptions);
  registerImageCommands(program, addOperatorOptions);
  registerTokenCommands(program);
  registerTlsCommands(program);
  registerBootCommands(program);

  program
    .command('demo')
    .description(
      'run the whole product on this machine: a controller, agents on fake machines, inspect, deploy, clean; exits 0 only if every check passed',
    )
    .option('--nodes <n>', 'how many fake machines', asCli(integer({ min: 1, max: 50 })), 5)
    .option(
      '--image-size <size>',
      'size of the generated sample image',
      asCli(byteSize({ min: 1024 * 1024, max: 4 * 1024 ** 3 })),
      64 * 1024 * 1024,
    )
    .option('--keep', 'keep the temporary folder (logs, disks) for a look afterwards')
    .action(async (opts: { nodes: number; imageSize: number; keep?: boolean }) => {
      const { runDemo } = await import('../demo/demo.js');
      process.exitCode = (await runDemo({ nodes: opts.nodes, imageBytes: opts.imageSize, keep: opts.keep ?? false })) ? 0 : 1;
    });
  markRequiredOptions(program);
  return program;
}

/** Commander's help shows a mandatory option like any other; say "(required)", so that `node deploy --help` does not mislead. */
function markRequiredOptions(command: Command): void {
  for (const option of command.options)
    if (option.mandatory && !option.description.endsWith('(required)')) option.description += ' (required)';
  for (const sub of command.commands) markRequiredOptions(sub);
}
