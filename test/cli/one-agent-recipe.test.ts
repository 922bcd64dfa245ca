import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { onJsonLogLines } from '../../demo/processes.js';
import { freePort } from '../helpers/controller-process.js';
import { tempDir } from '../helpers/controller.js';

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const BIN = join(REPO, 'bin', 'metalcast.js');
const run = promisify(execFile);

/*
 * docs/development.md's recipe "One agent on a fake machine", as a user
 * follows it: a controller with --tls-generate, `npm run fake-machine`,
 * node create and manage, then `node inspect --wait` while the agent the
 * fake-machine script printed starts; inspect returns only when the node
 * rests again (it used to return at once, although the README said it waits).
 */
describe('docs recipe: one agent on a fake machine', () => {
  const dir = tempDir('metalcast-recipe-');
  const children: ChildProcess[] = [];
  after(async () => {
    for (const child of children) child.kill('SIGKILL');
    dir.remove();
  });

  it('inspects the fake machine with `node inspect --wait`, which waits for the agent', async () => {
    const port = await freePort();
    const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('METALCAST_')));
    const controller = spawn(
      process.execPath,
      [BIN, 'controller', '--tls-generate', '--listen', `127.0.0.1:${port}`, '--metrics-listen', '127.0.0.1:0'],
      { cwd: dir.path, env, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.push(controller);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no 'controller started' in 60 s")), 60_000);
      onJsonLogLines(controller.stdout, (line) => {
        if (line.msg !== 'controller started') return;
        clearTimeout(timer);
        resolve();
      });
      void once(controller, 'exit').then(([code]) => reject(new Error(`controller exited ${code}`)));
    });

    // npm run fake-machine -- DIR, as package.json runs it.
    const machineDir = join(dir.path, 'fake-0');
    const made = await run(process.execPath, ['--import', 'tsx', join(REPO, 'scripts', 'fake-machine.ts'), machineDir], {
      cwd: REPO,
      env,
      timeout: 60_000,
    });
    const mac = /--mac (\S+)/.exec(made.stdout)?.[1];
    const agentLine = /^its agent: npx metalcast (agent .*)$/m.exec(made.stdout)?.[1];
    assert.ok(mac && agentLine, made.stdout);

    const cli = (...args: string[]) =>
      run(process.execPath, [BIN, ...args, '--controller', `127.0.0.1:${port}`], { cwd: dir.path, env, timeout: 180_000 });
    await cli('node', 'create', 'fake-0', '--mac', mac);
    await cli('node', 'manage', 'fake-0');
    const inspecting = cli('node', 'inspect', 'fake-0', '--wait', '--wait-timeout', '150s');
    const agentArgs = agentLine.split(' ').map((word, i, words) => (words[i - 1] === '--controller' ? `127.0.0.1:${port}` : word));
    const agent = spawn(process.execPath, [BIN, ...agentArgs], { cwd: dir.path, env, stdio: 'ignore' });
    children.push(agent);
    const inspected = await inspecting;
    assert.match(
      inspected.stdout,
      /Z fake-0 inspect_wait\n.*Z fake-0 inspect wait -> manageable \(inspection found 1 disks, 2 NICs, 4 CPUs\)\n/s,
    );
    assert.match(inspected.stdout, /^node fake-0 is manageable$/m);
    const shown = await cli('node', 'inventory', 'fake-0', '--json');
    const inventory = JSON.parse(shown.stdout) as { interfaces?: { macAddress?: string }[] };
    assert.ok(
      inventory.interfaces?.some((i) => i.macAddress === mac),
      shown.stdout,
    );
  });
});
