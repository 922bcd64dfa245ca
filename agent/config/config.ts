import { availableParallelism } from 'node:os';
import { resolve } from 'node:path';
import {
  byteSize,
  ConfigError,
  type ConfigOf,
  duration,
  hostPort,
  hostPortList,
  integer,
  logLevel,
  nonEmpty,
  type OptionSpec,
  oneOf,
  resolveOptions,
  switchValue,
} from '../../common/config.js';
import { parseCaPin } from '../../common/ca-pin.js';
import { type KernelCmdline, type KernelCmdlineKeys, kernelCmdlineSource } from './kernel-cmdline.js';

/** Every option of `metalcast agent`, in the order `--help` lists them. */
export const AGENT_OPTIONS = {
  controller: {
    flag: 'controller',
    description:
      'controller gRPC address(es), comma-separated host:port; the agent starts at a random one and moves to the next on connection errors',
    defaultValue: '127.0.0.1:7350',
    parse: hostPortList,
  },
  listen: {
    flag: 'listen',
    description: 'address the agent serves its own gRPC API on, for the controller to call',
    defaultValue: '0.0.0.0:9999',
    parse: hostPort,
  },
  ca: {
    flag: 'ca',
    description:
      "PEM CA bundle the agent verifies the controller's certificate with; required unless --insecure. The agent's own API serves TLS with a key and self-signed certificate made at each start, which the controller pins",
    defaultValue: '',
    parse: (raw: string) => (raw.trim() === '' ? '' : resolve(raw.trim())),
  },
  caUrl: {
    flag: 'ca-url',
    description:
      "http:// URL of the controller's CA bundle (its HTTP endpoint's /ca.pem), fetched at start when there is no --ca; only the certificate matching --ca-fingerprint is trusted. Network-booted agents get it on the kernel command line (metalcast.ca_url)",
    defaultValue: '',
    parse: (raw: string) => {
      if (raw.trim() === '') return '';
      let url: URL;
      try {
        url = new URL(raw.trim());
      } catch {
        throw new Error(`'${raw}' is not a URL; the form is http://HOST:PORT/ca.pem`);
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`'${raw}' is not an http:// URL`);
      return url.href;
    },
  },
  caFingerprint: {
    flag: 'ca-fingerprint',
    description:
      "sha256:<64 lowercase hex> of the DER of the CA certificate to trust: the one fetched from --ca-url must match it (metalcast.ca_fingerprint; the controller's iPXE script and ISO put it there), and so must --ca when both are given",
    defaultValue: '',
    parse: (raw: string) => (raw.trim() === '' ? '' : parseCaPin(raw)),
  },
  caFetchAttempts: {
    flag: 'ca-fetch-attempts',
    description:
      'tries to fetch --ca-url before the agent gives up and exits (1 s apart, doubling up to 10 s); a CA that does not match the fingerprint is refused at once',
    defaultValue: '10',
    parse: integer({ min: 1, max: 1000 }),
  },
  insecure: {
    flag: 'insecure',
    description:
      'talk to the controller and serve the agent API in plaintext, without TLS: anyone on the provisioning network can read the agent token and pose as the controller or the agent; for isolated labs and tests only (a warning at start says so)',
    defaultValue: 'false',
    parse: switchValue,
    isSwitch: true,
  },
  advertiseAddress: {
    flag: 'advertise-address',
    description:
      'host:port the controller should dial to reach this agent (default: the local address that routes to the controller, with the listen port)',
    defaultValue: '',
    parse: (raw: string) => (raw === '' ? '' : hostPort(raw)),
  },
  root: {
    flag: 'root',
    description: 'root under which sys/, proc/ and dev/ are read; tests point it at a fake machine',
    defaultValue: '/',
    parse: (raw: string) => resolve(nonEmpty(raw)),
  },
  lookupBackoffStart: {
    flag: 'lookup-backoff-start',
    description: 'first delay between lookup attempts (randomised, doubling)',
    defaultValue: '1s',
    parse: duration({ min: 10 }),
  },
  lookupBackoffMax: {
    flag: 'lookup-backoff-max',
    description: 'longest delay between lookup attempts',
    defaultValue: '60s',
    parse: duration({ min: 10 }),
  },
  lookupBudget: {
    flag: 'lookup-budget',
    description: 'give up looking up after this long and exit non-zero, so that the service manager restarts the agent',
    defaultValue: '600s',
    parse: duration({ min: 100 }),
  },
  reconnectDelay: {
    flag: 'reconnect-delay',
    description: 'base delay before reopening a failed heartbeat stream; the real delay is this times a random factor in [1, 2)',
    defaultValue: '5s',
    parse: duration({ min: 10 }),
  },
  minHeartbeatGap: {
    flag: 'min-heartbeat-gap',
    description: 'an extra heartbeat (when a command finishes) is never sent sooner than this after the previous one',
    defaultValue: '5s',
    parse: duration({ allowZero: true }),
  },
  callTimeout: {
    flag: 'call-timeout',
    description: 'deadline of each unary call to the controller',
    defaultValue: '30s',
    parse: duration({ min: 100 }),
  },
  keepaliveTime: {
    flag: 'keepalive-time',
    description: 'interval of keepalive pings on the channel to the controller',
    defaultValue: '10s',
    parse: duration({ min: 100 }),
  },
  keepaliveTimeout: {
    flag: 'keepalive-timeout',
    description: 'the controller is considered gone when a ping is not answered within this',
    defaultValue: '10s',
    parse: duration({ min: 100 }),
  },
  powerDriver: {
    flag: 'power-driver',
    description:
      "how power commands act: 'os' asks the operating system; 'recording' only appends them to --power-record-file (tests, demos)",
    defaultValue: 'os',
    parse: oneOf(['os', 'recording'] as const),
  },
  powerRecordFile: {
    flag: 'power-record-file',
    description: "file the 'recording' power driver appends actions to",
    defaultValue: '',
    parse: (raw: string) => (raw === '' ? '' : resolve(raw)),
  },
  imageStreams: {
    flag: 'image-streams',
    description:
      "connections a deploy fetches the image over at once, each decrypted, verified and written on its own thread (docs/transfer.md, parallel streams); 'auto': one per core, at most 4. The default, 1, is one stream on the agent's own thread: on 2 cores more streams moved no more and cost more CPU. Fewer than 2 segments of 64 manifest chunks (128 MiB by default) always use one",
    defaultValue: '1',
    parse: streamCount,
  },
  fanout: {
    flag: 'fanout',
    description:
      'take part in fan-out when the controller offers it: fetch chunks of the deploy image from the other agents of the wave and serve them the verified chunks this agent holds (docs/fanout.md)',
    defaultValue: 'true',
    parse: switchValue,
  },
  fanoutLinger: {
    flag: 'fanout-linger',
    description:
      "how long the agent goes on serving its wave after its own write ended, unless the controller's next command (the final power-off or reboot) comes first",
    defaultValue: '60s',
    parse: duration({ min: 0 }),
  },
  fanoutParallel: {
    flag: 'fanout-parallel',
    description: 'chunks the agent fetches at once during fan-out',
    defaultValue: '4',
    parse: integer({ min: 1, max: 32 }),
  },
  fanoutMaxDownloadRate: {
    flag: 'fanout-max-download-rate',
    description:
      'most bytes per second the agent receives during fan-out, from peers and controller together (K, M, G suffixes); 0 for no cap. Spares a shared uplink; the fan-out benchmark models NICs with it',
    defaultValue: '0',
    parse: byteSize({ min: 0, max: 2 ** 40 }),
  },
  commandHistory: {
    flag: 'command-history',
    description: 'how many finished commands ListCommands remembers',
    defaultValue: '50',
    parse: integer({ min: 1, max: 10_000 }),
  },
  logLevel: {
    flag: 'log-level',
    description: 'fatal, error, warn, info, debug, trace or silent',
    defaultValue: 'info',
    parse: logLevel,
  },
} satisfies Record<string, OptionSpec>;

