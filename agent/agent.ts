import { createSocket } from 'node:dgram';
import { networkInterfaces } from 'node:os';
import type { Server } from 'nice-grpc';
import type { Logger } from '../common/logging.js';
import { hostOf, loadCaBundle } from '../common/tls.js';
import { METALCAST_VERSION } from '../common/version.js';
import { AgentStatus } from '../gen/metalcast/v1/agent_gateway.js';
import type { Inventory } from '../gen/metalcast/v1/inventory.js';
import type { CommandHandler } from './commands/command.js';
import { eraseDisksCommand } from './commands/erase-disks.js';
import { getInventoryCommand } from './commands/get-inventory.js';
import { powerOffCommand, rebootCommand } from './commands/power-commands.js';
import { writeConfigDriveCommand } from './commands/write-config-drive.js';
import { writeImageCommand } from './commands/write-image.js';
import { controllerConfigDriveSource } from './configdrive/config-drive-source.js';
import { controllerImageSource } from './imaging/image-source.js';
import { CommandRunner } from './commands/runner.js';
import { type AgentConfig, checkAgentTlsMode } from './config/config.js';
import { fetchPinnedCa } from './config/ca-fetch.js';
import { pinnedCertificate } from '../common/ca-pin.js';
import { ConfigError } from '../common/config.js';
import { ControllerLink } from './controller/controller-link.js';
import { discoverInventory } from './discovery/index.js';
import { HeartbeatLoop, type HeartbeatIdentity } from './controller/heartbeat.js';
import { lookupWithBackoff } from './controller/lookup.js';
import { OsPowerDriver, type PowerDriver, RecordingPowerDriver } from './commands/os-power.js';
import { startAgentServer } from './api/server.js';
import { createAgentTlsIdentity } from './api/tls-identity.js';
import { ChunkShare } from './fanout/chunk-share.js';
import { createFanoutHook } from './fanout/peer-fetcher.js';
import { TokenBucket } from './fanout/token-bucket.js';

/** A running agent, as startAgent returns it. */
export interface RunningAgent {
  /** host:port the controller is told to dial. */
  advertiseAddress: string;
  nodeUuid: () => string | undefined;
  /** Resolves when the agent stops for good; rejects on a fatal error (lookup budget exhausted). */
  done: Promise<void>;
  stop(): Promise<void>;
}

/**
 * The agent's life: discover the machine, serve the Agent API, look the node
 * up, then keep heartbeating; look up again whenever the controller stops
 * accepting the token.
 */
