import { Argument, type Command, InvalidArgumentError, Option } from 'commander';
import { Inventory } from '../../gen/metalcast/v1/inventory.js';
import { readFileSync } from 'node:fs';
import { AbortPower, DeploySpec, type Node, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import {
  allowedActions,
  PROVISION_ACTIONS,
  PROVISION_STATES,
  type ProvisionState as StateName,
} from '../../controller/provisioning/states.js';
import { withClient } from '../client.js';
import { cliInteger, cliSize, MAX_DISK_BYTES } from '../parsers.js';
import { deployFields } from '../deploy-format.js';
import { stateName } from '../node-format.js';
import { chunkCounts, watchNodes } from './node-watch.js';
import { addWaitOptions, waitForRest } from './node-wait.js';
import { addBmcOptions, type BmcOptions, bmcSettings, registerNodeSetCommand } from './node-bmc.js';
import { registerNodePowerCommands } from './node-power.js';
import { formatAge, formatBytes, formatTime, printFields, printJson, printTable } from '../output.js';

const stateHelp = PROVISION_STATES.map((s) => `${s} (${allowedActions(s).join(', ') || 'no actions'})`).join('\n    ');

function nodeJson(node: Node) {
  return {
    ...node,
    provisionState: stateName(node.provisionState),
    targetProvisionState: stateName(node.targetProvisionState),
    inventory: node.inventory ? Inventory.toJSON(node.inventory) : undefined,
    deploy: node.deploy ? DeploySpec.toJSON(node.deploy) : undefined,
  };
}

/** The lines of an OpenSSH public key file (one key, or several as in authorized_keys). */
function readSshKeys(files: string[]): string[] {
  return files.flatMap((file) =>
    readFileSync(file, 'utf8')
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line !== '' && !line.startsWith('#')),
  );
}

function printNode(node: Node): void {
  printFields([
    ['uuid', node.uuid],
    ['name', node.name],
    ['provision state', stateName(node.provisionState)],
    ['target state', stateName(node.targetProvisionState)],
    ['maintenance', node.maintenance ? `yes: ${node.maintenanceReason}` : 'no'],
    ['last error', node.lastError || '-'],
    ['MACs', node.macAddresses.join(', ')],
    [
      'properties',
      Object.entries(node.properties)
        .map(([k, v]) => `${k}=${v}`)
        .join(', ') || '-',
    ],
    // Secret values never reach the CLI: only their names.
    ['secrets', node.secretKeys.map((key) => `${key}=********`).join(', ') || '-'],
    ['agent', node.agentAddress ? `${node.agentAddress} (version ${node.agentVersion || '?'})` : '-'],
    ['last heartbeat', formatAge(node.lastHeartbeatAt)],
    ['lock', node.reservation ? `${node.reservation} (${node.reservationOperation})` : '-'],
    ['progress', progressLine(node)],
    ...deployFields(node.deploy),
    [
      'inventory',
      node.inventory
        ? `${node.inventory.disks.length} disks, ${node.inventory.interfaces.length} NICs (metalcast node inventory ${node.name})`
        : 'not inspected',
    ],
    ['created', formatTime(node.createdAt)],
    ['updated', formatTime(node.updatedAt)],
  ]);
}

function progressLine(node: Node): string {
  const p = node.progress;
  if (!p || p.totalBytes === 0) return p?.phase || '-';
  const percent = ((100 * p.doneBytes) / p.totalBytes).toFixed(1);
  const rate = p.rateBytesPerSecond > 0 ? `, ${formatBytes(p.rateBytesPerSecond)}/s` : '';
  return `${p.phase} ${formatBytes(p.doneBytes)} of ${formatBytes(p.totalBytes)} (${percent}%${rate}${p.resumes ? `, ${p.resumes} resumes` : ''})${chunkCounts(p)}`;
}

function parseProperty(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const index = value.indexOf('=');
  if (index < 1) throw new InvalidArgumentError(`'${value}' is not of the form key=value`);
  return { ...previous, [value.slice(0, index)]: value.slice(index + 1) };
}

function parseState(value: string): StateName {
  const normalised = value.replaceAll('-', '_').replaceAll(' ', '_').toLowerCase();
  if (!(PROVISION_STATES as readonly string[]).includes(normalised)) {
    throw new InvalidArgumentError(`'${value}' is not a provision state; one of ${PROVISION_STATES.join(', ')}`);
  }
  return normalised as StateName;
}

