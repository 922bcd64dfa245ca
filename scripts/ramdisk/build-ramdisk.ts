/**
 * npm run build:ramdisk: the ramdisk a machine network-boots into to run the
 * agent, from what Debian installs on this host.
 *
 *   dist/ramdisk/vmlinuz              Debian's kernel (package linux-image-amd64)
 *   dist/ramdisk/initramfs.cpio.gz    busybox (busybox-static), the virtio drivers, Node.js with its
 *                                     shared libraries, the tools the agent runs (sgdisk from gdisk,
 *                                     sfdisk from fdisk: agent/configdrive/tools.ts) with theirs, the
 *                                     agent bundle, and an /init that takes a DHCP lease and runs the agent
 *   dist/ramdisk/manifest.json        what went in, sizes, kernel version
 *
 * Boot it with `console=ttyS0 metalcast.controller=HOST:PORT` (and any other
 * metalcast.* key) on the kernel command line: the agent reads /proc/cmdline.
 *
 * The archive is a newc cpio written by scripts/ramdisk/cpio.ts (no cpio(1)
 * needed), gzip-compressed. Nothing is rebuilt when the contents did not
 * change: the stripped Node.js binary is cached by its source, and the
 * archive by a hash of everything in it.
 *
 * TLS: the agent verifies the controller with a CA bundle named by
 * metalcast.ca=PATH, a file the kernel command line cannot carry; --ca FILE
 * puts it in the ramdisk as /etc/metalcast/ca.pem (RAMDISK_CA_PATH), so boot
 * with metalcast.ca=/etc/metalcast/ca.pem. Or none: the controller's network boot puts
 * metalcast.ca_url and metalcast.ca_fingerprint there, and the agent fetches its
 * CA and pins it (agent/config/ca-fetch.ts). Without TLS: metalcast.insecure.
 *
 * Flags: --out DIR, --kernel-version V (default: the newest in /boot with its
 * modules), --ca FILE, --force (compress even when nothing changed),
 * --gzip-level N (1-9, default 6).
 */
