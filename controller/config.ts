import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import {
  boolean,
  byteSize,
  ConfigError,
  type ConfigOf,
  duration,
  hostPort,
  integer,
  logLevel,
  nonEmpty,
  type OptionSpec,
  oneOf,
  resolveOptions,
  switchValue,
} from '../common/config.js';

const durationSpec = (flag: string, description: string, defaultValue: string, min = 1): OptionSpec<number> => ({
  flag,
  description,
  defaultValue,
  parse: duration({ min }),
});

/** Every option of `metalcast controller`, in the order `--help` lists them. */
export const CONTROLLER_OPTIONS = {
  listen: {
    flag: 'listen',
    description: 'gRPC address for agents and operators; use 0.0.0.0:7350 so that agents on other machines can reach it',
    defaultValue: '127.0.0.1:7350',
    parse: hostPort,
  },
  metricsListen: {
    flag: 'metrics-listen',
    description:
      'HTTP address serving /metrics, /healthz and network boot (/boot.ipxe, /ipxe/mac/MAC, /vmlinuz, /initramfs.cpio.gz); use 0.0.0.0:9350 so that machines can network-boot from it',
    defaultValue: '127.0.0.1:9350',
    parse: hostPort,
  },
  bootDir: {
    flag: 'boot-dir',
    description: 'folder with the agent ramdisk served for network boot: vmlinuz and initramfs.cpio.gz (npm run build:ramdisk makes them)',
    defaultValue: 'dist/ramdisk',
    parse: (raw: string) => resolve(nonEmpty(raw)),
  },
  bootControllerAddress: {
    flag: 'boot-controller-address',
    description:
      'host:port(s), comma-separated, that network-booted agents dial, put on their kernel command line as metalcast.controller (default: the advertised address)',
    defaultValue: '',
    parse: (raw: string) => (raw === '' ? '' : raw.split(',').map(hostPort).join(',')),
  },
  virtualMediaUrl: {
    flag: 'virtual-media-url',
    description:
      "base URL BMCs fetch the agent ISO from for nodes with boot.method=virtual-media: this controller's HTTP endpoint (--metrics-listen) as the BMCs' network reaches it, for example http://10.0.0.1:9350 (default: http://<the advertised host>:<the HTTP port>)",
    defaultValue: '',
    parse: (raw: string) => {
      if (raw === '') return '';
      let url: URL;
      try {
        url = new URL(raw);
      } catch {
        throw new Error(`'${raw}' is not a URL such as http://10.0.0.1:9350`);
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`'${raw}' must be an http:// or https:// URL`);
      return raw.replace(/\/+$/, '');
    },
  },
  tlsCert: {
    flag: 'tls-cert',
    description:
      'PEM certificate (leaf first, then any intermediates) the gRPC API serves TLS 1.2+ with, for agents and operators; with --tls-key. metalcast tls init makes one',
    defaultValue: '',
    parse: optionalPath,
  },
  tlsKey: {
    flag: 'tls-key',
    description: 'PEM private key of --tls-cert; keep it readable by the controller only',
    defaultValue: '',
    parse: optionalPath,
  },
  tlsClientCa: {
    flag: 'tls-client-ca',
    description:
      'PEM CA bundle whose client certificates authenticate operators, as an alternative to tokens: the role is the certificate subject OU (admin or reader). Clients without a certificate (agents) are still accepted',
    defaultValue: '',
    parse: optionalPath,
  },
  tlsCa: {
    flag: 'tls-ca',
    description:
      "PEM CA bundle this controller verifies the other controllers' certificates with when it copies images from them (several controllers with TLS; default: Node's bundled CAs)",
    defaultValue: '',
    parse: optionalPath,
  },
  agentCa: {
    flag: 'agent-ca',
    description:
      "PEM file whose first certificate is the CA that signed this controller's --tls-cert: served at <metrics-listen>/ca.pem, and its sha256 put on network-booted agents' kernel command line (metalcast.ca_fingerprint, metalcast.ca_url) so that they trust this controller from their first packet (default: with --tls-generate, <data-dir>/tls/ca.pem; otherwise none, and agents need metalcast.ca= baked into their image)",
    defaultValue: '',
    parse: optionalPath,
  },
  tlsGenerate: {
    flag: 'tls-generate',
    description:
      'without --tls-cert/--tls-key, make a private CA and a certificate for this host in <data-dir>/tls at the first start and serve with them (to try metalcast out; agents and the CLI then need --ca <data-dir>/tls/ca.pem)',
    defaultValue: 'false',
    parse: switchValue,
    isSwitch: true,
  },
  insecure: {
    flag: 'insecure',
    description:
      'serve gRPC in plaintext, without TLS: anyone on the network can read tokens and pose as agents; for isolated labs and tests only (a warning at start says so)',
    defaultValue: 'false',
    parse: switchValue,
    isSwitch: true,
  },
  dataDir: {
    flag: 'data-dir',
    description: 'directory for the embedded database and images',
    defaultValue: './metalcast-data',
    parse: (raw: string) => resolve(nonEmpty(raw)),
  },
  secretsKeyFile: {
    flag: 'secrets-key-file',
    description:
      'file with the key that seals node secrets (BMC passwords) in the database, 64 hex digits, made at the first start when missing (default: <data-dir>/secrets.key); several controllers on one database need the same file',
    defaultValue: '',
    parse: optionalPath,
  },
  database: {
    flag: 'database',
    description:
      'database URL: sqlite:PATH (one controller; default: sqlite:<data-dir>/metalcast.db) or postgres://user:password@host:port/db (several controllers share it; ?options=-c%20search_path%3DSCHEMA selects a schema)',
    defaultValue: '',
    parse: parseDatabaseUrl,
  },
  databasePoolSize: {
    flag: 'database-pool-size',
    description:
      "PostgreSQL connections this controller keeps at most (besides one that listens for notifications); every controller on the database has its own, within the server's max_connections. The default lets a connect storm of 1,000 agents in at once",
    defaultValue: '20',
    parse: integer({ min: 1, max: 1000 }),
  },
  databasePoolWait: durationSpec(
    'database-pool-wait',
    'the longest a call waits for a free PostgreSQL connection of the pool; then it fails UNAVAILABLE (agents retry) saying that the pool was full',
    '10s',
    10,
  ),
  advertiseAddress: {
    flag: 'advertise-address',
    description:
      'host:port other controllers reach this one at (default: the --listen address, with this host name when it listens on every interface)',
    defaultValue: '',
    parse: (raw: string) => (raw === '' ? '' : hostPort(raw)),
  },
  controllerId: {
    flag: 'controller-id',
    description: 'name this controller holds node locks under; keep it stable across restarts so that a restart clears its stale locks',
    defaultValue: hostname(),
    parse: nonEmpty,
  },
  controllerTouchInterval: durationSpec(
    'controller-touch-interval',
    'how often this controller marks itself alive in the database and re-reads the other controllers',
    '10s',
    100,
  ),
  controllerDeadAfter: durationSpec(
    'controller-dead-after',
    'a controller not seen for this long is dead: the others release its locks and take its share of the nodes',
    '60s',
    300,
  ),
  heartbeatTimeout: durationSpec(
    'heartbeat-timeout',
    'an agent silent for this long is given up on and its node operation fails',
    '120s',
    1000,
  ),
  heartbeatIntervalMin: {
    flag: 'heartbeat-interval-min',
    description: 'shortest interval the controller asks agents to heartbeat at (default: 0.3 x heartbeat timeout)',
    defaultValue: '',
    parse: (raw: string) => (raw === '' ? 0 : duration({ min: 100 })(raw)),
  },
  heartbeatIntervalMax: {
    flag: 'heartbeat-interval-max',
    description: 'longest interval the controller asks agents to heartbeat at (default: 0.6 x heartbeat timeout)',
    defaultValue: '',
    parse: (raw: string) => (raw === '' ? 0 : duration({ min: 100 })(raw)),
  },
  powerSyncInterval: {
    flag: 'power-sync-interval',
    description:
      "how often the power sync reads every power-driven node's power state through its BMC, spread over the interval (0: never). A state that differs from what the controller last knew is an event and a metric",
    defaultValue: '60s',
    parse: duration({ allowZero: true }),
  },
  powerSyncConcurrency: {
    flag: 'power-sync-concurrency',
    description: 'most BMCs the power sync talks to at once',
    defaultValue: '8',
    parse: integer({ min: 1, max: 1000 }),
  },
  powerSyncMaxFailures: {
    flag: 'power-sync-max-failures',
    description:
      "power state reads in a row that may fail before the node is put in maintenance as 'BMC unreachable'; such a node is then read less often (up to 16 intervals apart), and leaves that maintenance when its BMC answers again",
    defaultValue: '3',
    parse: integer({ min: 1, max: 1000 }),
  },
  sweepInterval: durationSpec('sweep-interval', 'how often to look for agents that stopped heartbeating', '10s', 100),
  startupGrace: {
    flag: 'startup-grace',
    description: 'after start, how long agents get to reconnect before any node is failed (default: the heartbeat timeout)',
    defaultValue: '',
    parse: (raw: string) => (raw === '' ? -1 : duration({ allowZero: true })(raw)),
  },
  heartbeatFlushInterval: durationSpec(
    'heartbeat-flush-interval',
    'heartbeats are written to the database in batches at this interval',
    '1s',
    10,
  ),
  heartbeatCheckWindow: {
    flag: 'heartbeat-check-window',
    description:
      'heartbeats are acted on in batches: the nodes heard from within this window are read in one query to see whether one waits for its agent (0: read the whole node for each heartbeat on its own, one query per heartbeat)',
    defaultValue: '100ms',
    parse: duration({ allowZero: true, max: 5000 }),
  },
  keepaliveTime: durationSpec('keepalive-time', 'interval of gRPC keepalive pings to each connected peer', '10s', 100),
  keepaliveTimeout: durationSpec(
    'keepalive-timeout',
    'a peer that does not answer a keepalive ping within this is disconnected',
    '10s',
    100,
  ),
  imageChunkSize: {
    flag: 'image-chunk-size',
    description: 'bytes per ReadImage chunk (64 KiB to 3.5 MiB); K, M suffixes allowed. A reader that stalls pins about 17 chunks',
    defaultValue: '3.5M',
    parse: byteSize({ min: 64 * 1024, max: 3.5 * 1024 * 1024 }),
  },
  imageManifestChunkSize: {
    flag: 'image-manifest-chunk-size',
    description:
      'bytes per chunk of the chunk manifest built for each new image (64 KiB to 64 MiB); the unit the agent verifies, re-fetches and skips in delta re-imaging (docs/chunk-manifest.md)',
    defaultValue: '1M',
    parse: byteSize({ min: 64 * 1024, max: 64 * 1024 * 1024 }),
  },
  maxImageTransfers: {
    flag: 'max-image-transfers',
    description:
      'most ReadImage streams served at once; more get RESOURCE_EXHAUSTED with a retry hint. One controller thread serves them all, so more rarely means faster',
    defaultValue: '16',
    parse: integer({ min: 1, max: 10_000 }),
  },
  fanout: {
    flag: 'fanout',
    description:
      'fan-out (experimental, off by default; docs/fanout.md has its 32-agent figures): the agents of a deploy wave serve each other the verified chunks of their image, and this controller sends a chunk itself only when no peer has it; false: every agent reads the whole image from the controller. A deploy can turn it off for itself (node deploy --no-fanout)',
    defaultValue: 'false',
    parse: switchValue,
  },
  fanoutMaxPeers: {
    flag: 'fanout-max-peers',
    description: 'peers named for each chunk an agent fetches, tried in order before the controller',
    defaultValue: '3',
    parse: integer({ min: 1, max: 16 }),
  },
  fanoutMaxUploads: {
    flag: 'fanout-max-uploads',
    description: 'most chunk reads one agent serves to its peers at once',
    defaultValue: '4',
    parse: integer({ min: 1, max: 64 }),
  },
  fanoutControllerStreams: {
    flag: 'fanout-controller-streams',
    description:
      "chunks of one fan-out wave this controller sends at once, each to one agent; the others wait for those chunks to reach a peer. Few streams make each chunk whole early so that it spreads while the next ones are sent; all of them at once would split the controller's link until the whole image had been sent",
    defaultValue: '4',
    parse: integer({ min: 1, max: 64 }),
  },
  fanoutMaxUploadRate: {
    flag: 'fanout-max-upload-rate',
    description: 'most bytes per second one agent serves to its peers (K, M, G suffixes); 0 for no cap',
    defaultValue: '0',
    parse: byteSize({ min: 0, max: 2 ** 40 }),
  },
  imageReadTimeout: durationSpec(
    'image-read-timeout',
    'longest a single ReadImage stream may run before the server ends it (the agent resumes where it stopped)',
    '30m',
    1000,
  ),
  imageSyncInterval: durationSpec(
    'image-sync-interval',
    'how often this controller looks for image content it lacks (copied from the image URL or another controller) and for content no image uses any more; an image made ready on any controller is copied at once',
    '30s',
    100,
  ),
  maxImageSize: {
    flag: 'max-image-size',
    description: 'largest image accepted by upload or import; K, M, G, T suffixes allowed',
    defaultValue: '256G',
    parse: byteSize({ min: 1, max: 2 ** 50 }),
  },
  maxImageVirtualSize: {
    flag: 'max-image-virtual-size',
    description:
      'largest virtual size of a qcow2 image (the size of the raw image it is converted to and nodes receive); larger ones are refused at import. K, M, G, T suffixes allowed',
    defaultValue: '256G',
    parse: byteSize({ min: 1, max: 2 ** 50 }),
  },
  importAttempts: {
    flag: 'import-attempts',
    description: 'tries for an image import from a URL on 5xx answers and connection errors (4xx fails at once)',
    defaultValue: '5',
    parse: integer({ min: 1, max: 100 }),
  },
  importStallTimeout: durationSpec(
    'import-stall-timeout',
    'an import that receives nothing for this long is retried; an upload that sends nothing for this long is refused',
    '60s',
    100,
  ),
  deployFinalPower: {
    flag: 'deploy-final-power',
    description: 'what the agent does after a successful deploy: reboot (into the deployed OS), power_off, or none',
    defaultValue: 'reboot',
    parse: oneOf(['reboot', 'power_off', 'none'] as const),
  },
  deployVerifyReadback: {
    flag: 'deploy-verify-readback',
    description: 'have the agent re-read the disk after writing and compare sha256 (true or false)',
    defaultValue: 'false',
    parse: boolean,
  },
  transferStallTimeout: durationSpec(
    'transfer-stall-timeout',
    'the agent aborts and resumes an image transfer when no data arrived for this long',
    '30s',
    100,
  ),
  transferAttempts: {
    flag: 'transfer-attempts',
    description:
      'attempts in a row without progress after which an agent gives an image transfer up and the deploy fails (an attempt that moved forward resets the count)',
    defaultValue: '10',
    parse: integer({ min: 1, max: 1000 }),
  },
  cleanMode: {
    flag: 'clean-mode',
    description: "how cleaning erases disks: 'quick' (partition tables and signatures at both ends) or 'full' (zeros everywhere)",
    defaultValue: 'quick',
    parse: oneOf(['quick', 'full'] as const),
  },
  maxConcurrentDeploys: {
    flag: 'max-concurrent-deploys',
    description: 'most deploys this controller runs at once; the rest wait in order',
    defaultValue: '20',
    parse: integer({ min: 1, max: 10_000 }),
  },
  maxConcurrentCleans: {
    flag: 'max-concurrent-cleans',
    description: 'most cleans this controller runs at once; the rest wait in order',
    defaultValue: '20',
    parse: integer({ min: 1, max: 10_000 }),
  },
  lookupRateLimit: {
    flag: 'lookup-rate-limit',
    description:
      'lookups per minute one peer address may make, after its burst (0: no limit); more get RESOURCE_EXHAUSTED and the agent backs off. Agents usually have addresses of their own; the default lets a rack behind one NAT address retry at its usual pace',
    defaultValue: '600',
    parse: integer({ min: 0, max: 10_000_000 }),
  },
  lookupBurst: {
    flag: 'lookup-burst',
    description:
      'lookups one peer address may make at once before --lookup-rate-limit applies: 1,000 agents booting behind one NAT address fit',
    defaultValue: '1000',
    parse: integer({ min: 1, max: 10_000_000 }),
  },
  agentAuthFailureLimit: {
    flag: 'agent-auth-failure-limit',
    description:
      'failed agent token checks (missing or wrong token) per minute one peer address, and one node uuid, may cause after its burst (0: no limit); while over it, further failed checks from that address or for that node get RESOURCE_EXHAUSTED (calls with a valid token still go through)',
    defaultValue: '120',
    parse: integer({ min: 0, max: 10_000_000 }),
  },
  agentAuthFailureBurst: {
    flag: 'agent-auth-failure-burst',
    description:
      'failed agent token checks one peer address (or one node uuid) may cause at once before --agent-auth-failure-limit applies',
    defaultValue: '1000',
    parse: integer({ min: 1, max: 10_000_000 }),
  },
  operatorAuthFailureLimit: {
    flag: 'operator-auth-failure-limit',
    description:
      'failed operator authentications (missing or wrong token) per minute one client (an IPv4 address, an IPv6 /64) may cause after its burst (0: no limit); while over it, further failures get RESOURCE_EXHAUSTED with a retry hint (valid tokens still go through)',
    defaultValue: '30',
    parse: integer({ min: 0, max: 10_000_000 }),
  },
  operatorAuthFailureBurst: {
    flag: 'operator-auth-failure-burst',
    description: 'failed operator authentications one client may cause at once before --operator-auth-failure-limit applies',
    defaultValue: '20',
    parse: integer({ min: 1, max: 10_000_000 }),
  },
  agentCallTimeout: durationSpec('agent-call-timeout', 'deadline of each unary call the controller makes to an agent', '30s', 100),
  shutdownTimeout: durationSpec('shutdown-timeout', 'on SIGTERM, how long to wait for calls to finish', '10s', 0),
  shutdownDeadline: durationSpec(
    'shutdown-deadline',
    'on SIGTERM, the longest the whole stop may take (calls, heartbeat flush, leaving the cluster, closing the database); what is still running then is abandoned and the process exits with code 1. A second SIGTERM exits at once',
    '30s',
    1000,
  ),
  operatorAuth: {
    flag: 'operator-auth',
    description:
      "how operator calls (node, image) are authenticated: 'token' (bearer tokens from `metalcast token create`; the first start writes an admin token to <data-dir>/admin.token) or 'none' (anyone who reaches --listen may change nodes and wipe disks; for isolated labs only)",
    defaultValue: 'token',
    parse: oneOf(['token', 'none'] as const),
  },
  logLevel: {
    flag: 'log-level',
    description: 'fatal, error, warn, info, debug, trace or silent',
    defaultValue: 'info',
    parse: logLevel,
  },
} satisfies Record<string, OptionSpec>;

