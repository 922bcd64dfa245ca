import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { ensureConfigDrivePartition, partitionTableOf, runTool } from '../../agent/configdrive/partition.js';
import { missingAgentTools } from '../../agent/configdrive/tools.js';
import { ImageFormat } from '../../gen/metalcast/v1/image.js';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage } from '../helpers/images.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

/*
 * The config drive end to end on fake machines: the controller checks the
 * instance configuration and builds the ISO, the agent (a real process)
 * fetches it after the image and writes it into a new partition at the end
 * of its disk file: GPT (backup header moved to the end first) and MBR. The
 * partition is read back with xorriso, as cloud-init would mount it; the
 * API shows what was deployed without the user data; the user data's secret
 * appears in no log.
 */

const MIB = 1024 * 1024;
const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
const run = promisify(execFile);
const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));

/** A GPT disk image of `size` bytes: an ESP and a root partition, their first sectors marked. */
function gptImage(path: string, size: number): Buffer {
  writeFileSync(path, Buffer.alloc(size));
  execFileSync('sgdisk', ['--new=1:2048:+2M', '--typecode=1:ef00', '--new=2:0:0', '--typecode=2:8304', '--change-name=2:root', path]);
  const data = readFileSync(path);
  data.write('METALCAST-ROOT', 2048 * 512 + 2 * MIB);
  return data;
}

/** An MBR disk image with one partition. */
function mbrImage(path: string, size: number): Buffer {
  writeFileSync(path, Buffer.alloc(size));
  execFileSync('sfdisk', ['--quiet', path], { input: 'start=2048, type=83\n' });
  return readFileSync(path);
}

async function readAt(path: string, offset: number, length: number): Promise<Buffer> {
  const file = await open(path, 'r');
  try {
    const buffer = Buffer.alloc(length);
    await file.read(buffer, 0, length, offset);
    return buffer;
  } finally {
    await file.close();
  }
}

/** A file from inside an ISO image, read by xorriso as a mount would see it. */
function isoFile(iso: string, inside: string, out: string): string {
  execFileSync('xorriso', ['-osirrox', 'on', '-indev', iso, '-extract', inside, out], { stdio: 'ignore' });
  return readFileSync(out, 'utf8');
}

const NETWORK_DATA = JSON.stringify({
  links: [{ id: 'nic0', type: 'phy', ethernet_mac_address: '52:54:00:aa:bb:01', mtu: 1500 }],
  networks: [
    {
      id: 'net0',
      type: 'ipv4',
      link: 'nic0',
      ip_address: '192.0.2.50',
      netmask: '255.255.255.0',
      routes: [{ network: '0.0.0.0', netmask: '0.0.0.0', gateway: '192.0.2.1' }],
    },
  ],
  services: [{ type: 'dns', address: '192.0.2.53' }],
});
const SECRET = 'hunter2-do-not-log-me';
const USER_DATA = Buffer.from(`#cloud-config\nchpasswd:\n  users:\n    - name: debian\n      password: ${SECRET}\n`);

