import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode } from '../helpers/agent-client.js';
import { startTestController, type TestController, tempDir } from '../helpers/controller.js';

/*
 * The controller's network-boot endpoint on its HTTP server: the iPXE entry
 * script, a script per booting MAC chosen by the node's state, and the agent
 * ramdisk's files from --boot-dir.
 */
describe('network boot over HTTP', () => {
  let t: TestController;
  const bootDir = tempDir('metalcast-boot-');
  const kernel = Buffer.alloc(70_000, 0x4b);
  const get = (path: string) => fetch(`http://${t.controller.httpAddress}${path}`);
  /** A script as a guest fetches it, through the address it reaches the controller at (fetch cannot set Host). */
  const script = (path: string, host: string) =>
    new Promise<string>((resolve, reject) => {
      const [hostname, port] = t.controller.httpAddress.split(':');
      request({ hostname, port, path, headers: { host } }, (response) => {
        let body = '';
        response.setEncoding('utf8').on('data', (text: string) => {
          body += text;
        });
        response.on('end', () => resolve(body));
      })
        .on('error', reject)
        .end();
    });

  before(async () => {
    writeFileSync(join(bootDir.path, 'vmlinuz'), kernel);
    t = await startTestController({ bootDir: bootDir.path, bootControllerAddress: '10.0.2.2:7350' });
  });
  after(async () => {
    await t.destroy();
    bootDir.remove();
  });

  it('serves the entry script, which chains to the script of the booting MAC', async () => {
    assert.equal((await get('/boot.ipxe')).status, 200);
    const text = await script('/boot.ipxe', '10.0.2.2:8080');
    assert.match(text, /^#!ipxe/);
    // biome-ignore lint/suspicious/noTemplateCurlyInString: an iPXE setting, which iPXE expands
    assert.ok(text.includes('chain --replace http://10.0.2.2:8080/ipxe/mac/${net0/mac:hexhyp}'), text);
  });

  it('tells an unknown MAC that no node has it, and has it try again', async () => {
    const text = await (await get('/ipxe/mac/52-54-00-aa-bb-01')).text();
    assert.match(text, /echo metalcast: no node has MAC/);
    assert.match(text, /sleep 10\nchain --replace http:\/\/[^/]+\/boot\.ipxe/);
  });

  it('boots the agent ramdisk for a node that waits for its agent, with the agent settings and the node kernel arguments', async () => {
    const created = await t.nodes.createNode({
      name: 'boot-1',
      macAddresses: ['52:54:00:aa:bb:02'],
      properties: { 'boot.kernel_args': 'metalcast.advertise_address=127.0.0.1:40001 quiet' },
    });
    await t.nodes.setProvisionState({ node: created.node!.uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    const manageable = await (await get('/ipxe/mac/52-54-00-AA-BB-02')).text();
    assert.match(manageable, /sanboot --no-describe --drive 0x80 \|\| exit/, 'a node not waiting for an agent boots its disk');

    await t.nodes.setProvisionState({ node: created.node!.uuid, action: ProvisionAction.PROVISION_ACTION_INSPECT });
    const text = await script('/ipxe/mac/52-54-00-aa-bb-02', '10.0.2.2:9350');
    assert.match(
      text,
      /kernel http:\/\/10\.0\.2\.2:9350\/vmlinuz console=ttyS0 metalcast\.controller=10\.0\.2\.2:7350 metalcast\.insecure /,
    );
    // initrd=NAME last: the kernel's EFI stub loads the initrd by that name under UEFI iPXE.
    assert.match(text, /metalcast\.advertise_address=127\.0\.0\.1:40001 quiet initrd=initramfs\.cpio\.gz\n/);
    // A Host header that could break the script out of its line is not used.
    assert.match(await script('/boot.ipxe', 'x\tboot'), /http:\/\/invalid-host\//);
    assert.match(text, /initrd http:\/\/10\.0\.2\.2:9350\/initramfs\.cpio\.gz\nboot\n/);
  });

  it('streams the kernel with its length, says which file is missing, and answers junk with 404', async () => {
    const response = await get('/vmlinuz');
    assert.equal(response.status, 200);
    assert.equal(response.headers.get('content-length'), String(kernel.length));
    assert.deepEqual(Buffer.from(await response.arrayBuffer()), kernel);

    const missing = await get('/initramfs.cpio.gz');
    assert.equal(missing.status, 404);
    assert.match(await missing.text(), /initramfs\.cpio\.gz is not in --boot-dir .*npm run build:ramdisk/);

    for (const path of ['/ipxe/mac/zz-11', '/ipxe/mac/52-54-00-aa-bb-02/../../etc/passwd', '/vmlinuz/x', '/%00', '/ipxe/mac/']) {
      const junk = await get(path);
      assert.equal(junk.status, 404, path);
      await junk.arrayBuffer();
    }
    // The controller is still there.
    assert.equal((await get('/healthz')).status, 200);
  });

  it('boots the ramdisk for a node created and inspected in one go (createWaitingNode)', async () => {
    await createWaitingNode(t.nodes, 'boot-2', ['52:54:00:aa:bb:03']);
    assert.match(await (await get('/ipxe/mac/52-54-00-aa-bb-03')).text(), /kernel .*\/vmlinuz/);
  });
});
