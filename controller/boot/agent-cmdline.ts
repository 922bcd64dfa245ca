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
  /** The node's boot.kernel_args property; control characters become spaces. */
  extra?: string | undefined;
}

export function agentCmdline(options: AgentCmdlineOptions): string {
  const extra = (options.extra ?? '').replace(/\p{Cc}/gu, ' ').trim();
  return [
    'console=ttyS0',
    `metalcast.controller=${options.controllerAddress}`,
    ...(options.insecure ? ['metalcast.insecure'] : []),
    ...(extra ? [extra] : []),
  ].join(' ');
}
