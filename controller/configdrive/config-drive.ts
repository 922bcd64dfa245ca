import { execFile } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { parseSshPublicKey } from '../../common/ssh-keys.js';
import { checkNetworkData, NetworkDataError } from './network-data.js';
import { classifyUserData, UserDataError, type UserDataType } from './user-data.js';

/**
 * The config drive of a deploy: the files of OpenStack's config drive layout
 * that cloud-init's ConfigDrive datasource reads, in an ISO 9660 image with
 * the volume label config-2, made by Debian's xorriso (genisoimage when
 * xorriso is missing):
 *
 *   openstack/latest/meta_data.json     uuid (instance id), hostname, name, public_keys
 *   openstack/latest/network_data.json  when network data was given
 *   openstack/latest/user_data          when user data was given
 *   openstack/latest/vendor_data.json   {}
 *
 * The agent writes it into a partition at the end of the disk
 * (agent/configdrive/); cloud-init finds it there by its label.
 */

/** Most SSH keys one deploy may carry. */
export const MAX_SSH_KEYS = 32;
const MAX_SSH_KEY_BYTES = 16 * 1024;
/** Largest config drive image; what the inputs' limits allow is far below it. */
export const MAX_CONFIG_DRIVE_BYTES = 4 * 1024 * 1024;
/** The partition the agent makes for it (Ironic's size). */
export const CONFIG_DRIVE_PARTITION_BYTES = 64 * 1024 * 1024;
/** What a disk needs besides the image: the partition, alignment, and the backup GPT. */
export const CONFIG_DRIVE_DISK_BYTES = CONFIG_DRIVE_PARTITION_BYTES + 2 * 1024 * 1024;

const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i;

/** The instance configuration of a deploy request, checked. */
export interface InstanceConfig {
  hostname: string;
  sshPublicKeys: string[];
  userData: Buffer | undefined;
  userDataType: UserDataType | undefined;
  networkData: string | undefined;
}

const invalid = (message: string) => new MetalcastError(Status.INVALID_ARGUMENT, message);

/**
 * Checks the instance configuration of a deploy (fields of DeploySpec),
 * INVALID_ARGUMENT naming the field. Undefined when there is none: no
 * config drive is written then.
 */
export function checkInstanceConfig(spec: {
  hostname: string;
  sshPublicKeys: string[];
  userData: Uint8Array;
  networkData: string;
}): InstanceConfig | undefined {
  if (spec.hostname === '' && spec.sshPublicKeys.length === 0 && spec.userData.length === 0 && spec.networkData === '') return undefined;
  if (spec.hostname !== '') {
    const labels = spec.hostname.split('.');
    if (spec.hostname.length > 253 || !labels.every((label) => LABEL.test(label))) {
      throw invalid(
        `deploy.hostname: '${spec.hostname.slice(0, 80)}' is not a host name (labels of letters, digits and '-', at most 63 characters each, separated by dots)`,
      );
    }
  }
  if (spec.sshPublicKeys.length > MAX_SSH_KEYS) throw invalid(`deploy.ssh_public_keys: at most ${MAX_SSH_KEYS} keys`);
  const keys = spec.sshPublicKeys.map((key, i) => {
    if (key.length > MAX_SSH_KEY_BYTES) throw invalid(`deploy.ssh_public_keys[${i}]: longer than ${MAX_SSH_KEY_BYTES} characters`);
    try {
      return parseSshPublicKey(key).line;
    } catch (error) {
      throw invalid(`deploy.ssh_public_keys[${i}]: ${(error as Error).message}`);
    }
  });
  let userDataType: UserDataType | undefined;
  const userData = spec.userData.length > 0 ? Buffer.from(spec.userData) : undefined;
  if (userData) {
    try {
      userDataType = classifyUserData(userData);
    } catch (error) {
      if (error instanceof UserDataError) throw invalid(`deploy.user_data: ${error.message}`);
      throw error;
    }
  }
  if (spec.networkData !== '') {
    try {
      checkNetworkData(spec.networkData);
    } catch (error) {
      if (error instanceof NetworkDataError) throw invalid(`deploy.network_data: ${error.message}`);
      throw error;
    }
  }
  return {
    hostname: spec.hostname,
    sshPublicKeys: keys,
    userData,
    userDataType,
    networkData: spec.networkData === '' ? undefined : spec.networkData,
  };
}

