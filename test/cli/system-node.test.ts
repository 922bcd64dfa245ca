import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** The system's Node.js at /usr/bin/node and its version, when it is older than the project needs (Debian 12 has 18, this VM 20). */
function oldSystemNode(): { path: string; version: string } | undefined {
  try {
    const version = execFileSync('/usr/bin/node', ['--version'], { encoding: 'utf8' }).trim();
    const [major = 0, minor = 0] = version.slice(1).split('.').map(Number);
    return major < 22 || (major === 22 && minor < 13) ? { path: '/usr/bin/node', version } : undefined;
  } catch {
    return undefined;
  }
}

const run = (command: string, args: string[], env: NodeJS.ProcessEnv) =>
  new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile(command, args, { cwd: REPO, env, timeout: 120_000 }, (error, stdout, stderr) =>
      resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });

/*
 * A new user on a system Node older than the project's: `npx metalcast …`
 * runs on the Node 24 the project pins and prints no EBADENGINE block (it
 * printed it twice on every call), and bin/metalcast.js run directly by the
 * old Node says what to do instead of failing somewhere inside.
 */
describe('metalcast on a system Node.js older than 22.13', () => {
  it('declares no engines field, which is what made npm print EBADENGINE under npx', () => {
    const pkg = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { engines?: unknown };
    assert.equal(pkg.engines, undefined);
  });

  const old = oldSystemNode();
  const skip = old ? false : 'no Node.js older than 22.13 at /usr/bin/node to try it with';
  const systemPath = { ...process.env, PATH: '/usr/bin:/bin' };

  it('npx metalcast --help prints the help and no EBADENGINE warning', { skip }, async () => {
    // A fresh npm cache, as on a new user's machine: npx checks the engines while it sets the
    // project up in its cache, so a warm cache hides the warning.
    const cache = mkdtempSync(join(tmpdir(), 'metalcast-npx-cache-'));
    const result = await run('/usr/bin/npx', ['metalcast', '--help'], { ...systemPath, npm_config_cache: cache }).finally(() =>
      rmSync(cache, { recursive: true, force: true }),
    );
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^Usage: metalcast /);
    assert.doesNotMatch(result.stderr, /EBADENGINE|Unsupported engine/);
  });

  it('bin/metalcast.js run by the old Node says which Node it needs and how to run it', { skip }, async () => {
    const result = await run(old?.path ?? '', [join(REPO, 'bin', 'metalcast.js'), '--help'], systemPath);
    assert.equal(result.code, 1);
    assert.equal(
      result.stderr,
      `metalcast needs Node.js 22.13 or newer, but this is ${old?.version}.\n` +
        'Run it through npm (npm start, npm run metalcast -- ..., npx metalcast ...), which uses the Node.js pinned in this project.\n',
    );
  });
});
