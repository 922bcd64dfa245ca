import { parseSshPublicKey } from '../common/ssh-keys.js';
import { checkNetworkData } from '../controller/configdrive/network-data.js';
import { ImageFormat } from '../gen/metalcast/v1/image.js';
import type { DeploySpec } from '../gen/metalcast/v1/node.js';
import { formatBytes } from './output.js';

/**
 * What `metalcast node show` prints about a node's deploy: the image as it
 * was written, and the config drive's contents without the user data (its
 * type, size and sha256 only: it may carry secrets, and the controller
 * never returns it).
 */
export function deployFields(deploy: DeploySpec | undefined): [string, string][] {
  if (!deploy) return [['deploy', '-']];
  const format =
    deploy.imageFormat === ImageFormat.IMAGE_FORMAT_QCOW2
      ? `qcow2 ${deploy.imageSourceSha256.slice(0, 12)}… as raw`
      : deploy.imageFormat === ImageFormat.IMAGE_FORMAT_RAW
        ? 'raw'
        : '';
  const details = [format, deploy.imageSha256 ? `sha256 ${deploy.imageSha256.slice(0, 12)}…` : ''].filter(Boolean).join(', ');
  const image = `${deploy.image}${details ? ` (${details})` : ''}${deploy.target?.devicePath ? ` to ${deploy.target.devicePath}` : ''}`;
  const fields: [string, string][] = [['image', image]];
  const drive = deploy.configDrive;
  if (!drive) return [...fields, ['config drive', 'none']];
  fields.push([
    'config drive',
    `instance ${drive.instanceId}, ${formatBytes(Number(drive.sizeBytes))} ISO, sha256 ${drive.sha256.slice(0, 12)}…`,
  ]);
  fields.push(['  hostname', deploy.hostname || '-']);
  const keys = deploy.sshPublicKeys.map((key) => {
    try {
      const parsed = parseSshPublicKey(key);
      return `${parsed.fingerprint}${parsed.comment ? ` ${parsed.comment}` : ''} (${parsed.type})`;
    } catch {
      return key.slice(0, 40);
    }
  });
  fields.push(['  ssh keys', keys.length ? keys.join('; ') : '-']);
  let network = deploy.networkData ? 'given' : '-';
  if (deploy.networkData) {
    try {
      network = checkNetworkData(deploy.networkData).lines.join('; ');
    } catch {
      network = `${deploy.networkData.length} bytes of network_data.json`;
    }
  }
  fields.push(['  network', network]);
  fields.push([
    '  user data',
    deploy.userDataSizeBytes > 0 ? `${deploy.userDataType}, ${deploy.userDataSizeBytes} bytes, sha256 ${deploy.userDataSha256}` : '-',
  ]);
  return fields;
}
