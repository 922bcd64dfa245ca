import { type Command, Option } from 'commander';
import { duration } from '../../common/config.js';
import { asCli } from '../parsers.js';
import { BootDevice, NodePowerState, PowerAction } from '../../gen/metalcast/v1/node.js';
import { withClient } from '../client.js';
import { printJson, printTable } from '../output.js';

/*
 * `metalcast node power on|off|soft-off|reset|status NODE` and `metalcast
 * node validate NODE`: a node's BMC, through the controller (which holds the
 * credentials; the CLI never sees them).
 */

const stateName = (state: NodePowerState) =>
  state === NodePowerState.NODE_POWER_STATE_ON ? 'on' : state === NodePowerState.NODE_POWER_STATE_OFF ? 'off' : 'unknown';

const ACTIONS = {
  on: { action: PowerAction.POWER_ACTION_ON, help: 'power on (a reset when already on), booting from --boot-device' },
  off: { action: PowerAction.POWER_ACTION_OFF, help: 'hard power off' },
  'soft-off': { action: PowerAction.POWER_ACTION_SOFT_OFF, help: 'ask the OS to shut down (ACPI), then power off hard after the timeout' },
  reset: { action: PowerAction.POWER_ACTION_RESET, help: 'hard reset (powers on when off)' },
} as const;

const DEVICES = { disk: BootDevice.BOOT_DEVICE_DISK, network: BootDevice.BOOT_DEVICE_NETWORK, cd: BootDevice.BOOT_DEVICE_CD } as const;

function waitOption(): Option {
  return new Option('--wait <duration>', 'how long to wait for the BMC (power changes can take minutes)')
    .default(300_000, '5m')
    .argParser(asCli(duration({ min: 1000 })));
}

export function registerNodePowerCommands(node: Command): void {
  const power = node
    .command('power')
    .description("power a node on or off through its BMC, or read its power state (needs the node's power.driver)");
  for (const [name, { action, help }] of Object.entries(ACTIONS)) {
    const command = power.command(name).description(help).argument('<node>', 'node name or uuid').addOption(waitOption());
    if (name === 'on') {
      command.addOption(new Option('--boot-device <device>', 'what to boot from').choices(Object.keys(DEVICES)).default('disk'));
    }
    command.action(async (ref: string, opts: { wait: number; bootDevice?: keyof typeof DEVICES }, cmd: Command) =>
      withClient(cmd, async ({ nodes }, { json }) => {
        const result = await nodes.setNodePower(
          { node: ref, action, bootDevice: opts.bootDevice ? DEVICES[opts.bootDevice] : BootDevice.BOOT_DEVICE_UNSPECIFIED },
          { deadline: opts.wait },
        );
        if (json) return printJson({ node: ref, power: stateName(result.powerState), driver: result.driver });
        process.stdout.write(`node ${ref}: ${name} done through ${result.driver}; power is ${stateName(result.powerState)}\n`);
      }),
    );
  }
  power
    .command('status')
    .description("read the node's power state from its BMC")
    .argument('<node>', 'node name or uuid')
    .addOption(waitOption())
    .action(async (ref: string, opts: { wait: number }, cmd: Command) =>
      withClient(cmd, async ({ nodes }, { json }) => {
        const result = await nodes.getNodePower({ node: ref }, { deadline: opts.wait });
        if (json) return printJson({ node: ref, power: stateName(result.powerState), driver: result.driver });
        process.stdout.write(`${stateName(result.powerState)}\n`);
      }),
    );

  node
    .command('validate')
    .description("check a node's BMC without changing the machine: reachability, credentials, reset types, boot override, virtual media")
    .argument('<node>', 'node name or uuid')
    .addOption(waitOption())
    .addHelpText('after', '\nExits 1 when a check fails.')
    .action(async (ref: string, opts: { wait: number }, cmd: Command) =>
      withClient(cmd, async ({ nodes }, { json }) => {
        const result = await nodes.validateNode({ node: ref }, { deadline: opts.wait });
        if (json) printJson({ node: ref, driver: result.driver, checks: result.checks });
        else
          printTable(
            ['check', 'result', 'detail'],
            result.checks.map((c) => [c.check, c.ok ? 'ok' : 'FAILED', c.detail]),
          );
        if (result.checks.some((c) => !c.ok)) process.exitCode = 1;
      }),
    );
}
