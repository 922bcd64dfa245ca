import { readFileSync } from 'node:fs';
import { type Command, InvalidArgumentError, Option } from 'commander';
import { BOOT_METHOD_PROPERTY, BOOT_METHODS, POWER_DRIVER_PROPERTY } from '../../controller/power/drivers.js';
import { BOOT_MODE_PROPERTY, REDFISH_PASSWORD_SECRET, REDFISH_PROPERTIES } from '../../controller/power/redfish/settings.js';
import { withClient } from '../client.js';
import { printJson } from '../output.js';
import { cliIntegerString } from '../parsers.js';

/*
 * A node's BMC settings on the command line: `metalcast node create … --power
 * redfish --bmc-address …` and `metalcast node set NODE …`. The flags are the
 * same for every driver and become the driver's node properties
 * (power.redfish.*, power.ipmi.*); the password comes from a file or stdin,
 * never from a flag value (which `ps` and shell histories show), and goes to
 * the controller as a secret: stored sealed, never shown again.
 */

/** The node properties each BMC flag sets, per driver. */
const DRIVER_PROPERTIES: Record<string, Partial<Record<BmcFlag, string>> & { password: string }> = {
  redfish: {
    address: REDFISH_PROPERTIES.address,
    username: REDFISH_PROPERTIES.username,
    systemId: REDFISH_PROPERTIES.systemId,
    caFile: REDFISH_PROPERTIES.caFile,
    insecure: REDFISH_PROPERTIES.verifyTls,
    password: REDFISH_PASSWORD_SECRET,
  },
  ipmi: {
    address: 'power.ipmi.address',
    port: 'power.ipmi.port',
    username: 'power.ipmi.username',
    cipherSuite: 'power.ipmi.cipher_suite',
    password: 'power.ipmi.password',
  },
};

type BmcFlag = 'address' | 'port' | 'username' | 'systemId' | 'caFile' | 'insecure' | 'cipherSuite';

const FLAG_NAMES: Record<BmcFlag, string> = {
  address: '--bmc-address',
  port: '--bmc-port',
  username: '--bmc-username',
  systemId: '--bmc-system-id',
  caFile: '--bmc-ca-file',
  insecure: '--bmc-insecure',
  cipherSuite: '--bmc-cipher-suite',
};

/** What the BMC flags parse to. */
export interface BmcOptions {
  power?: string;
  bmcAddress?: string;
  bmcPort?: string;
  bmcUsername?: string;
  bmcPasswordFile?: string;
  bmcSystemId?: string;
  bmcCaFile?: string;
  bmcInsecure?: boolean;
  bmcCipherSuite?: string;
  bootMethod?: string;
  bootMode?: string;
}

/** Adds the BMC flags to a command (node create, node set). */
export function addBmcOptions(command: Command): Command {
  return command
    .option('--power <driver>', `power driver: redfish, ipmi or qemu (property ${POWER_DRIVER_PROPERTY}); 'none' to power by hand`)
    .option('--bmc-address <address>', 'BMC address: https://host[:port] for redfish (https is the default scheme), host for ipmi')
    .option('--bmc-port <port>', 'BMC UDP port for ipmi (default 623)', cliIntegerString(1, 65535))
    .option('--bmc-username <user>', 'BMC user name')
    .option(
      '--bmc-password-file <file>',
      "file holding the BMC password ('-' reads it from stdin); stored sealed as a node secret, never shown again",
    )
    .option('--bmc-system-id <id>', "redfish: the system's Id or @odata.id (default: the BMC's only system)")
    .option('--bmc-ca-file <file>', "redfish: PEM CA bundle, on the controller's host, to verify the BMC's certificate with")
    .option(
      '--bmc-insecure',
      "redfish: do not verify the BMC's TLS certificate (labs only: anyone on the BMC network could learn the password)",
    )
    .option('--bmc-cipher-suite <n>', 'ipmi: lanplus cipher suite, 0 to 255 (default 3)', cliIntegerString(0, 255))
    .addOption(new Option('--boot-method <method>', `how the node boots into the agent (${BOOT_METHOD_PROPERTY})`).choices(BOOT_METHODS))
    .addOption(new Option('--boot-mode <mode>', `firmware mode of boot overrides (${BOOT_MODE_PROPERTY})`).choices(['uefi', 'bios']));
}

/** The password in a file, or stdin for '-': one trailing newline removed. */
export function readPassword(source: string): string {
  let text: string;
  try {
    text = readFileSync(source === '-' ? 0 : source, 'utf8');
  } catch (error) {
    throw new InvalidArgumentError(`--bmc-password-file: cannot read ${source === '-' ? 'stdin' : source}: ${(error as Error).message}`);
  }
  const password = text.replace(/\r?\n$/, '');
  if (password === '') throw new InvalidArgumentError(`--bmc-password-file: ${source === '-' ? 'stdin' : source} is empty`);
  return password;
}