export async function startAgent(config: AgentConfig, logger: Logger): Promise<RunningAgent> {
  // Checked and read before anything else: a missing or unreadable CA bundle is a ConfigError (exit code 2).
  checkAgentTlsMode(config);
  const ca = config.insecure ? undefined : await agentCa(config, logger);
  const caPem = ca?.pem;
  if (config.insecure) {
    logger.warn(
      { controller: config.controller, listen: config.listen },
      'talking to the controller and serving the agent API in plaintext (--insecure): anyone on the provisioning network can read the agent token and pose as the controller or as this agent; for isolated labs and tests only',
    );
  }
  const inventory = await discoverInventory(config.root);
  const macs = inventory.interfaces.map((nic) => nic.macAddress);
  if (macs.length === 0)
    throw new Error(
      `no physical network interface found under ${config.root}/sys/class/net; the agent cannot look itself up without a MAC`,
    );
  logger.info(
    { macs, disks: inventory.disks.map((d) => `${d.name} ${d.sizeBytes}`), system: inventory.system?.serialNumber },
    'hardware discovered',
  );
  const discover = async (): Promise<Inventory> => discoverInventory(config.root);

  let identity: HeartbeatIdentity | undefined;
  const keepalive = { timeMs: config.keepaliveTime, timeoutMs: config.keepaliveTimeout };
  const power: PowerDriver = config.powerDriver === 'recording' ? new RecordingPowerDriver(config.powerRecordFile) : new OsPowerDriver();
  const link = new ControllerLink(
    config.controller,
    keepalive,
    logger.child({ component: 'controller-link' }),
    {},
    ca === undefined ? undefined : { caPem: ca.pem, source: ca.source },
  );
  const imageSource = controllerImageSource(link, () => identity, config.callTimeout);
  const share = new ChunkShare(logger.child({ component: 'fanout' }));
  const fanout = config.fanout
    ? createFanoutHook({
        share,
        insecure: config.insecure,
        keepalive,
        lingerMs: config.fanoutLinger,
        parallel: config.fanoutParallel,
        downloadBucket: config.fanoutMaxDownloadRate > 0 ? new TokenBucket(config.fanoutMaxDownloadRate) : undefined,
      })
    : undefined;
  const handlers: CommandHandler[] = [
    getInventoryCommand(discover) as unknown as CommandHandler,
    writeImageCommand(imageSource, discover, fanout, config.imageStreams) as unknown as CommandHandler,
    writeConfigDriveCommand(
      controllerConfigDriveSource(link, () => identity, config.callTimeout),
      discover,
    ) as unknown as CommandHandler,
    eraseDisksCommand(discover) as unknown as CommandHandler,
    powerOffCommand(power) as unknown as CommandHandler,
    rebootCommand(power) as unknown as CommandHandler,
  ];
  // Any other command ends the deploy's serving: the final power-off or reboot, an erase that wipes the chunks.
  for (const handler of handlers) {
    if (handler.name === 'writeImage' || handler.name === 'getInventory') continue;
    const run = handler.run.bind(handler);
    handler.run = (parameters, context) => {
      share.end(`the ${handler.name} command started`);
      return run(parameters, context);
    };
  }
  let heartbeat: HeartbeatLoop | undefined;
  const runner = new CommandRunner(handlers, config.commandHistory, logger.child({ component: 'commands' }), () => heartbeat?.forceSoon());

  const advertiseHost = config.advertiseAddress
    ? hostOf(config.advertiseAddress)
    : await guessAdvertiseHost(config.listen, config.controller[0] as string);
  // A new key at every start, never written anywhere: the controller pins its certificate after each lookup.
  const tls = caPem === undefined ? undefined : await createAgentTlsIdentity(advertiseHost);
  const { server, port } = await startAgentServer(
    config.listen,
    keepalive,
    {
      runner,
      currentToken: () => identity?.token,
      inventory: discover,
      logger: logger.child({ component: 'agent-api' }),
      share,
    },
    tls,
  );
  const advertiseAddress = config.advertiseAddress || `${advertiseHost.includes(':') ? `[${advertiseHost}]` : advertiseHost}:${port}`;
  logger.info(
    {
      listen: config.listen,
      port,
      advertiseAddress,
      tls: tls ? { fingerprint: tls.fingerprint, validTo: tls.validTo } : 'off (--insecure)',
    },
    'agent API listening',
  );

  const stopping = new AbortController();
  const lookupOptions = {
    backoffStartMs: config.lookupBackoffStart,
    backoffMaxMs: config.lookupBackoffMax,
    budgetMs: config.lookupBudget,
    callTimeoutMs: config.callTimeout,
  };
  const lookup = async () => {
    const answer = await lookupWithBackoff(
      link,
      {
        macAddresses: macs,
        systemSerial: inventory.system?.serialNumber ?? '',
        systemUuid: inventory.system?.uuid ?? '',
        agentVersion: METALCAST_VERSION,
      },
      lookupOptions,
      logger.child({ component: 'lookup' }),
      stopping.signal,
    );
    identity = { nodeUuid: answer.nodeUuid, token: answer.agentToken };
    logger.info(
      { node: answer.nodeUuid, controller: link.address, heartbeatTimeoutMs: answer.heartbeatTimeoutMs },
      'looked up: this machine is node',
    );
  };

  const done = (async () => {
    await lookup();
    heartbeat = new HeartbeatLoop(
      link,
      () => identity as HeartbeatIdentity,
      () => {
        const command = runner.latest();
        return {
          agentAddress: advertiseAddress,
          agentVersion: METALCAST_VERSION,
          status: runner.isBusy() ? AgentStatus.AGENT_STATUS_BUSY : AgentStatus.AGENT_STATUS_IDLE,
          // The result (an inventory, say) is fetched with GetCommand; heartbeats stay small.
          command: command ? { ...command, result: undefined } : undefined,
        };
      },
      lookup,
      {
        reconnectDelayMs: config.reconnectDelay,
        minGapMs: config.minHeartbeatGap,
        ackTimeoutMs: config.callTimeout,
        certificatePem: tls?.certPem,
      },
      logger.child({ component: 'heartbeat' }),
    );
    // Resolves when stopped; rejects when a re-lookup exhausts its budget.
    await heartbeat.start();
  })();

  let stopped: Promise<void> | undefined;
  const stop = () => {
    stopped ??= (async () => {
      logger.info('agent stopping');
      stopping.abort();
      share.end('the agent is stopping');
      await heartbeat?.stop();
      runner.abort();
      await shutdownServer(server);
      link.close();
      await done.catch(() => {});
      logger.info('agent stopped');
    })();
    return stopped;
  };
  return { advertiseAddress, nodeUuid: () => identity?.nodeUuid, done, stop };
}

