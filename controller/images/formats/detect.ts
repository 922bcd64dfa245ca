/**
 * What an image file is, from its content (magic numbers), never from its
 * name. metalcast takes raw disk images and qcow2; every other format a
 * hypervisor or an archiver writes is refused by name, with what to do
 * instead, because written to a disk as it is it would not boot (and some,
 * like VMDK descriptors, point at other files). The signatures are the ones
 * QEMU's block drivers probe for and OpenStack's format_inspector checks.
 */

export type ImageFormat = 'raw' | 'qcow2';

/** Bytes of the file's start that detection needs (VDI's magic sits at 0x40, an ISO's at 0x8001). */
export const DETECT_HEAD_BYTES = 64 * 1024;
/** Bytes of the file's end that detection needs (a fixed VHD's footer). */
export const DETECT_TAIL_BYTES = 512;

/** A format metalcast does not deploy, found by its signature. */
export class UnsupportedFormatError extends Error {
  override name = 'UnsupportedFormatError';
  constructor(
    readonly format: string,
    hint: string,
  ) {
    super(`the image is ${format}, which metalcast does not deploy; ${hint}`);
  }
}

interface Signature {
  format: string;
  at: number;
  bytes: Buffer;
  hint: string;
}

const CONVERT = (from: string) => `convert it to qcow2 or raw first, for example: qemu-img convert -f ${from} -O qcow2 in out.qcow2`;
const DECOMPRESS = (tool: string) => `decompress it first (${tool}) and upload the raw or qcow2 image inside`;

const SIGNATURES: Signature[] = [
  { format: 'VMDK', at: 0, bytes: Buffer.from('KDMV'), hint: CONVERT('vmdk') },
  { format: 'VMDK (COWD)', at: 0, bytes: Buffer.from('COWD'), hint: CONVERT('vmdk') },
  { format: 'a VMDK descriptor', at: 0, bytes: Buffer.from('# Disk DescriptorFile'), hint: CONVERT('vmdk') },
  { format: 'VHDX', at: 0, bytes: Buffer.from('vhdxfile'), hint: CONVERT('vhdx') },
  { format: 'VHD (dynamic)', at: 0, bytes: Buffer.from('conectix'), hint: CONVERT('vpc') },
  { format: 'VDI', at: 0x40, bytes: Buffer.from([0x7f, 0x10, 0xda, 0xbe]), hint: CONVERT('vdi') },
  { format: 'QED', at: 0, bytes: Buffer.from('QED\0'), hint: CONVERT('qed') },
  { format: 'Parallels', at: 0, bytes: Buffer.from('WithoutFreeSpace'), hint: CONVERT('parallels') },
  { format: 'Parallels', at: 0, bytes: Buffer.from('WithouFreSpacExt'), hint: CONVERT('parallels') },
  { format: 'cloop', at: 0, bytes: Buffer.from('#!/bin/sh\n#V2.0 Format'), hint: CONVERT('cloop') },
  {
    format: 'LUKS-encrypted',
    at: 0,
    bytes: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]),
    hint: 'upload the plain disk image; encryption belongs to the deployed system',
  },
  // gzip's magic with its only compression method (deflate), so that random content rarely matches.
  { format: 'gzip-compressed', at: 0, bytes: Buffer.from([0x1f, 0x8b, 0x08]), hint: DECOMPRESS('gunzip') },
  { format: 'xz-compressed', at: 0, bytes: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), hint: DECOMPRESS('unxz') },
  { format: 'zstd-compressed', at: 0, bytes: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), hint: DECOMPRESS('unzstd') },

  { format: 'a zip archive', at: 0, bytes: Buffer.from([0x50, 0x4b, 0x03, 0x04]), hint: DECOMPRESS('unzip') },
];

const QCOW_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]); // "QFI\xfb"

/**
 * The format of an image from its first bytes (at least the first
 * {@link DETECT_HEAD_BYTES}, or the whole file when shorter) and its last
 * {@link DETECT_TAIL_BYTES}. Throws {@link UnsupportedFormatError} for a
 * known format other than raw and qcow2; anything without a known
 * signature is raw (a disk image starts with whatever its boot sector holds).
 */
export function detectFormat(head: Buffer, tail: Buffer = Buffer.alloc(0)): ImageFormat {
  if (head.subarray(0, 4).equals(QCOW_MAGIC)) {
    const version = head.length >= 8 ? head.readUInt32BE(4) : 0;
    if (version === 2 || version === 3) return 'qcow2';
    throw new UnsupportedFormatError(
      version === 1 ? 'qcow (version 1)' : `qcow version ${version}`,
      'convert it to qcow2 first: qemu-img convert -O qcow2 in out.qcow2',
    );
  }
  for (const signature of SIGNATURES) {
    const found = head.subarray(signature.at, signature.at + signature.bytes.length);
    if (found.equals(signature.bytes)) throw new UnsupportedFormatError(signature.format, signature.hint);
  }
  // bzip2: "BZh" and the block size, a digit 1 to 9.
  if (head.subarray(0, 3).equals(Buffer.from('BZh')) && (head[3] ?? 0) >= 0x31 && (head[3] ?? 0) <= 0x39) {
    throw new UnsupportedFormatError('bzip2-compressed', DECOMPRESS('bunzip2'));
  }
  // A fixed-size VHD is raw content with a 512-byte footer: written as it is, the disk would end in junk.
  if (tail.length >= 512 && tail.subarray(tail.length - 512, tail.length - 512 + 8).equals(Buffer.from('conectix'))) {
    throw new UnsupportedFormatError('VHD (fixed)', CONVERT('vpc'));
  }
  return 'raw';
}
