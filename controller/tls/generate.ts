import { existsSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { tlsInit, TLS_INIT_FILES } from '../../common/tls-init.js';
import { ConfigError } from '../../common/config.js';
import type { Logger } from '../../common/logging.js';
import type { ControllerConfig } from '../config.js';

/**
 * --tls-generate: the quickstart's way to TLS without a site CA. The first
 * start makes a CA and a certificate for this host (what `metalcast tls init`
 * makes) in <data-dir>/tls; later starts reuse them. Returns the config with
 * --tls-cert and --tls-key pointing at them, and --agent-ca at the CA (unless given).
 */
export async function withGeneratedTls(config: ControllerConfig, logger: Logger): Promise<ControllerConfig> {
  if (!config.tlsGenerate) return config;
  if (config.insecure) throw new ConfigError(['--tls-generate contradicts --insecure: serve TLS or plaintext, not both']);
  if (config.tlsCert !== '' || config.tlsKey !== '') return config;
  const dir = join(config.dataDir, 'tls');
  const agentCa = config.agentCa || join(dir, TLS_INIT_FILES.ca);
  const cert = join(dir, TLS_INIT_FILES.controller);
  const key = join(dir, TLS_INIT_FILES.controllerKey);
  if (!existsSync(cert) || !existsSync(key)) {
    const listenHost = config.listen.slice(0, config.listen.lastIndexOf(':')).replace(/^\[|\]$/g, '');
    const hosts = [...new Set(['localhost', '127.0.0.1', hostname(), listenHost].filter((h) => h !== '' && h !== '0.0.0.0' && h !== '::'))];
    await tlsInit({ dir, hosts, days: 825 });
    logger.warn(
      { dir, hosts },
      'made a private CA and a certificate for this host (--tls-generate); give agents and the CLI --ca with its ca.pem, and use certificates of your own in production',
    );
  }
  return { ...config, tlsCert: cert, tlsKey: key, agentCa };
}