describe('config drive: built by the controller, written by the agent at the end of the disk', () => {
  let t: TestController;
  const dirs = tempDir('metalcast-configdrive-');
  const agents: AgentProcess[] = [];
  let key = '';

  before(async () => {
    t = await startTestController({
      heartbeatTimeout: '20s',
      heartbeatIntervalMin: '300ms',
      heartbeatIntervalMax: '600ms',
      sweepInterval: '500ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
      imageChunkSize: '256K',
    });
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'operator@example', '-f', join(dirs.path, 'key')]);
    key = readFileSync(join(dirs.path, 'key.pub'), 'utf8').trim();
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await t.destroy();
    dirs.remove();
  });

  const waitFor = (name: string, state: ProvisionState, timeoutMs = 60_000) =>
    eventually(
      async () => {
        const { node } = await t.nodes.getNode({ node: name });
        if (node?.provisionState === state) return node;
        if (node?.lastError) throw new Error(`node ${name} is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
        return undefined;
      },
      { timeoutMs, what: `${name} to reach ${ProvisionState[state]}` },
    );

  /** A node with a fake machine and an agent, inspected and available. */
  async function availableNode(name: string, index: number) {
    const machine = await uniqueFakeMachine(join(dirs.path, name), index);
    await t.nodes.createNode({ name, macAddresses: [machine.macs[0] as string] });
    await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setProvisionState({ node: name, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
    const agent = spawnAgent({ controller: t.controller.grpcAddress, root: machine.root });
    agents.push(agent);
    await waitFor(name, ProvisionState.PROVISION_STATE_AVAILABLE);
    return { machine, agent, disk: (machine.disks[0] as { path: string; sizeBytes: number }).path };
  }

  it('GPT: moves the backup header to the end, adds config-2 there, and the drive holds what cloud-init reads', async () => {
    const image = gptImage(join(dirs.path, 'gpt.img'), 16 * MIB);
    await addImage(t.controller, 'gpt-os', image);
    const { agent, disk } = await availableNode('cd-gpt', 401);

    await t.nodes.setProvisionState({
      node: 'cd-gpt',
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: {
        image: 'gpt-os',
        target: undefined,
        hostname: 'web-01.example.org',
        sshPublicKeys: [key],
        userData: USER_DATA,
        networkData: NETWORK_DATA,
      } as never,
    });
    const active = await waitFor('cd-gpt', ProvisionState.PROVISION_STATE_ACTIVE);

    // The disk: the image, then a config-2 partition ending at the disk's end, in a GPT whose backup header is at the end.
    assert.equal((await readAt(disk, 2048 * 512 + 2 * MIB, 14)).toString(), 'METALCAST-ROOT', 'the image is intact');
    const table = execFileSync('sgdisk', ['--verify', disk]).toString();
    assert.match(table, /No problems found/);
    const printed = execFileSync('sgdisk', ['--print', disk]).toString();
    const row = /^\s+3\s+(\d+)\s+(\d+)\s+.*config-2\s*$/m.exec(printed);
    assert.ok(row, printed);
    const lastUsable = Number(/last usable sector is (\d+)/.exec(printed)?.[1]);
    assert.equal(Number(row[2]), lastUsable, 'the partition ends at the last usable sector of the whole disk');
    const start = Number(row[1]);
    assert.equal(start % 2048, 0, 'aligned to 1 MiB');

    // The partition holds an ISO 9660 image labelled config-2 with the OpenStack layout.
    const drive = active.deploy?.configDrive;
    assert.ok(drive);
    const iso = await readAt(disk, start * 512, Number(drive.sizeBytes));
    assert.equal(sha256(iso), drive.sha256);
    assert.equal(iso.subarray(0x8028, 0x8028 + 8).toString(), 'config-2');
    const isoPath = join(dirs.path, 'gpt.iso');
    writeFileSync(isoPath, iso);
    const meta = JSON.parse(isoFile(isoPath, '/openstack/latest/meta_data.json', join(dirs.path, 'meta.json'))) as {
      uuid: string;
      hostname: string;
      public_keys: Record<string, string>;
    };
    assert.equal(meta.hostname, 'web-01.example.org');
    assert.equal(meta.uuid, drive.instanceId);
    assert.deepEqual(Object.values(meta.public_keys), [key]);
    assert.equal(isoFile(isoPath, '/openstack/latest/user_data', join(dirs.path, 'ud')), USER_DATA.toString());
    assert.equal(isoFile(isoPath, '/openstack/latest/network_data.json', join(dirs.path, 'nd')), NETWORK_DATA);

    // What the API shows: the deploy, without the user data.
    const deploy = active.deploy;
    assert.equal(deploy?.hostname, 'web-01.example.org');
    assert.deepEqual(deploy?.sshPublicKeys, [key]);
    assert.equal(deploy?.userData.length, 0, 'user data is never returned');
    assert.equal(deploy?.userDataSha256, sha256(USER_DATA));
    assert.equal(deploy?.userDataSizeBytes, USER_DATA.length);
    assert.equal(deploy?.userDataType, 'cloud-config');
    assert.equal(deploy?.networkData, NETWORK_DATA);
    assert.equal(deploy?.imageFormat, ImageFormat.IMAGE_FORMAT_RAW);
    assert.equal(deploy?.imageSha256, sha256(image));
    const listed = (await t.nodes.listNodes({ provisionState: 0, pageSize: 100, pageToken: '' })).nodes.find((n) => n.name === 'cd-gpt');
    assert.equal(listed?.deploy?.networkData, '', 'lists leave the network data out');
    const events = (await t.nodes.listNodeEvents({ node: 'cd-gpt' })).events.map((e) => e.message).join('\n');
    assert.match(events, /config drive in partition 3 \(gpt\)/);

    // metalcast node show: the image, its format, the config drive minus the secret.
    const env = {
      ...process.env,
      METALCAST_CONTROLLER: t.controller.grpcAddress,
      METALCAST_TOKEN: t.adminToken,
      METALCAST_INSECURE: 'true',
    };
    const shown = (await run(process.execPath, [BIN, 'node', 'show', 'cd-gpt'], { env })).stdout;
    assert.match(shown, /image\s+gpt-os \(raw, sha256 [0-9a-f]{12}…\)/);
    assert.match(shown, /hostname\s+web-01\.example\.org/);
    assert.match(shown, /ssh keys\s+SHA256:\S+ operator@example \(ssh-ed25519\)/);
    assert.match(shown, /network\s+nic0 \(52:54:00:aa:bb:01\) 192\.0\.2\.50\/24 via 192\.0\.2\.1; dns 192\.0\.2\.53/);
    assert.match(shown, new RegExp(`user data\\s+cloud-config, ${USER_DATA.length} bytes, sha256 ${sha256(USER_DATA)}`));
    assert.match(shown, new RegExp(`config drive\\s+instance ${drive.instanceId}, .* ISO, sha256 ${drive.sha256.slice(0, 12)}`));
    assert.doesNotMatch(shown, new RegExp(SECRET));
    const json = (await run(process.execPath, [BIN, 'node', 'show', 'cd-gpt', '--json'], { env })).stdout;
    assert.doesNotMatch(json, new RegExp(SECRET));

    // The secret in the user data is in no log line of the agent.
    assert.ok(agent.logs.some((line) => line.msg === 'config drive partition ready'));
    assert.doesNotMatch(JSON.stringify(agent.logs), new RegExp(SECRET));

    // Cleaning forgets the config drive.
    await t.nodes.setProvisionState({ node: 'cd-gpt', action: ProvisionAction.PROVISION_ACTION_UNDEPLOY });
    const cleaned = await waitFor('cd-gpt', ProvisionState.PROVISION_STATE_AVAILABLE);
    assert.equal(cleaned.deploy, undefined);
    assert.equal(await t.controller.store.getConfigDrive(cleaned.uuid), undefined);
  });

  it('MBR: appends a primary partition at the end of the disk', async () => {
    const image = mbrImage(join(dirs.path, 'mbr.img'), 8 * MIB);
    await addImage(t.controller, 'mbr-os', image);
    const { disk } = await availableNode('cd-mbr', 402);
    await t.nodes.setProvisionState({
      node: 'cd-mbr',
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: { image: 'mbr-os', target: undefined, hostname: 'mbr-host', sshPublicKeys: [], networkData: '' } as never,
    });
    const active = await waitFor('cd-mbr', ProvisionState.PROVISION_STATE_ACTIVE);
    const layout = JSON.parse(execFileSync('sfdisk', ['--json', disk]).toString()) as {
      partitiontable: { label: string; partitions: { start: number; size: number; type: string }[] };
    };
    assert.equal(layout.partitiontable.label, 'dos');
    const [first, second] = layout.partitiontable.partitions;
    assert.equal(first?.start, 2048);
    assert.equal(second?.type, '83');
    const diskSectors = (1024 * MIB) / 512;
    assert.equal((second?.start ?? 0) + (second?.size ?? 0), diskSectors, 'the partition ends at the end of the disk');
    const iso = await readAt(disk, (second?.start ?? 0) * 512, Number(active.deploy?.configDrive?.sizeBytes));
    assert.equal(sha256(iso), active.deploy?.configDrive?.sha256);
  });

  it('refuses bad instance configuration at the deploy request, naming the field', async () => {
    await t.nodes.createNode({ name: 'cd-bad', macAddresses: ['52:54:00:aa:cc:01'] });
    const deploy = (extra: Record<string, unknown>) =>
      t.nodes.setProvisionState({
        node: 'cd-bad',
        action: ProvisionAction.PROVISION_ACTION_DEPLOY,
        deploy: {
          image: 'gpt-os',
          target: undefined,
          hostname: '',
          sshPublicKeys: [],
          networkData: '',
          userData: Buffer.alloc(0),
          ...extra,
        } as never,
      });
    await assertRejectsWith(deploy({ hostname: 'bad_name!' }), Status.INVALID_ARGUMENT, /deploy\.hostname: 'bad_name!' is not a host name/);
    await assertRejectsWith(
      deploy({ sshPublicKeys: [readFileSync(join(dirs.path, 'key'), 'utf8')] }),
      Status.INVALID_ARGUMENT,
      /deploy\.ssh_public_keys\[0\]: this is a private key/,
    );
    await assertRejectsWith(
      deploy({ userData: Buffer.from(`#cloud-config\nusers: [\npassword: ${SECRET}\n`) }),
      Status.INVALID_ARGUMENT,
      /deploy\.user_data: is #cloud-config but not valid YAML/,
    );
    const error = await assertRejectsWith(
      deploy({ userData: Buffer.from(`password=${SECRET}`) }),
      Status.INVALID_ARGUMENT,
      /deploy\.user_data/,
    );
    assert.doesNotMatch(error.details, new RegExp(SECRET), 'the user data is not quoted back');
    await assertRejectsWith(deploy({ networkData: '{"links": [' }), Status.INVALID_ARGUMENT, /deploy\.network_data: not JSON/);
    await assertRejectsWith(
      deploy({
        networkData: JSON.stringify({
          links: [{ id: 'a', type: 'phy', ethernet_mac_address: '52:54:00:00:00:01' }],
          networks: [{ type: 'ipv4', link: 'b', ip_address: '10.0.0.2', netmask: '255.255.255.0' }],
        }),
      }),
      Status.INVALID_ARGUMENT,
      /deploy\.network_data: networks\[0\]\.link: 'b' is not the id of a link/,
    );
    await assertRejectsWith(
      deploy({
        networkData: JSON.stringify({
          links: [{ id: 'a', type: 'phy', ethernet_mac_address: '52:54:00:00:00:01' }],
          networks: [{ type: 'ipv4', link: 'a', ip_address: '10.0.0.300', netmask: '255.255.255.0' }],
        }),
      }),
      Status.INVALID_ARGUMENT,
      /networks\[0\]\.ip_address: '10\.0\.0\.300' is not an IP address/,
    );
  });
});