/** --image-streams: 'auto' (a stream per core, at most 4) or 1 to 16. */
function streamCount(raw: string): number {
  if (raw.trim() === 'auto') return Math.min(4, availableParallelism());
  if (!/^\s*-?\d+\s*$/.test(raw)) throw new Error(`'${raw}' is neither 'auto' nor a whole number from 1 to 16`);
  return integer({ min: 1, max: 16 })(raw);
}

/** The agent's validated configuration; durations are in milliseconds. */
export type AgentConfig = ConfigOf<typeof AGENT_OPTIONS>;

/**
 * The metalcast.* keys of the kernel command line: every option but --root
 * (which decides where the command line is read), plus keys known but not
 * acted on, with the reason the agent logs.
 */
export const AGENT_KERNEL_CMDLINE_KEYS: KernelCmdlineKeys = {
  flags: Object.values(AGENT_OPTIONS)
    .map((spec) => spec.flag)
    .filter((flag) => flag !== AGENT_OPTIONS.root.flag),
  ignored: {
    root: 'it cannot be set there: --root (or METALCAST_ROOT) decides where the kernel command line is read from',
  },
};

/** The root the agent reads the machine under, proc/cmdline included: flags > environment > default (pure). */
export function resolveAgentRoot(flags: Record<string, unknown>, env: Record<string, string | undefined>): string {
  return resolveOptions({ root: AGENT_OPTIONS.root }, flags, env).root;
}