type RawControllerConfig = ConfigOf<typeof CONTROLLER_OPTIONS>;

/** A file path made absolute; '' means not given. */
function optionalPath(raw: string): string {
  return raw.trim() === '' ? '' : resolve(raw.trim());
}

/** sqlite:PATH or a PostgreSQL URL; '' means the default SQLite file. */
function parseDatabaseUrl(raw: string): string {
  if (raw === '') return '';
  if (raw.startsWith('postgres://') || raw.startsWith('postgresql://')) {
    try {
      new URL(raw);
    } catch {
      throw new Error(
        `'${raw.replace(/\/\/[^@/]*@/, '//***@')}' is not a valid URL; the form is postgres://user:password@host:5432/database`,
      );
    }
    return raw;
  }
  if (!raw.startsWith('sqlite:')) {
    throw new Error(`'${raw.replace(/\/\/[^@/]*@/, '//***@')}' is not supported; use sqlite:PATH or postgres://host:port/database`);
  }
  if (raw.length === 'sqlite:'.length) throw new Error('sqlite: needs a file path, for example sqlite:/var/lib/metalcast/metalcast.db');
  return raw;
}

/** The controller's validated configuration; durations are in milliseconds. */
export interface ControllerConfig extends Omit<RawControllerConfig, 'database' | 'startupGrace'> {
  /** Database URL, always set (sqlite:PATH or postgres://…). */
  database: string;
  /** Grace after start before the sweep fails anything. */
  startupGrace: number;
}

