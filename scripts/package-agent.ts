/**
 * npm run package:agent: the agent as an artifact for a ramdisk.
 *
 *   dist/agent/metalcast-agent.mjs   one ESM file with every dependency in it;
 *                                    needs only a Node.js 22+ runtime beside it
 *   dist/agent/metalcast-agent       a Node.js single executable application:
 *                                    the same agent inside a copy of Node.js,
 *                                    needs nothing but the C libraries
 *
 * Both take the options of `metalcast agent` (cli/agent-entry.ts). Flags:
 *   --no-sea         only the .mjs
 *   --no-typecheck   skip tsc (esbuild strips types without checking them)
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { type BuildOptions, build as esbuild, type Plugin } from 'esbuild';
import { packageVersion, REPO_ROOT } from './build.js';
import { buildSea, seaSupport } from './build-sea.js';

/** Where the artifacts go unless told otherwise. */
export const AGENT_ARTIFACT_DIR = join(REPO_ROOT, 'dist', 'agent');
export const AGENT_BUNDLE_NAME = 'metalcast-agent.mjs';
export const AGENT_SEA_NAME = 'metalcast-agent';

export interface PackageAgentOptions {
  /** Default dist/agent/. */
  outDir?: string;
  /** Build the single executable too, where this machine can (default true). */
  sea?: boolean;
  /** Type-check first (default false here; the command line does it unless --no-typecheck). */
  typecheck?: boolean;
}

export interface AgentArtifacts {
  bundle: { path: string; bytes: number };
  /** The single executable, when built. */
  sea?: { path: string; bytes: number; stripped: boolean };
  /** Why there is no single executable, when there is none. */
  seaSkipped?: string;
  version: string;
}

/**
 * common/version.ts reads ../package.json beside the module, which in a
 * bundle would be whatever package.json sits in the folder above it (or
 * nothing); the bundle gets the version as a constant instead.
 */
function versionConstant(version: string): Plugin {
  return {
    name: 'metalcast-version',
    setup(b) {
      b.onLoad({ filter: /[\\/]common[\\/]version\.ts$/ }, () => ({
        contents: `export const METALCAST_VERSION = ${JSON.stringify(version)};`,
        loader: 'ts',
      }));
    },
  };
}

/**
 * The image lanes' worker thread (agent/imaging/lanes/lane-worker.ts) runs
 * from a file in the sources and in dist/; a one-file agent has no such file,
 * so the bundle carries the worker, itself bundled as one CommonJS script,
 * as the string agent/imaging/lanes/lane-worker-bundle.ts then returns, and
 * starts it with `eval`.
 */
function laneWorkerInside(version: string): Plugin {
  return {
    name: 'metalcast-lane-worker',
    setup(b) {
      b.onLoad({ filter: /[\\/]agent[\\/]imaging[\\/]lanes[\\/]lane-worker-bundle\.ts$/ }, async () => ({
        contents: `export function laneWorkerScript() { return { source: ${JSON.stringify(await bundleLaneWorker(version))} }; }`,
        loader: 'js',
      }));
    },
  };
}

/** agent/imaging/lanes/lane-worker.ts and all it imports as one CommonJS script, for a worker started with `eval`. */
export async function bundleLaneWorker(version = packageVersion()): Promise<string> {
  const worker = await esbuild({
    ...commonOptions(version),
    entryPoints: [join(REPO_ROOT, 'agent', 'imaging', 'lanes', 'lane-worker.ts')],
    format: 'cjs',
    write: false,
    // The worker's licences are those of the agent's own dependencies, already at the bundle's end.
    legalComments: 'none',
  });
  const code = worker.outputFiles?.[0]?.text;
  if (!code) throw new Error('bundling the image lane worker produced nothing');
  return code;
}

/** What the agent's bundle and its lane worker's share. */
function commonOptions(version: string): BuildOptions {
  return {
    bundle: true,
    platform: 'node',
    target: 'node22',
    minify: true,
    plugins: [versionConstant(version)],
    logLevel: 'warning',
    absWorkingDir: REPO_ROOT,
  };
}

