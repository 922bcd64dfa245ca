import { existsSync } from 'node:fs';
import { findTool, newestKernel, readKernel, staticBusybox } from '../scripts/ramdisk/host-tools.js';
import { qemuUnavailable } from './qemu.js';

/** Everything the lab needs from Debian: QEMU and iPXE, the guests' kernel and busybox, and the test image's tools. */
export const LAB_APT_PACKAGES = 'qemu-system-x86 ipxe-qemu linux-image-amd64 busybox-static syslinux syslinux-common mtools dosfstools';

/** iPXE for QEMU's virtio NIC, as Debian's ipxe-qemu installs it. */
const IPXE_VIRTIO_ROMS = ['/usr/lib/ipxe/qemu/efi-virtio.rom', '/usr/share/qemu/efi-virtio.rom'];

/**
 * Why QEMU lab guests cannot run here (one line per missing piece, and the
 * apt-get command that installs everything), or undefined when they can.
 */
export function labUnavailable(): string | undefined {
  const missing: string[] = [];
  const qemu = qemuUnavailable();
  if (qemu) missing.push(qemu);
  if (!IPXE_VIRTIO_ROMS.some((rom) => existsSync(rom))) missing.push(`no iPXE ROM for virtio-net (${IPXE_VIRTIO_ROMS.join(' or ')})`);
  try {
    readKernel(newestKernel());
  } catch (error) {
    missing.push((error as Error).message);
  }
  try {
    staticBusybox();
  } catch (error) {
    missing.push((error as Error).message);
  }
  for (const tool of ['mkfs.fat', 'mcopy', 'syslinux']) if (!findTool(tool)) missing.push(`${tool} is not installed`);
  if (!existsSync('/usr/lib/syslinux/mbr/mbr.bin')) missing.push('/usr/lib/syslinux/mbr/mbr.bin is missing (syslinux-common)');
  if (missing.length === 0) return undefined;
  return `${missing.join('; ')}. Install: apt-get install -y ${LAB_APT_PACKAGES}`;
}
