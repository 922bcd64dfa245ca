import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { addImage, makeImageContent, readDiskStart, sha256 } from '../helpers/images.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

/*
 * Item 1 of issue 18: a disk that refuses writes fails the command with the
 * real cause, on the node's last_error within seconds, and the agent process
 * stays up and heartbeating. Real disks the kernel makes fail, as root:
 *
 * - ENOSPC: the fake machine's sda is a sparse file on a 3 MiB tmpfs;
 * - EIO: sda is a loop device whose backing file sits on a full tmpfs, so
 *   writes land in the page cache and the flush fails with EIO, as a dying
 *   disk does;
 * - gone: the device node disappears between inspection and the deploy.
 *
 * The agent reaches the controller through a throttled proxy so that chunks
 * arrive slowly: a write then always fails while the writer waits for the
 * next chunk, which is when an unawaited write used to be an unhandled
 * rejection that ended the agent. The heartbeat timeout is 60 s, so a
 * failure seen within DETECT_MS cannot have come from it.
 */

const MIB = 1024 * 1024;
const IMAGE_BYTES = 12 * MIB + 4321;
const DETECT_MS = 10_000;

describe('disk write faults fail the command with the cause, and the agent lives on', { timeout: 240_000 }, () => {
  let t: TestController;
  let proxy: TcpProxy;
  const dirs = tempDir('metalcast-disk-faults-');
  const agents: AgentProcess[] = [];
  const cleanups: (() => void)[] = [];
  let image: { sha256: string; size: number };
  let content: Buffer;

  before(async () => {
    t = await startTestController({
      heartbeatTimeout: '60s',
      heartbeatIntervalMin: '300ms',
      heartbeatIntervalMax: '600ms',
      sweepInterval: '500ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
      imageChunkSize: '256K',
    });
    content = makeImageContent(IMAGE_BYTES);
    image = await addImage(t.controller, 'fault-os', content);
    proxy = await TcpProxy.start(t.controller.grpcAddress);
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await proxy?.close();
    await t?.destroy();
    for (const cleanup of cleanups.reverse()) {
      try {
        cleanup();
      } catch {}
    }
    dirs.remove();
  });

  const node = async (name: string) => (await t.nodes.getNode({ node: name })).node;
  const waitFor = (name: string, state: ProvisionState, timeoutMs = 30_000) =>
    eventually(
      async () => {
        const n = await node(name);
        if (n?.provisionState === state) return n;
        return undefined;
      },
      { timeoutMs, what: `${name} to reach ${ProvisionState[state]}` },
    );
  const act = (name: string, action: ProvisionAction, imageName?: string) =>
    t.nodes.setProvisionState({ node: name, action, deploy: imageName ? { image: imageName, target: undefined } : undefined });

  /** Mounts a tmpfs of `size` at a fresh folder; unmounted at the end. */
  function tmpfs(name: string, size: string): string {
    const dir = join(dirs.path, name);
    mkdirSync(dir, { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir]);
    cleanups.push(() => execFileSync('umount', ['-l', dir]));
    return dir;
  }

  /** A node taken to available with a working disk, its agent running; returns the machine's sda path. */
  async function availableNode(name: string, index: number): Promise<{ sda: string; agent: AgentProcess }> {
    const machine = await uniqueFakeMachine(join(dirs.path, name), 700 + index);
    await t.nodes.createNode({ name, macAddresses: [machine.macs[0] as string] });
    await act(name, ProvisionAction.PROVISION_ACTION_MANAGE);
    await act(name, ProvisionAction.PROVISION_ACTION_INSPECT);
    const agent = spawnAgent({ controller: proxy.address, root: machine.root });
    agents.push(agent);
    await waitFor(name, ProvisionState.PROVISION_STATE_MANAGEABLE);
    await act(name, ProvisionAction.PROVISION_ACTION_PROVIDE);
    await waitFor(name, ProvisionState.PROVISION_STATE_AVAILABLE);
    return { sda: (machine.disks[0] as { path: string }).path, agent };
  }

  /** Deploys and expects deploy_failed within DETECT_MS with a last_error matching `cause`; the agent stays up and talks to the controller. */
  async function deployFails(name: string, agent: AgentProcess, cause: RegExp): Promise<void> {
    proxy.throttle(2 * MIB);
    const started = Date.now();
    try {
      await act(name, ProvisionAction.PROVISION_ACTION_DEPLOY, 'fault-os');
      const failed = await waitFor(name, ProvisionState.PROVISION_STATE_DEPLOY_FAILED, DETECT_MS);
      assert.match(failed.lastError, cause);
      assert.doesNotMatch(failed.lastError, /heartbeat/, 'the cause, not a heartbeat timeout');
      assert.ok(Date.now() - started < DETECT_MS, `failed after ${Date.now() - started} ms`);
    } finally {
      proxy.throttle(0);
    }
    // The node no longer wants an agent, so the agent looks itself up again and again: alive, and talking.
    const failedAt = new Date().toISOString();
    await agent.waitForLog((l) => String(l.msg).startsWith('lookup failed') && String(l.time) > failedAt, 5000);
    assert.equal(agent.child.exitCode, null, 'the agent process is still running');
    assert.equal(agent.child.signalCode, null, 'the agent process is still running');
    assertNoUnhandled(agent);
  }

  function assertNoUnhandled(agent: AgentProcess): void {
    const unhandled = agent.logs.filter((l) => String(l.msg).includes('unhandled rejection'));
    assert.deepEqual(unhandled, [], 'no unhandled rejection in the agent');
  }

  /** With the disk made good by `restore`, the same agent process cleans and deploys the node to active, bit-exact. */
  async function recovers(name: string, agent: AgentProcess, disk: string, restore: () => void): Promise<void> {
    restore();
    await act(name, ProvisionAction.PROVISION_ACTION_UNDEPLOY);
    await waitFor(name, ProvisionState.PROVISION_STATE_AVAILABLE);
    await act(name, ProvisionAction.PROVISION_ACTION_DEPLOY, 'fault-os');
    await waitFor(name, ProvisionState.PROVISION_STATE_ACTIVE);
    assert.equal(sha256(await readDiskStart(disk, image.size)), image.sha256, 'the disk holds the image');
    assert.equal(agent.child.exitCode, null, 'the same agent process did it');
    assertNoUnhandled(agent);
  }

  /** A sparse 1 GiB disk file at `path` (on whatever file system holds it). */
  function sparseDisk(path: string): string {
    writeFileSync(path, '');
    truncateSync(path, 1024 ** 3);
    return path;
  }

  it('ENOSPC mid-write (a full tmpfs): deploy_failed with "no space left" at once; the same agent deploys once there is room', async () => {
    const { sda, agent } = await availableNode('enospc', 1);
    const disk = tmpfs('enospc-disk', '3m');
    const small = sparseDisk(join(disk, 'sda'));
    rmSync(sda);
    symlinkSync(small, sda);

    await deployFails('enospc', agent, /writing .*sda failed at \d+ of \d+ bytes: ENOSPC: no space left on device/);
    await recovers('enospc', agent, small, () => execFileSync('mount', ['-o', 'remount,size=64m', disk]));
  });

  it('a failing disk (a loop device over a full tmpfs): deploy_failed with its error at once; the same agent deploys to a good disk', async () => {
    const { sda, agent } = await availableNode('eio', 2);
    const backing = sparseDisk(join(tmpfs('eio-backing', '2m'), 'backing'));
    truncateSync(backing, 64 * MIB);
    const loop = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim();
    cleanups.push(() => execFileSync('losetup', ['-d', loop]));
    rmSync(sda);
    symlinkSync(loop, sda);

    // Writes that bypass the page cache (common/disk-writes/direct-writes.ts) meet the fault at the write itself, and
    // the loop driver passes its backing file's ENOSPC up (or EIO); a buffered write would meet EIO at the flush.
    await deployFails(
      'eio',
      agent,
      /(writing .*sda failed at \d+ of \d+ bytes: (EIO: i\/o error|ENOSPC: no space left on device), write|flushing .*sda failed after writing \d+ bytes: EIO: i\/o error, fsync)/,
    );
    await recovers('eio', agent, sda, () => {
      rmSync(sda);
      sparseDisk(sda);
    });
  });

  it('a disk gone between inspection and deploy: deploy_failed naming the device at once; the same agent deploys when it is back', async () => {
    const { sda, agent } = await availableNode('gone', 3);
    rmSync(sda);
    await deployFails('gone', agent, /opening .*sda to write image 'fault-os' failed: ENOENT/);
    await recovers('gone', agent, sda, () => sparseDisk(sda));
  });

  it('clean on a full disk: clean_failed with ENOSPC at once, the agent lives on', async () => {
    const { sda, agent } = await availableNode('clean-enospc', 4);
    await act('clean-enospc', ProvisionAction.PROVISION_ACTION_DEPLOY, 'fault-os');
    await waitFor('clean-enospc', ProvisionState.PROVISION_STATE_ACTIVE);
    const small = sparseDisk(join(tmpfs('clean-disk', '1m'), 'sda'));
    rmSync(sda);
    symlinkSync(small, sda);
    const started = Date.now();
    await act('clean-enospc', ProvisionAction.PROVISION_ACTION_UNDEPLOY);
    const failed = await waitFor('clean-enospc', ProvisionState.PROVISION_STATE_CLEAN_FAILED, DETECT_MS);
    assert.match(failed.lastError, /erase_disks failed: erasing .*sda failed: ENOSPC: no space left on device/);
    assert.ok(Date.now() - started < DETECT_MS);
    assert.equal(agent.child.exitCode, null, 'the agent process is still running');
    assertNoUnhandled(agent);
  });
});