function esbuildOptions(version: string): BuildOptions {
  return {
    ...commonOptions(version),
    entryPoints: [join(REPO_ROOT, 'cli', 'agent-entry.ts')],
    // Dependency licences stay in the file, at its end.
    legalComments: 'eof',
    plugins: [versionConstant(version), laneWorkerInside(version)],
  };
}

/** Bundles the agent (and, where possible, its single executable); returns what it made. */
export async function packageAgent(options: PackageAgentOptions = {}): Promise<AgentArtifacts> {
  const outDir = options.outDir ?? AGENT_ARTIFACT_DIR;
  const version = packageVersion();
  if (options.typecheck) {
    const tsc = fileURLToPath(import.meta.resolve('typescript/bin/tsc'));
    const checked = spawnSync(process.execPath, [tsc, '--noEmit', '-p', join(REPO_ROOT, 'tsconfig.build.json')], { stdio: 'inherit' });
    if (checked.status !== 0) throw new Error('the type check failed: see the errors above');
  }
  mkdirSync(outDir, { recursive: true });

  const bundle = join(outDir, AGENT_BUNDLE_NAME);
  await esbuild({
    ...esbuildOptions(version),
    format: 'esm',
    outfile: bundle,
    // CommonJS dependencies (grpc-js, pino) call require() for Node's own modules, which an ES module lacks.
    banner: {
      js: "#!/usr/bin/env node\nimport { createRequire as __metalcastCreateRequire } from 'node:module'; const require = __metalcastCreateRequire(import.meta.url);",
    },
  });
  chmodSync(bundle, 0o755);
  const artifacts: AgentArtifacts = { bundle: { path: bundle, bytes: statSync(bundle).size }, version };

  const seaPath = join(outDir, AGENT_SEA_NAME);
  const unsupported = options.sea === false ? 'not asked for (--no-sea)' : seaSupport();
  if (unsupported) {
    rmSync(seaPath, { force: true });
    artifacts.seaSkipped = unsupported;
    return artifacts;
  }
  // A single executable runs one CommonJS script (Node.js 24): the same bundle, as CommonJS.
  const work = mkdtempSync(join(tmpdir(), 'metalcast-package-agent-'));
  try {
    const cjs = join(work, 'metalcast-agent.cjs');
    await esbuild({ ...esbuildOptions(version), format: 'cjs', outfile: cjs });
    artifacts.sea = buildSea(cjs, seaPath);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  // A binary that cannot even print its help is not an artifact.
  execFileSync(seaPath, ['--help'], { stdio: 'ignore', env: { PATH: process.env.PATH ?? '' } });
  return artifacts;
}

export function formatBytes(bytes: number): string {
  if (bytes >= 1024 ** 2) return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
  return `${(bytes / 1024).toFixed(0)} KiB`;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const { values } = parseArgs({ options: { 'no-sea': { type: 'boolean' }, 'no-typecheck': { type: 'boolean' } } });
  const started = performance.now();
  try {
    const made = await packageAgent({ sea: !values['no-sea'], typecheck: !values['no-typecheck'] });
    const where = (path: string) => relative(process.cwd(), path);
    console.log(`metalcast agent ${made.version}, packaged in ${Math.round(performance.now() - started)} ms:`);
    console.log(`  ${where(made.bundle.path)}  ${formatBytes(made.bundle.bytes)}  run: node ${where(made.bundle.path)} --help`);
    if (made.sea) {
      console.log(
        `  ${where(made.sea.path)}  ${formatBytes(made.sea.bytes)}  single executable${made.sea.stripped ? '' : ' (Node.js not stripped: no strip on the PATH)'}`,
      );
    } else {
      console.log(`  no single executable: ${made.seaSkipped}`);
    }
  } catch (error) {
    console.error((error as Error).message);
    process.exitCode = 1;
  }
}
