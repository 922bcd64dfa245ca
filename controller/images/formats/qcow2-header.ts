/**
 * The qcow2 header (QEMU's docs/interop/qcow2.txt), read before any QEMU
 * tool opens the file. Two header fields make QEMU open other files: a
 * backing file, and (incompatible feature bit 2) an external data file. An
 * uploaded image with either could make `qemu-img convert` read any file on
 * the controller into the image a node receives (OSSA-2024-001,
 * CVE-2024-32498), so both are refused here, from the raw bytes, and again
 * from `qemu-img info`'s answer (controller/images/formats/qemu-img.ts).
 */

/** The fixed part of a version 3 header, up to and including header_length. */
export const QCOW2_HEADER_BYTES = 104;

const INCOMPATIBLE = {
  dirty: 1n << 0n,
  corrupt: 1n << 1n,
  externalDataFile: 1n << 2n,
  compressionType: 1n << 3n,
  extendedL2: 1n << 4n,
} as const;
const KNOWN_INCOMPATIBLE = Object.values(INCOMPATIBLE).reduce((all, bit) => all | bit, 0n);

export interface Qcow2Header {
  version: 2 | 3;
  /** Bytes the guest sees: the size of the raw image. */
  virtualSize: number;
  clusterBits: number;
}

/** A qcow2 image that must not be opened or converted; the message says why and what to do. */
export class UnsafeQcow2Error extends Error {
  override name = 'UnsafeQcow2Error';
}

/**
 * Checks the header of a qcow2 file (its first bytes, at least
 * {@link QCOW2_HEADER_BYTES} when the file is that long). Throws
 * {@link UnsafeQcow2Error} for a backing file, an external data file,
 * encryption, a header marked corrupt, features this check does not know,
 * impossible values, or a virtual size above `maxVirtualSize`.
 */
export function checkQcow2Header(head: Buffer, maxVirtualSize: number): Qcow2Header {
  if (head.length < 72) throw new UnsafeQcow2Error(`the qcow2 header is truncated: the file has only ${head.length} bytes`);
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new UnsafeQcow2Error(`qcow2 version ${version} is not 2 or 3`);
  const backingFileOffset = head.readBigUInt64BE(8);
  const backingFileSize = head.readUInt32BE(16);
  if (backingFileOffset !== 0n || backingFileSize !== 0) {
    throw new UnsafeQcow2Error(
      'the qcow2 image has a backing file: it is an overlay that reads the rest of its content from another file, and is refused; flatten it first (qemu-img convert -O qcow2 overlay.qcow2 flat.qcow2)',
    );
  }
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21)
    throw new UnsafeQcow2Error(`the qcow2 header is corrupt: cluster_bits ${clusterBits} is not 9 to 21`);
  const size = head.readBigUInt64BE(24);
  const cryptMethod = head.readUInt32BE(32);
  if (cryptMethod !== 0) {
    throw new UnsafeQcow2Error('the qcow2 image is encrypted; upload the plain image (encryption belongs to the deployed system)');
  }
  if (version === 3) {
    if (head.length < QCOW2_HEADER_BYTES) throw new UnsafeQcow2Error('the qcow2 version 3 header is truncated');
    const incompatible = head.readBigUInt64BE(72);
    if (incompatible & INCOMPATIBLE.externalDataFile) {
      throw new UnsafeQcow2Error(
        'the qcow2 image keeps its data in an external data file, another file it names, and is refused; convert it into a self-contained image first (qemu-img convert -O qcow2 in.qcow2 out.qcow2)',
      );
    }
    if (incompatible & INCOMPATIBLE.corrupt) {
      throw new UnsafeQcow2Error('the qcow2 header marks the image corrupt; repair it (qemu-img check -r all) or export it again');
    }
    const unknown = incompatible & ~KNOWN_INCOMPATIBLE;
    if (unknown !== 0n)
      throw new UnsafeQcow2Error(`the qcow2 header has incompatible features this controller does not know (0x${unknown.toString(16)})`);
    const headerLength = head.readUInt32BE(100);
    if (headerLength < QCOW2_HEADER_BYTES || headerLength % 8 !== 0) {
      throw new UnsafeQcow2Error(`the qcow2 header is corrupt: header_length ${headerLength}`);
    }
  }
  if (size > BigInt(maxVirtualSize)) {
    throw new UnsafeQcow2Error(
      `the qcow2 image's virtual size is ${size} bytes, more than this controller accepts (--max-image-virtual-size, ${maxVirtualSize} bytes)`,
    );
  }
  if (size === 0n) throw new UnsafeQcow2Error('the qcow2 image has a virtual size of 0 bytes');
  return { version, virtualSize: Number(size), clusterBits };
}