const defaultDatabase = (dataDir: string) => `sqlite:${join(dataDir, 'metalcast.db')}`;

/**
 * Only the controller's database options (--data-dir, --database), with the
 * same flags, METALCAST_* variables and defaults: for tools that open the
 * controller's database without running it (`metalcast token`). Pure, like
 * loadControllerConfig.
 */
export function loadDatabaseConfig(
  flags: Record<string, unknown>,
  env: Record<string, string | undefined>,
): Pick<ControllerConfig, 'dataDir' | 'database'> {
  const raw = resolveOptions({ dataDir: CONTROLLER_OPTIONS.dataDir, database: CONTROLLER_OPTIONS.database }, flags, env);
  return { dataDir: raw.dataDir, database: raw.database || defaultDatabase(raw.dataDir) };
}

/**
 * Builds the controller config from parsed flags and the environment.
 * Pure: the caller passes `process.env`, tests pass what they like.
 */
export function loadControllerConfig(flags: Record<string, unknown>, env: Record<string, string | undefined>): ControllerConfig {
  const raw = resolveOptions(CONTROLLER_OPTIONS, flags, env);
  const heartbeatIntervalMin = raw.heartbeatIntervalMin || Math.round(raw.heartbeatTimeout * 0.3);
  const heartbeatIntervalMax = raw.heartbeatIntervalMax || Math.round(raw.heartbeatTimeout * 0.6);
  const problems: string[] = [];
  if (heartbeatIntervalMin > heartbeatIntervalMax) {
    problems.push(
      `--heartbeat-interval-min (${heartbeatIntervalMin}ms) must not exceed --heartbeat-interval-max (${heartbeatIntervalMax}ms)`,
    );
  }
  if (heartbeatIntervalMax >= raw.heartbeatTimeout) {
    problems.push(
      `--heartbeat-interval-max (${heartbeatIntervalMax}ms) must be shorter than --heartbeat-timeout (${raw.heartbeatTimeout}ms), or every agent would time out between heartbeats`,
    );
  }
  if (raw.controllerDeadAfter < 3 * raw.controllerTouchInterval) {
    problems.push(
      `--controller-dead-after (${raw.controllerDeadAfter}ms) must be at least 3 x --controller-touch-interval (${raw.controllerTouchInterval}ms), or a live controller could be taken for dead between two touches`,
    );
  }
  if (raw.shutdownDeadline <= raw.shutdownTimeout) {
    problems.push(
      `--shutdown-deadline (${raw.shutdownDeadline}ms) must be longer than --shutdown-timeout (${raw.shutdownTimeout}ms): the calls are only the first part of stopping`,
    );
  }
  if (problems.length > 0) {
    throw new ConfigError(problems);
  }
  return {
    ...raw,
    heartbeatIntervalMin,
    heartbeatIntervalMax,
    database: raw.database || defaultDatabase(raw.dataDir),
    startupGrace: raw.startupGrace < 0 ? raw.heartbeatTimeout : raw.startupGrace,
  };
}