/** `metalcast node …`: the operator commands for nodes. */
export function registerNodeCommands(program: Command, addOperatorOptions: (command: Command) => Command): void {
  const node = addOperatorOptions(program.command('node'))
    .description('enrol, list, inspect and manage nodes')
    .addHelpText('after', `\nProvision states and the actions allowed from each:\n    ${stateHelp}\n`);

  addBmcOptions(
    node
      .command('create')
      .description('enrol a machine by name and MAC addresses, with its BMC settings')
      .argument('<name>', 'unique node name')
      .requiredOption('--mac <mac>', 'MAC address of a NIC (repeat for each)', (v: string, p: string[] = []) => [...p, v])
      .option('--property <key=value>', 'free-form property (repeatable)', parseProperty),
  ).action(async (name: string, opts: BmcOptions & { mac: string[]; property?: Record<string, string> }, command: Command) =>
    withClient(command, async ({ nodes }, { json }) => {
      const bmc = bmcSettings(opts, opts.property?.['power.driver']);
      const { node: created } = await nodes.createNode({
        name,
        macAddresses: opts.mac,
        properties: { ...opts.property, ...bmc.set },
        secrets: bmc.secrets,
      });
      if (!created) throw new Error('the controller returned no node');
      if (json) printJson(nodeJson(created));
      else
        process.stdout.write(
          `created node ${created.name} (${created.uuid}) in state enroll; next: metalcast node manage ${created.name}\n`,
        );
    }),
  );

  registerNodeSetCommand(node);
  registerNodePowerCommands(node);

  node
    .command('list')
    .description('list nodes')
    .option('--state <state>', 'only nodes in this provision state', parseState)
    .addOption(new Option('--maintenance <yes|no>', 'only nodes in (yes) or out of (no) maintenance').choices(['yes', 'no']))
    .option('--limit <n>', 'most nodes to show (all pages are fetched up to this)', cliInteger(1, 1_000_000), 10_000)
    .action(async (opts: { state?: StateName; maintenance?: 'yes' | 'no'; limit: number }, command: Command) =>
      withClient(command, async ({ nodes }, { json }) => {
        const all: Node[] = [];
        let pageToken = '';
        do {
          const page = await nodes.listNodes({
            provisionState: opts.state ? ProvisionState[`PROVISION_STATE_${opts.state.toUpperCase()}` as keyof typeof ProvisionState] : 0,
            maintenance: opts.maintenance === undefined ? undefined : opts.maintenance === 'yes',
            pageSize: Math.min(1000, opts.limit - all.length),
            pageToken,
          });
          all.push(...page.nodes);
          pageToken = page.nextPageToken;
        } while (pageToken !== '' && all.length < opts.limit);
        if (json) return printJson(all.map(nodeJson));
        printTable(
          ['name', 'uuid', 'state', 'maintenance', 'last heartbeat', 'last error'],
          all.map((n) => [
            n.name,
            n.uuid,
            stateName(n.provisionState),
            n.maintenance ? 'yes' : 'no',
            formatAge(n.lastHeartbeatAt),
            n.lastError.slice(0, 60),
          ]),
        );
      }),
    );

  node
    .command('show')
    .description('show one node')
    .argument('<node>', 'node name or uuid')
    .action(async (ref: string, _opts: unknown, command: Command) =>
      withClient(command, async ({ nodes }, { json }) => {
        const { node: found } = await nodes.getNode({ node: ref });
        if (!found) throw new Error('the controller returned no node');
        if (json) printJson(nodeJson(found));
        else printNode(found);
      }),
    );

  node
    .command('inventory')
    .description('show the hardware an inspection found')
    .argument('<node>', 'node name or uuid')
    .action(async (ref: string, _opts: unknown, command: Command) =>
      withClient(command, async ({ nodes }, { json }) => {
        const { node: found } = await nodes.getNode({ node: ref });
        const inventory = found?.inventory;
        if (!inventory) {
          process.stderr.write(`node ${ref} has not been inspected yet; run: metalcast node inspect ${ref}\n`);
          process.exitCode = 1;
          return;
        }
        if (json) return printJson(Inventory.toJSON(inventory));
        const sys = inventory.system;
        printFields([
          ['system', sys ? `${sys.vendor} ${sys.productName} serial ${sys.serialNumber || '-'} uuid ${sys.uuid || '-'}` : '-'],
          ['cpu', inventory.cpu ? `${inventory.cpu.count} x ${inventory.cpu.modelName} (${inventory.cpu.architecture})` : '-'],
          ['memory', inventory.memory ? formatBytes(inventory.memory.totalBytes) : '-'],
        ]);
        process.stdout.write('\n');
        printTable(
          ['disk', 'size', 'model', 'serial', 'rotational', 'by-path'],
          inventory.disks.map((d) => [
            d.devicePath,
            formatBytes(d.sizeBytes),
            d.model,
            d.serial,
            d.rotational ? 'yes' : 'no',
            d.byPath || '-',
          ]),
        );
        process.stdout.write('\n');
        printTable(
          ['nic', 'mac', 'speed', 'carrier', 'driver'],
          inventory.interfaces.map((i) => [
            i.name,
            i.macAddress,
            i.speedMbps ? `${i.speedMbps} Mb/s` : '-',
            i.hasCarrier ? 'yes' : 'no',
            i.driver || '-',
          ]),
        );
      }),
    );

  node
    .command('delete')
    .description('delete a node (not while deploying or active)')
    .argument('<node>', 'node name or uuid')
    .action(async (ref: string, _opts: unknown, command: Command) =>
      withClient(command, async ({ nodes }) => {
        await nodes.deleteNode({ node: ref });
        process.stdout.write(`deleted node ${ref}\n`);
      }),
    );

  node
    .command('maintenance')
    .description('put a node into maintenance (the controller leaves it alone) or take it out')
    .argument('<node>', 'node name or uuid')
    .addArgument(new Argument('<on|off>', 'on or off').choices(['on', 'off']))
    .option('--reason <text>', 'why (required for on)')
    .action(async (ref: string, onOff: 'on' | 'off', opts: { reason?: string }, command: Command) =>
      withClient(command, async ({ nodes }, { json }) => {
        const { node: updated } = await nodes.setMaintenance({ node: ref, enabled: onOff === 'on', reason: opts.reason ?? '' });
        if (json && updated) return printJson(nodeJson(updated));
        process.stdout.write(`maintenance ${onOff} for node ${ref}\n`);
      }),
    );

  node
    .command('events')
    .description("show a node's history")
    .argument('<node>', 'node name or uuid')
    .action(async (ref: string, _opts: unknown, command: Command) =>
      withClient(command, async ({ nodes }, { json }) => {
        const events = [];
        let pageToken = '';
        do {
          const page = await nodes.listNodeEvents({ node: ref, pageSize: 1000, pageToken });
          events.push(...page.events);
          pageToken = page.nextPageToken;
        } while (pageToken !== '');
        if (json) return printJson(events.map((e) => ({ ...e, fromState: stateName(e.fromState), toState: stateName(e.toState) })));
        printTable(
          ['time', 'kind', 'actor', 'message'],
          events.map((e) => [formatTime(e.time), e.kind, e.actor, e.message]),
        );
      }),
    );

  const deploy = node
    .command('deploy')
    .description('write an image to an available node and boot it (available -> deploying -> deploy wait -> active)')
    .argument('<node>', 'node name or uuid')
    .requiredOption('--image <name>', 'image to deploy (metalcast image list)')
    .option('--disk <path>', 'target disk by device path, e.g. /dev/sda or a /dev/disk/by-path link')
    .option('--disk-serial <serial>', 'target disk by serial number')
    .option('--disk-model <model>', 'target disk by model')
    .option(
      '--disk-size <size>',
      'target disk by exact size: bytes, or with a K, M, G or T suffix (powers of 1024)',
      cliSize(1, MAX_DISK_BYTES),
    )
    .option('--disk-min-size <size>', 'smallest acceptable disk size: bytes, or with a K, M, G or T suffix', cliSize(1, MAX_DISK_BYTES))
    .addOption(new Option('--disk-rotational <yes|no>', 'spinning (yes) or solid-state (no) disk').choices(['yes', 'no']))
    .option('--hostname <name>', 'host name of the deployed system (config drive)')
    .option(
      '--ssh-key <file>',
      "OpenSSH public key file for the image's default user (repeatable; config drive)",
      (v: string, p: string[] = []) => [...p, v],
    )
    .option('--user-data <file>', 'cloud-init user data: #cloud-config or a script (config drive; never shown back)')
    .option('--network-data <file>', 'OpenStack network_data.json: static addresses, bonds, VLANs (config drive)')
    .option('--no-fanout', "the agent fetches every chunk from the controller and serves none to its wave's peers (docs/fanout.md)")
    .addHelpText(
      'after',
      '\nWithout --disk* hints the smallest disk that holds the image is used.' +
        '\nWith --hostname, --ssh-key, --user-data or --network-data the controller builds a config drive (label config-2,\n' +
        "the layout cloud-init's ConfigDrive datasource reads) that the agent writes into a 64 MiB partition at the end\n" +
        'of the disk. metalcast node show displays it, with the user data as its size and sha256 only.',
    );
  addWaitOptions(deploy).action(
    async (
      ref: string,
      opts: {
        image: string;
        disk?: string;
        diskSerial?: string;
        diskModel?: string;
        diskSize?: number;
        diskMinSize?: number;
        diskRotational?: 'yes' | 'no';
        hostname?: string;
        sshKey?: string[];
        userData?: string;
        networkData?: string;
        fanout: boolean;
        wait?: boolean;
        waitTimeout: number;
      },
      command: Command,
    ) =>
      withClient(command, async ({ nodes }, { json }) => {
        const target = {
          devicePath: opts.disk,
          name: undefined,
          sizeBytes: opts.diskSize,
          minSizeBytes: opts.diskMinSize,
          serial: opts.diskSerial,
          model: opts.diskModel,
          rotational: opts.diskRotational === undefined ? undefined : opts.diskRotational === 'yes',
        };
        const { node: updated } = await nodes.setProvisionState({
          node: ref,
          action: ProvisionAction.PROVISION_ACTION_DEPLOY,
          deploy: DeploySpec.fromPartial({
            image: opts.image,
            target,
            hostname: opts.hostname ?? '',
            sshPublicKeys: readSshKeys(opts.sshKey ?? []),
            userData: opts.userData ? readFileSync(opts.userData) : Buffer.alloc(0),
            networkData: opts.networkData ? readFileSync(opts.networkData, 'utf8') : '',
            fanoutDisabled: opts.fanout === false,
          }),
        });
        if (!updated) throw new Error('the controller returned no node');
        if (opts.wait) {
          process.exitCode = await waitForRest(nodes, updated.name, opts.waitTimeout, json ?? false);
          return;
        }
        if (json) return printJson(nodeJson(updated));
        process.stdout.write(
          `node ${updated.name} is now ${stateName(updated.provisionState)}; follow it with: metalcast node watch ${updated.name}\n`,
        );
      }),
  );

  node
    .command('watch')
    .description(
      'show nodes live, with the progress of their agents, until Ctrl-C (or --until); without a terminal, a line per state change and a summary',
    )
    .argument('[nodes...]', 'node names or uuids (default: all)')
    .option('--until <states>', 'exit once every watched node is in one of these comma-separated states (e.g. active,deploy_failed)')
    .action(async (refs: string[], opts: { until?: string }, command: Command) =>
      withClient(command, async ({ nodes }, { json }) => {
        const until = opts.until ? new Set(opts.until.split(',').map((s) => parseState(s.trim()))) : undefined;
        await watchNodes(nodes, refs, until, json ?? false);
      }),
    );

  for (const action of PROVISION_ACTIONS) {
    if (action === 'deploy') continue; // has its own options, above
    const sub = node
      .command(action)
      .description(
        `run the ${action} provision action (allowed from: ${PROVISION_STATES.filter((s) => allowedActions(s).includes(action)).join(', ')})`,
      )
      .argument('<node>', 'node name or uuid');
    if (action === 'abort') {
      sub.option(
        '--power <what>',
        'what to do with the machine: off (power it off through its power driver, or else its agent) or keep (leave it as it is)',
        parseAbortPower,
        AbortPower.ABORT_POWER_OFF,
      );
    }
    addWaitOptions(sub).action(async (ref: string, opts: { wait?: boolean; waitTimeout: number; power?: AbortPower }, command: Command) =>
      withClient(command, async ({ nodes }, { json }) => {
        const { node: updated } = await nodes.setProvisionState({
          node: ref,
          action: ProvisionAction[`PROVISION_ACTION_${action.toUpperCase()}` as keyof typeof ProvisionAction],
          abortPower: opts.power ?? AbortPower.ABORT_POWER_UNSPECIFIED,
        });
        if (!updated) throw new Error('the controller returned no node');
        if (opts.wait) {
          process.exitCode = await waitForRest(nodes, updated.name, opts.waitTimeout, json ?? false);
          return;
        }
        if (json) return printJson(nodeJson(updated));
        process.stdout.write(`node ${updated.name} is now ${stateName(updated.provisionState)}\n`);
      }),
    );
  }
}

function parseAbortPower(value: string): AbortPower {
  if (value === 'off') return AbortPower.ABORT_POWER_OFF;
  if (value === 'keep') return AbortPower.ABORT_POWER_KEEP;
  throw new InvalidArgumentError(`'${value}' is not off or keep`);
}
