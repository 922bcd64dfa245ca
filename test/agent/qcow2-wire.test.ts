import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ImageFormat } from '../../gen/metalcast/v1/image.js';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

/*
 * The bar "a 2 GiB-virtual qcow2 with 600 MiB allocated sends ≤ 650 MiB over
 * the wire": the qcow2 (made with qemu-img and qemu-io) is uploaded, the
 * controller converts it to a sparse raw image with its extents, and a real
 * agent deploys it through a TCP proxy that counts every byte from the
 * controller. Holes travel as zero-chunk markers, not as data.
 */

const MIB = 1024 * 1024;

async function sha256OfRange(path: string, end: number): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { start: 0, end: end - 1, highWaterMark: 4 * MIB })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

describe('qcow2 on the wire', () => {
  let t: TestController;
  let proxy: TcpProxy;
  const dirs = tempDir('metalcast-qcow2-wire-');
  const agents: AgentProcess[] = [];

  before(async () => {
    t = await startTestController({
      heartbeatTimeout: '60s',
      heartbeatIntervalMin: '300ms',
      heartbeatIntervalMax: '600ms',
      sweepInterval: '500ms',
      heartbeatFlushInterval: '50ms',
      startupGrace: '0s',
    });
    proxy = await TcpProxy.start(t.controller.grpcAddress);
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await proxy.close();
    await t.destroy();
    dirs.remove();
  });

  it('a 2 GiB-virtual qcow2 with 600 MiB allocated sends at most 650 MiB to the agent', { timeout: 400_000 }, async (ctx) => {
    const qcow2 = join(dirs.path, 'sparse.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '2G']);
    execFileSync('qemu-io', ['-c', 'write -P 0x5a 0 300M', '-c', 'write -P 0xa5 1G 300M', qcow2], { stdio: 'ignore' });
    const { image } = await t.images.uploadImage(
      (async function* () {
        yield { part: { $case: 'header' as const, value: { name: 'sparse', sha256: '', sizeBytes: 0 } } };
        for await (const chunk of createReadStream(qcow2, { highWaterMark: MIB }))
          yield { part: { $case: 'data' as const, value: chunk as Buffer } };
      })(),
    );
    assert.equal(image?.format, ImageFormat.IMAGE_FORMAT_QCOW2);
    assert.equal(image?.sizeBytes, 2048 * MIB);
    assert.equal(image?.allocatedBytes, 600 * MIB);

    const machine = await uniqueFakeMachine(join(dirs.path, 'm'), 501, { disks: [{ name: 'sda', sizeBytes: 3 * 1024 * MIB }] });
    const waitFor = (state: ProvisionState, timeoutMs = 240_000) =>
      eventually(
        async () => {
          const { node } = await t.nodes.getNode({ node: 'wire' });
          if (node?.provisionState === state) return node;
          if (node?.lastError) throw new Error(`node is ${ProvisionState[node.provisionState]}: ${node.lastError}`);
          return undefined;
        },
        { timeoutMs, what: `wire to reach ${ProvisionState[state]}` },
      );
    await t.nodes.createNode({ name: 'wire', macAddresses: [machine.macs[0] as string] });
    await t.nodes.setProvisionState({ node: 'wire', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setProvisionState({ node: 'wire', action: ProvisionAction.PROVISION_ACTION_PROVIDE });
    agents.push(spawnAgent({ controller: proxy.address, root: machine.root }));
    await waitFor(ProvisionState.PROVISION_STATE_AVAILABLE);

    const before = proxy.stats.bytesFromTarget;
    await t.nodes.setProvisionState({
      node: 'wire',
      action: ProvisionAction.PROVISION_ACTION_DEPLOY,
      deploy: { image: 'sparse', target: undefined } as never,
    });
    await waitFor(ProvisionState.PROVISION_STATE_ACTIVE);
    const sent = proxy.stats.bytesFromTarget - before;
    ctx.diagnostic(`${(sent / MIB).toFixed(1)} MiB from the controller for a 2048 MiB image with 600 MiB of data`);
    assert.ok(sent >= 600 * MIB, `only ${(sent / MIB).toFixed(1)} MiB travelled, less than the data`);
    assert.ok(sent <= 650 * MIB, `${(sent / MIB).toFixed(1)} MiB travelled from the controller, more than 650 MiB`);
    assert.equal(
      await sha256OfRange((machine.disks[0] as { path: string }).path, 2048 * MIB),
      image?.sha256,
      'the disk holds the raw image',
    );
  });
});