import { createHash } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { basename, dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { gunzipSync, gzipSync } from 'node:zlib';
import { AGENT_TOOLS } from '../../agent/configdrive/tools.js';
import { REPO_ROOT } from '../build.js';
import { formatBytes, packageAgent } from '../package-agent.js';
import { addBaseLayout, addBusybox, CpioBuilder } from './cpio.js';
import { elfInterpreter, findTool, newestKernel, readKernel, run, staticBusybox, writeAtomically } from './host-tools.js';

/** Where the ramdisk goes unless told otherwise. */
export const RAMDISK_DIR = join(REPO_ROOT, 'dist', 'ramdisk');
export const KERNEL_NAME = 'vmlinuz';
export const INITRAMFS_NAME = 'initramfs.cpio.gz';
const MANIFEST_NAME = 'manifest.json';

/**
 * The drivers a QEMU guest (or most virtual machines) needs: the virtio PCI
 * transport, the NIC and the disk. Their dependencies come from modules.dep,
 * and they are loaded in dependency order whatever the order here.
 */
export const RAMDISK_MODULES = [
  'virtio_ring',
  'virtio',
  'virtio_pci_modern_dev',
  'virtio_pci_legacy_dev',
  'virtio_pci',
  'failover',
  'net_failover',
  'virtio_net',
  'virtio_blk',
] as const;

/** Where --ca puts the CA bundle in the ramdisk: boot with metalcast.ca= this. */
export const RAMDISK_CA_PATH = '/etc/metalcast/ca.pem';

/** Paths inside the ramdisk. */
const AGENT_PATH = 'usr/lib/metalcast/metalcast-agent.mjs';
const NODE_PATH = 'usr/bin/node';

export interface BuildRamdiskOptions {
  /** Default dist/ramdisk/. */
  outDir?: string;
  /** Kernel release as in /lib/modules (default: the newest with both /boot/vmlinuz-V and modules.dep). */
  kernelVersion?: string;
  /** Recompress and rewrite even when nothing changed (default false). */
  force?: boolean;
  /** gzip level 1-9 (default 6). */
  gzipLevel?: number;
  /** A PEM CA bundle to put at RAMDISK_CA_PATH, for the agent's metalcast.ca= (default none). */
  caFile?: string;
  /** Progress lines; default none. */
  log?: (line: string) => void;
}

/** One part of the ramdisk and its uncompressed size. */
export interface RamdiskPart {
  name: string;
  bytes: number;
  detail: string;
}

export interface RamdiskArtifacts {
  kernel: { path: string; bytes: number };
  initramfs: { path: string; bytes: number; uncompressedBytes: number };
  kernelVersion: string;
  /** What is in the initramfs, by part, uncompressed. */
  parts: RamdiskPart[];
  /** Kernel modules in the order /init loads them. */
  modules: string[];
  /** True when the existing initramfs already had exactly these contents and was kept. */
  reused: boolean;
  /** sha256 over every entry of the archive: equal contents, equal hash. */
  contentHash: string;
}

/** Builds dist/ramdisk/; throws with the apt-get command to run when something Debian provides is missing. */
export async function buildRamdisk(options: BuildRamdiskOptions = {}): Promise<RamdiskArtifacts> {
  const outDir = options.outDir ?? RAMDISK_DIR;
  const cacheDir = join(outDir, 'cache');
  const log = options.log ?? (() => {});
  mkdirSync(cacheDir, { recursive: true });

  const kernelVersion = options.kernelVersion ?? newestKernel();
  const entries = new CpioBuilder();
  const parts: RamdiskPart[] = [];
  const measure = (name: string, detail: string, add: () => void) => {
    const before = entries.bytes;
    add();
    parts.push({ name, detail, bytes: entries.bytes - before });
  };

  addBaseLayout(entries);
  entries.symlink('var/run', '/run');

  measure('init', '/init, the udhcpc script, /etc', () => addRootfs(entries));
  if (options.caFile) {
    const ca = readFileSync(options.caFile);
    if (!ca.toString('utf8').includes('-----BEGIN CERTIFICATE-----')) throw new Error(`--ca ${options.caFile} holds no PEM certificate`);
    measure('CA bundle', `${options.caFile} as ${RAMDISK_CA_PATH}`, () => entries.file(RAMDISK_CA_PATH.slice(1), ca, 0o644));
  }

  const modules = moduleOrder(kernelVersion, RAMDISK_MODULES);
  measure('kernel modules', `${modules.length} from /lib/modules/${kernelVersion}`, () => {
    for (const module of modules) entries.file(`lib/modules/${module.name}`, readModule(module.path), 0o644);
    entries.file('etc/metalcast/modules', Buffer.from(`${modules.map((m) => m.name).join('\n')}\n`), 0o644);
  });

  const busybox = staticBusybox();
  measure('busybox', `busybox-static, ${busybox.applets.length} applets`, () => addBusybox(entries, busybox));

  const node = nodeBinary();
  const stripped = strippedNode(node, cacheDir, log);
  const libraries = sharedLibraries(node);
  const nodeVersion = run(node, ['--version']).trim();
  measure(
    'node',
    `Node.js ${nodeVersion} (${relative(REPO_ROOT, node)})${stripped.stripped ? ', stripped' : ' (not stripped: no strip on the PATH)'}`,
    () => entries.file(NODE_PATH, readFileSync(stripped.path), 0o755),
  );
  measure('shared libraries', libraries.map((l) => basename(l.path)).join(' '), () => {
    for (const library of libraries) entries.file(library.path.slice(1), readFileSync(library.source), 0o755);
  });

  // The programs the agent runs (it checks for them at start-up), with the libraries Node.js did not bring.
  const added = new Set(libraries.map((l) => l.path));
  const tools = AGENT_TOOLS.map(({ tool, pkg }) => {
    const path = findTool(tool);
    if (!path) throw new Error(`${tool} is not installed; the agent runs it: apt-get install -y ${pkg}`);
    return { tool, path: realpathSync(path), libraries: sharedLibraries(path).filter((l) => !added.has(l.path)) };
  });
  measure('agent tools', tools.map(({ tool, libraries: libs }) => `${tool} (+${libs.length} libraries)`).join(', '), () => {
    for (const { tool, path, libraries: libs } of tools) {
      entries.file(`usr/sbin/${tool}`, readFileSync(path), 0o755);
      for (const library of libs) {
        if (added.has(library.path)) continue;
        added.add(library.path);
        entries.file(library.path.slice(1), readFileSync(library.source), 0o755);
      }
    }
  });

  log('packaging the agent (esbuild)');
  // A folder of our own: another build running at the same time must not hand us its half-written bundle.
  const agentDir = mkdtempSync(join(cacheDir, 'agent-'));
  try {
    const agent = await packageAgent({ outDir: agentDir, sea: false, typecheck: false });
    measure('agent', `metalcast agent ${agent.version} bundle`, () => entries.file(AGENT_PATH, readFileSync(agent.bundle.path), 0o755));
  } finally {
    rmSync(agentDir, { recursive: true, force: true });
  }

  mkdirSync(outDir, { recursive: true });
  const kernelPath = join(outDir, KERNEL_NAME);
  const kernel = readKernel(kernelVersion);
  if (!existsSync(kernelPath) || !readFileSync(kernelPath).equals(kernel)) writeAtomically(kernelPath, kernel);
  const initramfsPath = join(outDir, INITRAMFS_NAME);
  const manifestPath = join(outDir, MANIFEST_NAME);
  const chunks = entries.chunks();
  const uncompressedBytes = chunks.reduce((sum, c) => sum + c.length, 0);
  const contentHash = hashChunks(chunks);
  const previous = readManifest(manifestPath);
  const reused = !options.force && previous?.contentHash === contentHash && existsSync(initramfsPath);
  if (!reused) {
    log(`compressing ${formatBytes(uncompressedBytes)} (gzip -${options.gzipLevel ?? 6})`);
    const compressed = gzipSync(Buffer.concat(chunks), { level: options.gzipLevel ?? 6 });
    writeAtomically(initramfsPath, compressed);
  }
  const artifacts: RamdiskArtifacts = {
    kernel: { path: kernelPath, bytes: statSync(kernelPath).size },
    initramfs: { path: initramfsPath, bytes: statSync(initramfsPath).size, uncompressedBytes },
    kernelVersion,
    parts,
    modules: modules.map((m) => m.name),
    reused,
    contentHash,
  };
  // Names relative to the manifest, so that the folder can be moved or served as it is.
  const manifest = {
    ...artifacts,
    kernel: { ...artifacts.kernel, path: KERNEL_NAME },
    initramfs: { ...artifacts.initramfs, path: INITRAMFS_NAME },
    builtBy: 'scripts/ramdisk/build-ramdisk.ts',
  };
  writeAtomically(manifestPath, Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`));
  return artifacts;
}

/** scripts/ramdisk/rootfs/ as it is: /init, the udhcpc script. Executable when the source is. */
function addRootfs(entries: CpioBuilder): void {
  const root = fileURLToPath(new URL('rootfs/', import.meta.url));
  const walk = (dir: string) => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name);
      const stat = statSync(path);
      if (stat.isDirectory()) walk(path);
      else entries.file(relative(root, path), readFileSync(path), stat.mode & 0o111 ? 0o755 : 0o644);
    }
  };
  walk(root);
  entries.file('etc/passwd', Buffer.from('root:x:0:0:root:/root:/bin/sh\n'), 0o644);
  entries.file('etc/group', Buffer.from('root:x:0:\n'), 0o644);
  entries.file('etc/hostname', Buffer.from('metalcast-ramdisk\n'), 0o644);
  entries.file('etc/resolv.conf', Buffer.alloc(0), 0o644);
}

interface Module {
  /** File name in the ramdisk, uncompressed: "virtio_net.ko". */
  name: string;
  /** Absolute path on this host, possibly compressed. */
  path: string;
}

/**
 * The modules asked for and everything they depend on (modules.dep), each
 * after its dependencies. A module built into the kernel (modules.builtin)
 * is left out; one that is neither is an error.
 */
export function moduleOrder(kernelVersion: string, wanted: readonly string[]): Module[] {
  const base = join('/lib/modules', kernelVersion);
  const deps = new Map<string, { path: string; deps: string[] }>();
  const moduleName = (path: string) => basename(path).replace(/\.ko(\.(xz|zst|gz))?$/, '');
  for (const line of readFileSync(join(base, 'modules.dep'), 'utf8').split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const path = line.slice(0, colon);
    deps.set(moduleName(path).replaceAll('-', '_'), {
      path: join(base, path),
      deps: line
        .slice(colon + 1)
        .trim()
        .split(/\s+/)
        .filter(Boolean)
        .map((d) => moduleName(d).replaceAll('-', '_')),
    });
  }
  const builtin = new Set(
    readFileSync(join(base, 'modules.builtin'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((path) => moduleName(path).replaceAll('-', '_')),
  );
  const order: Module[] = [];
  const seen = new Set<string>();
  const visit = (name: string, chain: string[]) => {
    const key = name.replaceAll('-', '_');
    if (seen.has(key) || builtin.has(key)) return;
    const entry = deps.get(key);
    if (!entry) throw new Error(`kernel module ${name} (needed by ${chain.join(' <- ') || 'the ramdisk'}) is not in ${base}/modules.dep`);
    seen.add(key);
    for (const dep of entry.deps) visit(dep, [name, ...chain]);
    order.push({ name: `${moduleName(entry.path)}.ko`, path: entry.path });
  };
  for (const name of wanted) visit(name, []);
  return order;
}

/** A module's bytes, decompressed: busybox insmod loads plain ELF objects only. */
function readModule(path: string): Buffer {
  if (path.endsWith('.ko')) return readFileSync(path);
  if (path.endsWith('.gz')) return gunzipSync(readFileSync(path));
  const tool = path.endsWith('.xz') ? ['xz', '-dc'] : path.endsWith('.zst') ? ['zstd', '-dc'] : undefined;
  if (!tool) throw new Error(`do not know how to decompress kernel module ${path}`);
  return run(tool[0] as string, [...tool.slice(1), path], {
    binary: true,
    hint: `apt-get install -y ${tool[0] === 'xz' ? 'xz-utils' : 'zstd'}`,
  });
}

/** The ELF program the project's `node` dev dependency installed (not a shell wrapper), else this process's own. */
export function nodeBinary(): string {
  const candidates: string[] = [];
  try {
    const require = createRequire(join(REPO_ROOT, 'package.json'));
    candidates.push(join(dirname(require.resolve('node/package.json')), 'bin', 'node'));
  } catch {
    // no `node` package: fall back to the running binary
  }
  candidates.push(process.execPath);
  for (const candidate of candidates) {
    if (!existsSync(candidate)) continue;
    const real = realpathSync(candidate);
    const head = Buffer.alloc(4);
    const data = readFileSync(real);
    data.copy(head, 0, 0, 4);
    if (head.equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]))) return real;
  }
  throw new Error(`no Node.js ELF binary found (tried ${candidates.join(', ')})`);
}

/** A copy of the node binary without symbols and debug information, cached by the source's path, size and time. */
function strippedNode(source: string, cacheDir: string, log: (line: string) => void): { path: string; stripped: boolean } {
  const stat = statSync(source);
  const key = createHash('sha256').update(`${source}\0${stat.size}\0${stat.mtimeMs}`).digest('hex').slice(0, 16);
  const cached = join(cacheDir, `node-${key}`);
  if (existsSync(cached)) return { path: cached, stripped: true };
  const strip = findTool('strip');
  if (!strip) return { path: source, stripped: false };
  log(`stripping ${source}`);
  const work = `${cached}.tmp-${process.pid}`;
  copyFileSync(source, work);
  run(strip, ['--strip-all', work]);
  renameSync(work, cached);
  return { path: cached, stripped: true };
}

interface Library {
  /** Where the program looks for it: "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2". */
  path: string;
  /** The file on this host (symlinks resolved). */
  source: string;
}

/** The shared libraries `ldd` says the program loads, the dynamic loader included. */
export function sharedLibraries(program: string): Library[] {
  const out = run('ldd', [program], { hint: 'ldd comes with libc-bin' });
  const libraries: Library[] = [];
  for (const line of out.split('\n')) {
    const arrow = /^\s*\S+ => (\/\S+) \(0x[0-9a-f]+\)/.exec(line);
    const direct = /^\s*(\/\S+) \(0x[0-9a-f]+\)/.exec(line);
    const path = arrow?.[1] ?? direct?.[1];
    if (path) libraries.push({ path, source: realpathSync(path) });
    else if (/not found/.test(line)) throw new Error(`ldd ${program}: ${line.trim()}`);
  }
  const interpreter = elfInterpreter(readFileSync(program));
  if (interpreter && !libraries.some((l) => l.path === interpreter))
    libraries.push({ path: interpreter, source: realpathSync(interpreter) });
  return libraries;
}

function hashChunks(chunks: Buffer[]): string {
  const hash = createHash('sha256');
  for (const chunk of chunks) hash.update(chunk);
  return hash.digest('hex');
}

function readManifest(path: string): { contentHash?: string } | undefined {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as { contentHash?: string };
  } catch {
    return undefined;
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const { values } = parseArgs({
    options: {
      out: { type: 'string' },
      'kernel-version': { type: 'string' },
      force: { type: 'boolean' },
      'gzip-level': { type: 'string' },
      ca: { type: 'string' },
    },
  });
  const level = values['gzip-level'] === undefined ? undefined : Number(values['gzip-level']);
  if (level !== undefined && !(Number.isInteger(level) && level >= 1 && level <= 9)) {
    console.error(`--gzip-level: '${values['gzip-level']}' is not a whole number from 1 to 9`);
    process.exit(2);
  }
  const started = performance.now();
  try {
    const made = await buildRamdisk({
      outDir: values.out,
      kernelVersion: values['kernel-version'],
      force: values.force,
      gzipLevel: level,
      caFile: values.ca,
      log: (line) => console.log(`  ${line}`),
    });
    const where = (path: string) => relative(process.cwd(), path);
    const width = Math.max(...made.parts.map((p) => p.name.length));
    console.log(
      `ramdisk for kernel ${made.kernelVersion}, ${made.reused ? 'unchanged' : 'built'} in ${Math.round(performance.now() - started)} ms:`,
    );
    for (const part of made.parts) console.log(`  ${part.name.padEnd(width)}  ${formatBytes(part.bytes).padStart(9)}  ${part.detail}`);
    console.log(
      `  ${where(made.initramfs.path)}  ${formatBytes(made.initramfs.bytes)} (${formatBytes(made.initramfs.uncompressedBytes)} unpacked)`,
    );
    console.log(`  ${where(made.kernel.path)}  ${formatBytes(made.kernel.bytes)}`);
    console.log(`  total to boot: ${formatBytes(made.kernel.bytes + made.initramfs.bytes)}`);
    console.log(`  modules, in load order: ${made.modules.join(' ')}`);
  } catch (error) {
    console.error(`build:ramdisk: ${(error as Error).message}`);
    process.exitCode = 1;
  }
}
