/**
 * A writer for the "newc" cpio format, the one the Linux kernel unpacks
 * into its initial root file system (Documentation/driver-api/early-userspace/
 * buffer-format.rst). Written here rather than shelled out to cpio(1) so that
 * the archive holds exactly the owners, modes and device nodes we say
 * (/dev/console must exist before devtmpfs is mounted), whoever builds it,
 * and so that the same inputs always give the same bytes.
 */

/** One thing in the archive. Paths are relative ("bin/sh"), parents before children. */
export type CpioEntry =
  | { kind: 'dir'; path: string; mode?: number }
  | { kind: 'file'; path: string; data: Buffer; mode?: number }
  | { kind: 'symlink'; path: string; target: string }
  | { kind: 'char'; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

/** Every field of a newc header after the magic: eight hex digits each. */
interface Header {
  ino: number;
  mode: number;
  nlink: number;
  filesize: number;
  rdevmajor: number;
  rdevminor: number;
  namesize: number;
}

function header(h: Header): Buffer {
  const fields = [
    h.ino,
    h.mode,
    0, // uid: root
    0, // gid: root
    h.nlink,
    0, // mtime: fixed, so that the archive depends on contents only
    h.filesize,
    0, // devmajor
    0, // devminor
    h.rdevmajor,
    h.rdevminor,
    h.namesize,
    0, // check: unused by newc
  ];
  return Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`, 'ascii');
}

/** newc pads the header plus name, and each file's data, to a multiple of four bytes. */
function padding(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}

/** The archive as a list of buffers, in order (concatenate them, or stream them into gzip). */
export function cpioChunks(entries: readonly CpioEntry[]): Buffer[] {
  const chunks: Buffer[] = [];
  let ino = 1;
  const push = (name: string, fields: Omit<Header, 'ino' | 'namesize'>, data?: Buffer) => {
    const nameBytes = Buffer.from(`${name}\0`, 'utf8');
    const head = header({ ...fields, ino: ino++, namesize: nameBytes.length });
    chunks.push(head, nameBytes, padding(head.length + nameBytes.length));
    if (data && data.length > 0) chunks.push(data, padding(data.length));
  };
  for (const entry of entries) {
    if (entry.path.startsWith('/') || entry.path === '') throw new Error(`cpio entry path '${entry.path}' must be relative and non-empty`);
    switch (entry.kind) {
      case 'dir':
        push(entry.path, { mode: S_IFDIR | (entry.mode ?? 0o755), nlink: 2, filesize: 0, rdevmajor: 0, rdevminor: 0 });
        break;
      case 'file':
        push(
          entry.path,
          { mode: S_IFREG | (entry.mode ?? 0o644), nlink: 1, filesize: entry.data.length, rdevmajor: 0, rdevminor: 0 },
          entry.data,
        );
        break;
      case 'symlink': {
        const target = Buffer.from(entry.target, 'utf8');
        push(entry.path, { mode: S_IFLNK | 0o777, nlink: 1, filesize: target.length, rdevmajor: 0, rdevminor: 0 }, target);
        break;
      }
      case 'char':
        push(entry.path, {
          mode: S_IFCHR | (entry.mode ?? 0o600),
          nlink: 1,
          filesize: 0,
          rdevmajor: entry.major,
          rdevminor: entry.minor,
        });
        break;
    }
  }
  push('TRAILER!!!', { mode: 0, nlink: 1, filesize: 0, rdevmajor: 0, rdevminor: 0 });
  return chunks;
}

/** Collects entries in the order they are added, making parent folders first; counts the bytes of file contents. */
export class CpioBuilder {
  readonly entries: CpioEntry[] = [];
  /** Bytes of file contents so far. */
  bytes = 0;
  private readonly paths = new Set<string>();

  dir(path: string, mode = 0o755): void {
    if (this.paths.has(path)) return;
    this.parentOf(path);
    this.paths.add(path);
    this.entries.push({ kind: 'dir', path, mode });
  }

  file(path: string, data: Buffer, mode = 0o644): void {
    this.add({ kind: 'file', path, data, mode });
    this.bytes += data.length;
  }

  symlink(path: string, target: string): void {
    this.add({ kind: 'symlink', path, target });
  }

  char(path: string, major: number, minor: number, mode = 0o600): void {
    this.add({ kind: 'char', path, major, minor, mode });
  }

  has(path: string): boolean {
    return this.paths.has(path);
  }

  /** The archive, as buffers to concatenate or stream. */
  chunks(): Buffer[] {
    return cpioChunks(this.entries);
  }

  private add(entry: CpioEntry): void {
    if (this.paths.has(entry.path)) throw new Error(`the archive has '${entry.path}' twice`);
    this.parentOf(entry.path);
    this.paths.add(entry.path);
    this.entries.push(entry);
  }

  private parentOf(path: string): void {
    const slash = path.lastIndexOf('/');
    if (slash > 0) this.dir(path.slice(0, slash));
  }
}

/**
 * The minimal root every ramdisk here needs: the usual folders, and the
 * device nodes the kernel opens before anything is mounted (/dev/console
 * for init's standard streams).
 */
export function addBaseLayout(cpio: CpioBuilder): void {
  for (const dir of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'usr/lib', 'lib', 'etc', 'proc', 'sys', 'dev', 'run']) cpio.dir(dir);
  cpio.dir('root', 0o700);
  cpio.dir('tmp', 0o1777);
  cpio.char('dev/console', 5, 1, 0o600);
  cpio.char('dev/null', 1, 3, 0o666);
}

/** busybox at /bin/busybox and a link for each of its applets. */
export function addBusybox(cpio: CpioBuilder, busybox: { data: Buffer; applets: string[] }): void {
  cpio.file('bin/busybox', busybox.data, 0o755);
  for (const applet of busybox.applets) if (!cpio.has(applet)) cpio.symlink(applet, '/bin/busybox');
}