/** The properties to set and unset and the secrets to set that the BMC flags ask for, for `driver` (the node's power driver). */
export function bmcSettings(
  options: BmcOptions,
  currentDriver: string | undefined,
): { set: Record<string, string>; unset: string[]; secrets: Record<string, string> } {
  const set: Record<string, string> = {};
  const unset: string[] = [];
  const secrets: Record<string, string> = {};
  const driver = options.power ?? currentDriver;
  if (options.power === 'none') unset.push(POWER_DRIVER_PROPERTY);
  else if (options.power) set[POWER_DRIVER_PROPERTY] = options.power;
  const values: Partial<Record<BmcFlag, string>> = {
    address: options.bmcAddress,
    port: options.bmcPort,
    username: options.bmcUsername,
    systemId: options.bmcSystemId,
    caFile: options.bmcCaFile,
    insecure: options.bmcInsecure ? 'false' : undefined,
    cipherSuite: options.bmcCipherSuite,
  };
  const given = (Object.keys(values) as BmcFlag[]).filter((flag) => values[flag] !== undefined);
  const names = driver ? DRIVER_PROPERTIES[driver] : undefined;
  if ((given.length > 0 || options.bmcPasswordFile) && !names) {
    const flags = [...given.map((flag) => FLAG_NAMES[flag]), ...(options.bmcPasswordFile ? ['--bmc-password-file'] : [])];
    throw new InvalidArgumentError(
      `${flags.join(', ')} ${flags.length > 1 ? 'need' : 'needs'} a BMC power driver: add --power redfish or --power ipmi${driver ? ` (the node's is ${driver})` : ''}`,
    );
  }
  for (const flag of given) {
    const property = names?.[flag];
    if (!property) throw new InvalidArgumentError(`${FLAG_NAMES[flag]} does not apply to the ${driver} power driver`);
    set[property] = values[flag] as string;
  }
  if (options.bmcPasswordFile && names) secrets[names.password] = readPassword(options.bmcPasswordFile);
  if (options.bootMethod) set[BOOT_METHOD_PROPERTY] = options.bootMethod;
  if (options.bootMode) set[BOOT_MODE_PROPERTY] = options.bootMode;
  if (options.bmcInsecure) {
    process.stderr.write(
      "warning: --bmc-insecure: the controller will not verify this BMC's TLS certificate; anyone on the BMC network can pose as it and learn its password\n",
    );
  }
  return { set, unset, secrets };
}

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

function keyValue(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const index = value.indexOf('=');
  if (index < 1) throw new InvalidArgumentError(`'${value}' is not of the form key=value`);
  return { ...previous, [value.slice(0, index)]: value.slice(index + 1) };
}

/** `metalcast node set NODE …`: changes a node's properties, BMC settings and password. */
export function registerNodeSetCommand(node: Command): void {
  addBmcOptions(
    node
      .command('set')
      .description("change a node's properties, BMC settings and BMC password")
      .argument('<node>', 'node name or uuid')
      .option('--property <key=value>', 'set a property (repeatable)', keyValue)
      .option('--unset-property <key>', 'remove a property (repeatable)', collect)
      .option('--unset-secret <key>', 'remove a secret, e.g. power.ipmi.password (repeatable)', collect),
  )
    .addHelpText(
      'after',
      '\nExamples:\n  metalcast node set rack1-node1 --power redfish --bmc-address https://10.0.0.5 --bmc-username admin --bmc-password-file bmc.pass\n  echo -n "$PASS" | metalcast node set rack1-node1 --bmc-password-file -\n  metalcast node set rack1-node1 --boot-method virtual-media',
    )
    .action(
      async (
        ref: string,
        opts: BmcOptions & { property?: Record<string, string>; unsetProperty?: string[]; unsetSecret?: string[] },
        command: Command,
      ) =>
        withClient(command, async ({ nodes }, { json }) => {
          const { node: current } = await nodes.getNode({ node: ref });
          const bmc = bmcSettings(opts, current?.properties[POWER_DRIVER_PROPERTY]);
          const { node: updated } = await nodes.updateNode({
            node: ref,
            setProperties: { ...opts.property, ...bmc.set },
            unsetProperties: [...(opts.unsetProperty ?? []), ...bmc.unset],
            setSecrets: bmc.secrets,
            unsetSecrets: opts.unsetSecret ?? [],
          });
          if (!updated) throw new Error('the controller returned no node');
          if (json) return printJson({ ...updated, inventory: undefined });
          process.stdout.write(
            `updated node ${updated.name}${updated.properties[POWER_DRIVER_PROPERTY] ? `; check its BMC with: metalcast node validate ${updated.name}` : ''}\n`,
          );
        }),
    );
}
