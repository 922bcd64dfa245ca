/**
 * The kernel command line the agent ramdisk boots with, whichever way it
 * boots (the iPXE script of network boot, the ISO of virtual media): where
 * the controller is, how to trust it, and the node's own extra arguments.
 * One function, so that every boot path gives the agent the same settings.
 */
export interface AgentCmdlineOptions {
  /** What agents dial (metalcast.controller=host:port[,host:port…]). */
  controllerAddress: string;
  /** The controller serves plaintext, so the agents must too (metalcast.insecure). */
  insecure: boolean;
  /**
   * How the agent trusts the controller from its first packet, when the
   * controller serves TLS and knows its CA (--agent-ca): the CA's pin
   * (sha256:<hex>, metalcast.ca_fingerprint) and where to fetch it
   * (http://<controller HTTP address>/ca.pem, metalcast.ca_url).
   */
  ca?: { fingerprint: string; url: string } | undefined;
  /** The node's boot.kernel_args property; control characters become spaces. */
  extra?: string | undefined;
}

export function agentCmdline(options: AgentCmdlineOptions): string {
  const extra = (options.extra ?? '').replace(/\p{Cc}/gu, ' ').trim();
  return [
    'console=ttyS0',
    `metalcast.controller=${options.controllerAddress}`,
    ...(options.insecure ? ['metalcast.insecure'] : []),
    ...(!options.insecure && options.ca
      ? [`metalcast.ca_fingerprint=${options.ca.fingerprint}`, `metalcast.ca_url=${options.ca.url}`]
      : []),
    ...(extra ? [extra] : []),
  ].join(' ');
}
