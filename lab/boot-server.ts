import { createReadStream, statSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { entryScript, localDiskScript, macFromPath, ramdiskScript, unknownMacScript } from './ipxe.js';

/*
 * A stand-in for the controller's network-boot endpoint, for lab tests and
 * measurements: the iPXE entry script, a script per MAC, and the ramdisk's
 * kernel and initramfs, over HTTP on 127.0.0.1 (guests reach it at
 * 10.0.2.2). The controller's own endpoint does the same with its nodes.
 */

/** What the boot server does for one MAC. */
export type MacPlan = { boot: 'ramdisk'; cmdline: string } | { boot: 'disk' };

export interface BootServer {
  /** The URL a guest uses (http://10.0.2.2:PORT). */
  guestBaseUrl: string;
  /** The entry script's URL, for lab/qemu.ts's netBootUrl. */
  entryUrl: string;
  /** What the guest with this MAC boots; a MAC without a plan is unknown. */
  plans: Map<string, MacPlan>;
  /** Request paths in order, with the MAC they were for when there is one. */
  requests: { path: string; mac?: string; known?: boolean }[];
  close(): Promise<void>;
}

export async function startBootServer(
  files: { kernel: string; initramfs: string },
  options: { unknownRetrySeconds?: number } = {},
): Promise<BootServer> {
  const plans = new Map<string, MacPlan>();
  const requests: BootServer['requests'] = [];
  let base = '';
  const server: Server = createServer((request, response) => {
    const path = new URL(request.url ?? '/', 'http://x').pathname;
    const script = (text: string) => {
      response.writeHead(200, { 'content-type': 'text/plain' });
      response.end(text);
    };
    const file = (name: string) => {
      let size: number;
      try {
        size = statSync(name).size;
      } catch (error) {
        response.writeHead(404, { 'content-type': 'text/plain' }).end(`${(error as Error).message}\n`);
        return;
      }
      response.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': size });
      createReadStream(name)
        .on('error', () => response.destroy())
        .pipe(response);
    };
    if (path === '/boot.ipxe') {
      requests.push({ path });
      return script(entryScript(base, 2));
    }
    const mac = macFromPath(path);
    if (mac) {
      const plan = plans.get(mac);
      requests.push({ path, mac, known: plan !== undefined });
      if (!plan) return script(unknownMacScript(base, 'boot.ipxe', options.unknownRetrySeconds ?? 2));
      if (plan.boot === 'disk') return script(localDiskScript(mac));
      return script(
        ramdiskScript({ kernelUrl: `${base}/vmlinuz`, initrdUrl: `${base}/initramfs.cpio.gz`, cmdline: plan.cmdline, label: mac }),
      );
    }
    requests.push({ path });
    if (path === '/vmlinuz') return file(files.kernel);
    if (path === '/initramfs.cpio.gz') return file(files.initramfs);
    response.writeHead(404).end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (typeof address !== 'object' || !address) throw new Error('the boot server has no address');
  base = `http://10.0.2.2:${address.port}`;
  return {
    guestBaseUrl: base,
    entryUrl: `${base}/boot.ipxe`,
    plans,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
