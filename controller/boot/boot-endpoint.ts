import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { join } from 'node:path';
import type { Logger } from '../../common/logging.js';
import { isAgentState } from '../provisioning/states.js';
import type { Store } from '../store/store.js';
import { agentCmdline } from './agent-cmdline.js';
import { entryScript, localDiskScript, macFromPath, ramdiskScript, unknownMacScript } from './ipxe.js';

/** The node property whose value is appended to the ramdisk's kernel command line (e.g. metalcast.advertise_address=…). */
export const KERNEL_ARGS_PROPERTY = 'boot.kernel_args';
export const KERNEL_FILE = 'vmlinuz';
export const INITRAMFS_FILE = 'initramfs.cpio.gz';
/** Where agents fetch the CA they pin (metalcast.ca_url). */
export const CA_FILE = 'ca.pem';

export interface BootEndpointOptions {
  store: Store;
  /** Folder holding vmlinuz and initramfs.cpio.gz. */
  bootDir: string;
  /** What agents dial (metalcast.controller=…); a function because the port is known only after listening. */
  controllerAddress: () => string;
  /** The controller serves plaintext, so the agents must too (metalcast.insecure). */
  insecure: boolean;
  logger: Logger;
  /**
   * The CA agents should trust (--agent-ca), served at /ca.pem and pinned by
   * its fingerprint on the ramdisk's kernel command line; undefined: none
   * (plaintext, or agents with a CA baked in).
   */
  agentCa?: { pem: string; fingerprint: string } | undefined;
  /** Seconds an unknown MAC waits before asking again; default 10. */
  retrySeconds?: number;
}

/** A Host header safe to paste into an iPXE script. */
const SAFE_HOST = /^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$/;

/**
 * Network boot over HTTP: the iPXE entry script, one script per booting
 * MAC, and the agent ramdisk. A MAC of a node that expects an agent boots
 * the ramdisk; a known node in any other state boots its local disk; an
 * unknown MAC is told so on its console and asks again later. Returns a
 * request handler that answers the boot paths and returns false for others.
 */
export function createBootEndpoint(options: BootEndpointOptions): (req: IncomingMessage, res: ServerResponse, path: string) => boolean {
  const retry = options.retrySeconds ?? 10;
  const script = (res: ServerResponse, text: string) =>
    res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8', 'cache-control': 'no-store' }).end(text);

  const sendFile = (req: IncomingMessage, res: ServerResponse, name: string) => {
    const path = join(options.bootDir, name);
    stat(path)
      .then((info) => {
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': info.size });
        if (req.method === 'HEAD') return void res.end();
        createReadStream(path)
          .on('error', (error) => {
            options.logger.warn({ err: error, path }, 'reading a boot file failed');
            res.destroy();
          })
          .pipe(res);
      })
      .catch(() => {
        res
          .writeHead(404, { 'content-type': 'text/plain' })
          .end(`${name} is not in --boot-dir ${options.bootDir}; build it with npm run build:ramdisk\n`);
      });
  };

  const perMac = async (res: ServerResponse, base: string, mac: string) => {
    const [node] = await options.store.findNodesByMacs([mac]);
    if (!node) {
      options.logger.info({ mac }, 'network boot from an unknown MAC');
      return script(res, unknownMacScript(base, 'boot.ipxe', retry));
    }
    if (!isAgentState(node.provisionState)) return script(res, localDiskScript(node.name));
    const cmdline = agentCmdline({
      controllerAddress: options.controllerAddress(),
      insecure: options.insecure,
      ca: options.agentCa && { fingerprint: options.agentCa.fingerprint, url: `${base}/${CA_FILE}` },
      extra: node.properties[KERNEL_ARGS_PROPERTY],
    });
    options.logger.info({ node: node.uuid, nodeName: node.name, mac, state: node.provisionState }, 'network boot of the agent ramdisk');
    script(res, ramdiskScript({ kernelUrl: `${base}/${KERNEL_FILE}`, initrdUrl: `${base}/${INITRAMFS_FILE}`, cmdline, label: node.name }));
  };

  return (req, res, path) => {
    const host = req.headers.host ?? '';
    const base = `http://${SAFE_HOST.test(host) ? host : 'invalid-host'}`;
    if (path === '/boot.ipxe') {
      script(res, entryScript(base, retry));
      return true;
    }
    if (path === `/${CA_FILE}`) {
      if (!options.agentCa) {
        res
          .writeHead(404, { 'content-type': 'text/plain' })
          .end('this controller serves no CA for agents: start it with --agent-ca (or --tls-generate)\n');
      } else {
        res.writeHead(200, { 'content-type': 'application/x-pem-file', 'cache-control': 'no-store' }).end(options.agentCa.pem);
      }
      return true;
    }
    if (path === `/${KERNEL_FILE}` || path === `/${INITRAMFS_FILE}`) {
      sendFile(req, res, path.slice(1));
      return true;
    }
    if (path.startsWith('/ipxe/mac/')) {
      const mac = macFromPath(path);
      if (!mac) {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not a MAC: the form is /ipxe/mac/aa-bb-cc-dd-ee-ff\n');
        return true;
      }
      perMac(res, base, mac).catch((error: unknown) => {
        options.logger.error({ err: error, mac }, 'answering a network boot failed');
        // iPXE's entry script retries when the per-MAC script cannot be fetched.
        if (!res.headersSent) res.writeHead(503, { 'content-type': 'text/plain' }).end('boot script unavailable; try again\n');
      });
      return true;
    }
    return false;
  };
}
