import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { join } from 'node:path';
import type { Logger } from '../../common/logging.js';
import { BOOT_METHOD_PROPERTY, type PowerDrivers } from '../power/drivers.js';
import type { PowerDriver } from '../power/power-driver.js';
import type { NodeRecord, Store } from '../store/store.js';
import type { AgentIsoBuilder } from './agent-iso.js';
import { INITRAMFS_FILE, KERNEL_FILE } from './boot-endpoint.js';

/** Where the controller's HTTP endpoint serves agent ISOs: /virtual-media/<sha256>.iso */
export const VIRTUAL_MEDIA_PREFIX = '/virtual-media/';

export type BootMethod = 'network' | 'virtual-media';

/** A node's boot.method: how it boots into the agent (default network). */
export function bootMethodOf(node: { properties: Record<string, string> }): BootMethod {
  return node.properties[BOOT_METHOD_PROPERTY] === 'virtual-media' ? 'virtual-media' : 'network';
}

export interface VirtualMediaOptions {
  builder: AgentIsoBuilder;
  /** Folder with vmlinuz and initramfs.cpio.gz (--boot-dir), as network boot serves them. */
  bootDir: string;
  /** The agent's kernel command line for this node (agentCmdline(), as the iPXE script has it). */
  cmdline: (node: NodeRecord) => string;
  /** The base URL BMCs fetch ISOs from: this controller's HTTP endpoint as they reach it (--virtual-media-url). */
  baseUrl: () => string;
  logger: Logger;
}

/**
 * Virtual-media boot: the agent ISO a node's BMC inserts (built on demand
 * from the ramdisk and the node's command line, cached, see agent-iso.ts),
 * and the HTTP route that serves it, with byte ranges (BMCs read virtual
 * media in pieces as the machine asks for them).
 */
export class VirtualMediaBoot {
  constructor(private readonly options: VirtualMediaOptions) {}

  /** The URL of the node's agent ISO, built first when needed. */
  async isoUrl(node: NodeRecord): Promise<string> {
    const iso = await this.options.builder.build({
      kernelPath: join(this.options.bootDir, KERNEL_FILE),
      initrdPath: join(this.options.bootDir, INITRAMFS_FILE),
      cmdline: this.options.cmdline(node),
    });
    this.options.logger.info(
      { node: node.uuid, nodeName: node.name, iso: iso.key.slice(0, 16), bytes: iso.sizeBytes },
      'agent ISO ready for virtual media',
    );
    return `${this.options.baseUrl().replace(/\/$/, '')}${VIRTUAL_MEDIA_PREFIX}${iso.key}.iso`;
  }

  /** Answers GET and HEAD of /virtual-media/<sha256>.iso; false for other paths. */
  handler(): (req: IncomingMessage, res: ServerResponse, path: string) => boolean {
    return (req, res, path) => {
      if (!path.startsWith(VIRTUAL_MEDIA_PREFIX)) return false;
      const match = /^\/virtual-media\/([0-9a-f]{64})\.iso$/.exec(path);
      if (!match) {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not an agent ISO: the form is /virtual-media/<sha256>.iso\n');
        return true;
      }
      void this.send(req, res, this.options.builder.pathOf(match[1] as string));
      return true;
    };
  }

  private async send(req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
    const info = await stat(path).catch(() => undefined);
    if (!info) {
      res
        .writeHead(404, { 'content-type': 'text/plain' })
        .end('no such agent ISO here (it is built when a node boots from virtual media)\n');
      return;
    }
    const size = info.size;
    let start = 0;
    let end = size - 1;
    let status = 200;
    const range = req.headers.range;
    if (range) {
      const parsed = /^bytes=(\d*)-(\d*)$/.exec(range.trim());
      const from = parsed?.[1] ? Number(parsed[1]) : undefined;
      const to = parsed?.[2] ? Number(parsed[2]) : undefined;
      if (parsed && from !== undefined) {
        start = from;
        end = Math.min(to ?? size - 1, size - 1);
      } else if (parsed && to !== undefined) {
        start = Math.max(0, size - to);
      }
      if (!parsed || start > end || start >= size) {
        res.writeHead(416, { 'content-range': `bytes */${size}` }).end();
        return;
      }
      status = 206;
    }
    res.writeHead(status, {
      'content-type': 'application/x-iso9660-image',
      'content-length': end - start + 1,
      'accept-ranges': 'bytes',
      ...(status === 206 ? { 'content-range': `bytes ${start}-${end}/${size}` } : {}),
    });
    if (req.method === 'HEAD') {
      res.end();
      return;
    }
    createReadStream(path, { start, end })
      .on('error', (error) => {
        this.options.logger.warn({ err: error, path }, 'reading an agent ISO failed');
        res.destroy();
      })
      .pipe(res);
  }
}

/**
 * Takes the virtual CD out of a node that boots from virtual media, once its
 * deploy, clean or inspection ended (well, badly or by abort), so that no
 * agent ISO stays attached to a machine. Best effort: a BMC that cannot be
 * reached now is logged and noted in the node's events, never an error.
 */
export async function ejectVirtualMedia(options: {
  power: PowerDrivers;
  store: Store;
  node: NodeRecord;
  logger: Logger;
  actor: string;
}): Promise<void> {
  const { node, logger } = options;
  if (bootMethodOf(node) !== 'virtual-media') return;
  let driver: PowerDriver | undefined;
  try {
    driver = options.power.forNode(node);
    if (!driver?.ejectMedia) return;
    await driver.ejectMedia();
    logger.info({ node: node.uuid, nodeName: node.name, driver: driver.name }, 'virtual media ejected');
  } catch (error) {
    const reason = (error as Error).message;
    logger.warn({ node: node.uuid, nodeName: node.name, reason }, 'could not eject the virtual media');
    await options.store
      .addEvent(node.uuid, {
        kind: 'virtual_media',
        message: `could not eject the virtual media: ${reason}`,
        actor: options.actor,
        fromState: null,
        toState: null,
      })
      .catch(() => {});
  } finally {
    driver?.close();
  }
}
