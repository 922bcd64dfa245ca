import { readFileSync } from 'node:fs';
import { X509Certificate } from 'node:crypto';
import { caPin, pemBlocks } from '../../common/ca-pin.js';
import { ConfigError } from '../../common/config.js';
import type { ControllerConfig } from '../config.js';

/** The CA network-booted agents pin (--agent-ca): its PEM, as served at /ca.pem, and its fingerprint. */
export interface AgentCa {
  pem: string;
  /** sha256:<hex> of the certificate's DER (metalcast.ca_fingerprint). */
  fingerprint: string;
  subject: string;
}

/**
 * Reads --agent-ca when the controller serves TLS: its first certificate must
 * be a CA that signed a certificate of --tls-cert's chain, or every agent that
 * pins it would refuse this controller; a ConfigError (exit code 2) says so at
 * start. Undefined when there is none to serve (plaintext, or not given).
 */
export function loadAgentCa(config: Pick<ControllerConfig, 'agentCa' | 'insecure' | 'tlsCert'>): AgentCa | undefined {
  if (config.insecure || config.agentCa === '') return undefined;
  let text: string;
  try {
    text = readFileSync(config.agentCa, 'utf8');
  } catch (error) {
    throw new ConfigError([`--agent-ca: cannot read ${config.agentCa}: ${(error as Error).message}`]);
  }
  const first = pemBlocks(text)[0];
  if (!first) throw new ConfigError([`--agent-ca ${config.agentCa} holds no PEM certificate`]);
  let ca: X509Certificate;
  try {
    ca = new X509Certificate(first);
  } catch (error) {
    throw new ConfigError([
      `--agent-ca ${config.agentCa}: its first certificate is not a valid X.509 certificate (${(error as Error).message})`,
    ]);
  }
  if (config.tlsCert !== '') {
    const chain = pemBlocks(readFileSync(config.tlsCert, 'utf8')).map((block) => new X509Certificate(block));
    const signed = chain.some(
      (certificate) =>
        certificate.fingerprint256 === ca.fingerprint256 || (certificate.checkIssued(ca) && certificate.verify(ca.publicKey)),
    );
    if (!signed) {
      throw new ConfigError([
        `--agent-ca ${config.agentCa} (${ca.subject.replaceAll('\n', ', ')}) did not sign --tls-cert ${config.tlsCert}: agents pinning it would refuse this controller; give the CA that issued the controller's certificate`,
      ]);
    }
  }
  return { pem: `${first}\n`, fingerprint: caPin(ca), subject: ca.subject.replaceAll('\n', ', ') };
}