async function shutdownServer(server: Server): Promise<void> {
  const force = setTimeout(() => server.forceShutdown(), 5000);
  await server.shutdown();
  clearTimeout(force);
}

/**
 * The host the controller should dial: the listen host if it is a specific
 * one, otherwise the local address the kernel would use to reach the
 * controller (a connected UDP socket sends nothing). The bound port goes
 * with it.
 */
async function guessAdvertiseHost(listen: string, controller: string): Promise<string> {
  const listenHost = listen.slice(0, listen.lastIndexOf(':')).replace(/^\[|\]$/g, '');
  if (listenHost !== '0.0.0.0' && listenHost !== '::') return listenHost;
  const controllerHost = controller.slice(0, controller.lastIndexOf(':')).replace(/^\[|\]$/g, '');
  const controllerPort = Number(controller.slice(controller.lastIndexOf(':') + 1));
  try {
    const local = await new Promise<string>((resolve, reject) => {
      const socket = createSocket(controllerHost.includes(':') ? 'udp6' : 'udp4');
      socket.once('error', reject);
      socket.connect(controllerPort, controllerHost, () => {
        const address = socket.address().address;
        socket.close();
        resolve(address);
      });
    });
    return local;
  } catch {
    const fallback = Object.values(networkInterfaces())
      .flat()
      .find((nic) => nic && nic.family === 'IPv4' && !nic.internal);
    return fallback?.address ?? '127.0.0.1';
  }
}

/**
 * The CA the agent verifies the controller with: --ca (checked against
 * --ca-fingerprint when both are given; then only the pinned certificate is
 * kept), or fetched from --ca-url and checked against the fingerprint.
 */
async function agentCa(config: AgentConfig, logger: Logger): Promise<{ pem: string; source: string }> {
  if (config.ca !== '') {
    const pem = loadCaBundle(config.ca, '--ca');
    if (config.caFingerprint === '') return { pem, source: `--ca ${config.ca}` };
    const pinned = pinnedCertificate(pem, config.caFingerprint);
    if (!pinned) throw new ConfigError([`--ca ${config.ca} holds no certificate with --ca-fingerprint ${config.caFingerprint}`]);
    return { pem: pinned.pem, source: `--ca ${config.ca} (${config.caFingerprint})` };
  }
  const pem = await fetchPinnedCa({
    url: config.caUrl,
    fingerprint: config.caFingerprint,
    attempts: config.caFetchAttempts,
    logger: logger.child({ component: 'ca-fetch' }),
  });
  return { pem, source: `--ca-url ${config.caUrl} (${config.caFingerprint})` };
}
