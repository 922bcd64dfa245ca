/**
 * npm run build: type-checks and compiles the programs to dist/ (ESM
 * JavaScript, one file per module, with tsconfig.build.json), so that they
 * run on plain Node.js without tsx:
 *
 *   node dist/bin/metalcast.js controller     (or node dist/cli/main.js ...)
 *
 * The compiled files still import their dependencies from node_modules; the
 * self-contained agent for a ramdisk is `npm run package:agent`.
 * bin/metalcast.js stays on tsx, so that a checkout runs without a build.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { isAbsolute, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository's root folder. */
export const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));

/** Files that `npm run package:agent` leaves in dist/agent/, which a build keeps. */
const AGENT_ARTIFACT = /^metalcast-agent/;

export interface BuildOptions {
  /** Where to compile to (default: dist/ in the repository). Outside the repository, node_modules would not be found. */
  outDir?: string;
}

/** The version in package.json, which the programs report. */
export function packageVersion(): string {
  return (JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string }).version;
}

/**
 * Compiles everything the programs need to dist/ and adds what is not
 * TypeScript: the descriptor set the controller serves reflection from, a
 * package.json (the module type, and the version common/version.ts reads)
 * and bin/metalcast.js. Throws when the type check fails.
 */
export function build(options: BuildOptions = {}): { outDir: string } {
  const outDir = options.outDir ?? join(REPO_ROOT, 'dist');
  clean(outDir);
  const tsc = fileURLToPath(import.meta.resolve('typescript/bin/tsc'));
  const result = spawnSync(process.execPath, [tsc, '-p', join(REPO_ROOT, 'tsconfig.build.json'), '--outDir', outDir], {
    cwd: REPO_ROOT,
    stdio: 'inherit',
  });
  if (result.status !== 0) throw new Error(`tsc failed (exit ${result.status ?? result.signal}): see the errors above`);

  mkdirSync(join(outDir, 'gen'), { recursive: true });
  copyFileSync(join(REPO_ROOT, 'gen', 'metalcast.binpb'), join(outDir, 'gen', 'metalcast.binpb'));
  const pkg = { name: 'metalcast', version: packageVersion(), private: true, type: 'module', description: 'compiled by npm run build' };
  writeFileSync(join(outDir, 'package.json'), `${JSON.stringify(pkg, null, 2)}\n`);
  mkdirSync(join(outDir, 'bin'), { recursive: true });
  writeFileSync(
    join(outDir, 'bin', 'metalcast.js'),
    [
      '#!/usr/bin/env node',
      '// Entry point of the compiled `metalcast` command (npm run build): plain Node.js, no tsx.',
      "const [major] = process.versions.node.split('.').map(Number);",
      'if (major < 22) {',
      "  process.stderr.write('metalcast needs Node.js 22 or newer, but this is ' + process.version + '.\\n');",
      '  process.exit(1);',
      '}',
      "await import('../cli/main.js');",
      '',
    ].join('\n'),
    { mode: 0o755 },
  );
  return { outDir };
}

/** Empties outDir of an earlier build (stale modules of deleted sources), keeping the agent artifacts and the lab's ramdisk and test image. */
function clean(outDir: string): void {
  const inside = relative(REPO_ROOT, outDir);
  if (inside === '' || inside.startsWith('..') || isAbsolute(inside)) {
    throw new Error(`refusing to clean ${outDir}: the output folder must be inside the repository, below its root`);
  }
  let entries: string[];
  try {
    entries = readdirSync(outDir);
  } catch {
    return;
  }
  for (const entry of entries) {
    // Built by their own scripts (build:ramdisk, build:test-image), slowly: not ours to delete.
    if (entry === 'ramdisk' || entry === 'test-image') continue;
    if (entry !== 'agent') {
      rmSync(join(outDir, entry), { recursive: true, force: true });
      continue;
    }
    for (const file of readdirSync(join(outDir, 'agent'))) {
      if (!AGENT_ARTIFACT.test(file)) rmSync(join(outDir, 'agent', file), { recursive: true, force: true });
    }
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const started = performance.now();
  try {
    const { outDir } = build();
    console.log(`compiled to ${relative(process.cwd(), outDir) || '.'} in ${Math.round(performance.now() - started)} ms`);
    console.log(`run: node ${relative(process.cwd(), join(outDir, 'bin', 'metalcast.js'))} --help`);
  } catch (error) {
    console.error((error as Error).message);
    process.exitCode = 1;
  }
}