/** A built config drive. */
export interface ConfigDrive {
  instanceId: string;
  iso: Buffer;
  gzip: Buffer;
  sha256: string;
}

/** The files of the config drive, by path inside it. */
export function configDriveFiles(config: InstanceConfig, instanceId: string, nodeName: string): Record<string, Buffer> {
  const meta = {
    uuid: instanceId,
    name: config.hostname || nodeName,
    ...(config.hostname ? { hostname: config.hostname } : {}),
    launch_index: 0,
    availability_zone: '',
    public_keys: Object.fromEntries(config.sshPublicKeys.map((key, i) => [`key-${i}`, key])),
    meta: {},
    files: [],
  };
  const files: Record<string, Buffer> = {
    'openstack/latest/meta_data.json': Buffer.from(`${JSON.stringify(meta, null, 2)}\n`),
    'openstack/latest/vendor_data.json': Buffer.from('{}\n'),
  };
  if (config.networkData) files['openstack/latest/network_data.json'] = Buffer.from(config.networkData);
  if (config.userData) files['openstack/latest/user_data'] = config.userData;
  return files;
}

/** Builds the ISO image; FAILED_PRECONDITION when neither xorriso nor genisoimage is installed. */
export async function buildConfigDrive(config: InstanceConfig, nodeName: string): Promise<ConfigDrive> {
  const instanceId = randomUUID();
  const work = await mkdtemp(join(tmpdir(), 'metalcast-configdrive-'));
  try {
    const root = join(work, 'root');
    for (const [path, data] of Object.entries(configDriveFiles(config, instanceId, nodeName))) {
      const full = join(root, path);
      await mkdir(join(full, '..'), { recursive: true });
      // The user data may be secret: readable by the owner only while it sits here.
      await writeFile(full, data, { mode: 0o600 });
    }
    const out = join(work, 'config-2.iso');
    await makeIso(root, out);
    const iso = await readFile(out);
    if (iso.length > MAX_CONFIG_DRIVE_BYTES) {
      throw invalid(`the config drive would be ${iso.length} bytes, more than ${MAX_CONFIG_DRIVE_BYTES}`);
    }
    return { instanceId, iso, gzip: gzipSync(iso, { level: 9 }), sha256: createHash('sha256').update(iso).digest('hex') };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** Rock Ridge and Joliet names as Nova writes them (lower case, long names), volume label config-2. */
const ISO_ARGS = ['-o', '', '-V', 'config-2', '-J', '-r', '-l', '-allow-lowercase', '-allow-multidot', '-quiet'];

function makeIso(root: string, out: string): Promise<void> {
  const args = [...ISO_ARGS];
  args[1] = out;
  const attempt = (command: string, prefix: string[]) =>
    new Promise<'missing' | undefined>((resolve, reject) => {
      execFile(command, [...prefix, ...args, root], { timeout: 60_000 }, (error, _stdout, stderr) => {
        if (!error) return resolve(undefined);
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') return resolve('missing');
        reject(new Error(`${command} could not build the config drive: ${String(stderr).trim().split('\n').at(-1) ?? error.message}`));
      });
    });
  return (async () => {
    if ((await attempt('xorriso', ['-as', 'mkisofs'])) === undefined) return;
    if ((await attempt('genisoimage', [])) === undefined) return;
    throw new MetalcastError(
      Status.FAILED_PRECONDITION,
      'the controller cannot build config drives: neither xorriso nor genisoimage is installed (apt-get install -y xorriso)',
    );
  })();
}