describe('config drive partition: the pieces', () => {
  const dirs = tempDir('metalcast-cdpart-');
  after(() => dirs.remove());

  it('reuses the partition of an earlier attempt instead of adding another', async () => {
    const path = join(dirs.path, 'disk.img');
    gptImage(path, 16 * MIB);
    // The "disk" is larger than the image, as after write_image.
    execFileSync('truncate', ['-s', String(128 * MIB), path]);
    const first = await ensureConfigDrivePartition(path, 128 * MIB, 64 * MIB);
    const again = await ensureConfigDrivePartition(path, 128 * MIB, 64 * MIB);
    assert.equal(first.reused, false);
    assert.equal(again.reused, true);
    assert.equal(again.number, first.number);
    assert.equal(again.offsetBytes, first.offsetBytes);
  });

  it('reads sgdisk as it prints a block device (logical/physical sector sizes)', async () => {
    const path = join(dirs.path, 'device.img');
    gptImage(path, 16 * MIB);
    execFileSync('truncate', ['-s', String(128 * MIB), path]);
    const asDevice = async (command: string, args: string[], input?: string) => {
      const out = await runTool(command, args, input);
      return out.replace('Sector size (logical): 512 bytes', 'Sector size (logical/physical): 512/4096 bytes');
    };
    const made = await ensureConfigDrivePartition(path, 128 * MIB, 64 * MIB, asDevice);
    assert.equal(made.number, 3);
    assert.equal(made.offsetBytes + made.sizeBytes, 128 * MIB - 33 * 512, 'up to the last usable sector');
  });

  it('says what is wrong when the disk has no partition table or no room', async () => {
    const bare = join(dirs.path, 'bare.img');
    writeFileSync(bare, Buffer.alloc(8 * MIB));
    assert.equal(await partitionTableOf(bare), undefined);
    await assert.rejects(ensureConfigDrivePartition(bare, 8 * MIB, 64 * MIB), /has no partition table after the image was written/);
    const full = join(dirs.path, 'full.img');
    gptImage(full, 80 * MIB);
    await assert.rejects(ensureConfigDrivePartition(full, 80 * MIB, 64 * MIB), /no room for a 64 MiB config drive partition/);
  });

  it('checks for the tools the agent runs at start-up, naming their packages, and finds them in /usr/sbin off the PATH', async () => {
    assert.equal(missingAgentTools('/usr/sbin:/usr/bin:/sbin:/bin', []), undefined);
    assert.match(
      missingAgentTools('/usr/bin', []) ?? '',
      /the agent needs sgdisk \(Debian package gdisk; .*\) and sfdisk \(Debian package fdisk; .*\), which are not on the PATH \(\/usr\/bin\) nor in any other directory: apt-get install -y gdisk fdisk/,
    );
    // A non-root user's PATH on Debian has no /usr/sbin, where both live: they are found there all the same.
    assert.equal(missingAgentTools('/usr/bin'), undefined);
    // A real agent process with such a PATH starts (it used to stop with exit 2, and `npm run demo` with it).
    const machine = await uniqueFakeMachine(join(dirs.path, 'm'), 403);
    const agent = spawn(process.execPath, [BIN, 'agent', '--controller', '127.0.0.1:1', '--insecure', '--root', machine.root], {
      env: { ...process.env, PATH: '/usr/bin' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    agent.stdout.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    agent.stderr.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    const exited = once(agent, 'exit');
    try {
      await eventually(() => output.includes('hardware discovered'), { timeoutMs: 15_000, what: 'the agent to start' }).catch(() =>
        assert.fail(`the agent did not start: ${output}`),
      );
      assert.doesNotMatch(output, /the agent needs sgdisk/);
    } finally {
      agent.kill('SIGKILL');
      await exited;
    }
  });
});