/**
 * Builds the agent config from parsed flags, the environment and the kernel
 * command line's metalcast.* settings, in that precedence, over the
 * defaults (pure).
 */
export function loadAgentConfig(
  flags: Record<string, unknown>,
  env: Record<string, string | undefined>,
  kernelCmdline?: KernelCmdline,
): AgentConfig {
  const config = resolveOptions(AGENT_OPTIONS, flags, env, kernelCmdline && kernelCmdlineSource(kernelCmdline));
  const problems: string[] = [];
  if (config.lookupBackoffStart > config.lookupBackoffMax) problems.push('--lookup-backoff-start must not exceed --lookup-backoff-max');
  if (config.powerDriver === 'recording' && config.powerRecordFile === '') {
    problems.push('--power-driver recording needs --power-record-file (where to record the actions)');
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return config;
}

/**
 * TLS (--ca, or --ca-url with --ca-fingerprint) or --insecure, never both
 * and never neither; ConfigError otherwise. startAgent checks it, so that
 * loadAgentConfig stays usable for the other settings alone.
 */
export function checkAgentTlsMode(config: Pick<AgentConfig, 'ca' | 'insecure' | 'caUrl' | 'caFingerprint'>): void {
  const pinned = config.caUrl !== '' || config.caFingerprint !== '';
  if (config.insecure && (config.ca !== '' || pinned)) {
    throw new ConfigError([
      `--insecure contradicts ${config.ca !== '' ? '--ca (metalcast.ca=)' : '--ca-url/--ca-fingerprint (metalcast.ca_url, metalcast.ca_fingerprint)'}: talk to the controller over TLS or in plaintext, not both`,
    ]);
  }
  if (config.caUrl !== '' && config.caFingerprint === '') {
    throw new ConfigError([
      '--ca-url (metalcast.ca_url) needs --ca-fingerprint (metalcast.ca_fingerprint=sha256:…): a CA fetched over plain HTTP is trusted only when it matches a pin',
    ]);
  }
  if (!config.insecure && config.ca === '' && config.caUrl === '') {
    throw new ConfigError([
      "the agent talks to the controller over TLS: give --ca (metalcast.ca= on the kernel command line) with the PEM CA bundle that signed the controller's certificate, or --ca-url with --ca-fingerprint (metalcast.ca_url, metalcast.ca_fingerprint, which the controller's network boot puts there), or --insecure (metalcast.insecure) for a plaintext lab",
    ]);
  }
}
