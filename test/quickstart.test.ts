import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { onJsonLogLines } from '../demo/processes.js';
import { tempDir } from './helpers/controller.js';
import { freePort } from './helpers/controller-process.js';

const METALCAST = fileURLToPath(new URL('../bin/metalcast.js', import.meta.url));
const run = promisify(execFile);

/**
 * The README's quickstart: `npm start` (the controller with --tls-generate
 * on ./metalcast-data), then `npx metalcast node …` from the same directory
 * with nothing but --controller: TLS with the generated CA and the first
 * admin token are picked up from ./metalcast-data.
 */
describe('quickstart', () => {
  const dir = tempDir('metalcast-quickstart-');
  let controller: ChildProcess | undefined;
  after(async () => {
    controller?.kill('SIGKILL');
    dir.remove();
  });

  it('a controller started with --tls-generate serves TLS, and the CLI run beside it needs no TLS or token flags', async () => {
    const port = await freePort();
    // As on a fresh shell: nothing about TLS or tokens in the environment.
    const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('METALCAST_')));
    controller = spawn(
      process.execPath,
      [METALCAST, 'controller', '--tls-generate', '--listen', `127.0.0.1:${port}`, '--metrics-listen', '127.0.0.1:0'],
      { cwd: dir.path, env, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const lines: Record<string, unknown>[] = [];
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no 'controller started' in 20 s: ${JSON.stringify(lines.slice(-5))}`)), 20_000);
      onJsonLogLines(controller?.stdout ?? null, (line) => {
        lines.push(line);
        if (line.msg === 'controller started') {
          clearTimeout(timer);
          resolve();
        }
      });
      void once(controller as ChildProcess, 'exit').then(([code]) => reject(new Error(`controller exited ${code}`)));
    });
    assert.ok(
      lines.some((l) => /made a private CA/.test(String(l.msg))),
      'the first start says it made a CA',
    );
    assert.equal(statSync(join(dir.path, 'metalcast-data', 'tls', 'controller-key.pem')).mode & 0o777, 0o600);

    const cli = (...args: string[]) =>
      run(process.execPath, [METALCAST, ...args, '--controller', `127.0.0.1:${port}`], { cwd: dir.path, env, timeout: 20_000 });
    const created = await cli('node', 'create', 'qs-1', '--mac', '52:54:00:12:34:56');
    assert.match(created.stdout, /created node qs-1/);
    const listed = await cli('node', 'list', '--json');
    assert.deepEqual(
      (JSON.parse(listed.stdout) as { name: string }[]).map((n) => n.name),
      ['qs-1'],
    );
    // From another directory neither the CA nor the token is found: the failure says what to give.
    const elsewhere = await run(process.execPath, [METALCAST, 'node', 'list', '--controller', `127.0.0.1:${port}`], {
      cwd: tempDir('metalcast-elsewhere-').path,
      env,
      timeout: 20_000,
    }).catch((error: { stderr: string; code: number }) => error);
    assert.notEqual((elsewhere as { code?: number }).code ?? 0, 0);
    assert.match((elsewhere as { stderr: string }).stderr, /--ca/);
  });
});
