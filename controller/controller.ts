import { readFileSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createServer } from 'nice-grpc';
import { HealthDefinition, HealthServiceImpl, HealthState } from 'nice-grpc-server-health';
import { ServerReflection, ServerReflectionService } from 'nice-grpc-server-reflection';
import {
  HEALTH_SERVICE,
  healthDescriptorSet,
  REFLECTION_V1,
  REFLECTION_V1ALPHA,
  ServerReflectionV1AlphaService,
  setServingStatus,
} from './services/health-reflection.js';
import { Registry } from 'prom-client';
import { errorMappingMiddleware } from '../common/errors.js';
import { FastAgentGatewayServiceDefinition } from '../common/read-image-codec.js';
import { FastImageServiceDefinition } from '../common/upload-image-codec.js';
import type { Logger } from '../common/logging.js';
import { serverChannelOptions } from '../common/grpc-options.js';
import {
  AGENT_REQUEST_LIMIT_BYTES,
  guardRequestDecoding,
  HEALTH_REQUEST_LIMIT_BYTES,
  OPERATOR_REQUEST_LIMIT_BYTES,
  rejectUndecodableRequests,
} from '../common/request-decoding.js';
import { AgentGatewayServiceDefinition } from '../gen/metalcast/v1/agent_gateway.js';
import { ImageServiceDefinition } from '../gen/metalcast/v1/image.js';
import { NodeServiceDefinition } from '../gen/metalcast/v1/node.js';
import { hostname } from 'node:os';
import { AgentClients } from './agents/agent-client.js';
import { AgentDirectory } from './agents/agent-directory.js';
import { relayNodeChanges } from './cluster/feed-relay.js';
import { Membership } from './cluster/membership.js';
import { AgentSessions } from './agents/agent-sessions.js';
import { ImageFiles } from './images/image-files.js';
import { createImageServer } from './images/image-server.js';
import { NodeLocks } from './provisioning/locks.js';
import { NodeFeed } from './provisioning/node-feed.js';
import { Admission } from './provisioning/admission.js';
import { Conductor } from './provisioning/conductor.js';
import type { ControllerConfig } from './config.js';
import { HeartbeatRecorder } from './agents/heartbeat-recorder.js';
import { splitHostPort, startHttpServer } from './observability/http-server.js';
import { createBootEndpoint, KERNEL_ARGS_PROPERTY } from './boot/boot-endpoint.js';
import { agentCmdline } from './boot/agent-cmdline.js';
import { AgentIsoBuilder } from './boot/agent-iso.js';
import { ejectVirtualMedia, VirtualMediaBoot } from './boot/virtual-media.js';
import { PowerDrivers } from './power/drivers.js';
import { PowerSync } from './power/sync.js';
import { SECRETS_KEY_FILE, SecretBox } from './secrets/secret-box.js';
import { redfishDriverFactory } from './power/redfish/factory.js';
import { RedfishConnections } from './power/redfish/pool.js';
import { createControllerMetrics, grpcServerMetricsMiddleware } from './observability/metrics.js';
import { Provisioner } from './provisioning/provisioner.js';
import { agentGatewayRateLimits, PeerLimit } from './auth/rate-limit.js';
import { createAgentGatewayService } from './services/agent-gateway.js';
import { DEFAULT_FANOUT_POLICY, FanoutTracker } from './fanout/tracker.js';
import { withAuthenticatedAgent } from './services/agent-auth.js';
import { SHUTTING_DOWN } from './services/heartbeat.js';
import { createImageService } from './services/image-service.js';
import { ImageManifests } from './images/manifest/manifests.js';
import { createNodeService } from './services/node-service.js';
import { setUpOperatorAuth } from './auth/operator-auth.js';
import { clientCertificateInterceptor, clientCertificateRole } from './auth/operator-tls.js';
import { setUpControllerTransport } from './tls/transport.js';
import { loadAgentCa } from './tls/agent-ca.js';
import { SqliteStore } from './store/sqlite.js';
import type { Store } from './store/store.js';
import { Sweep } from './provisioning/sweep.js';
import { BoundedShutdown, CANCELLED_CALLS_GRACE_MS } from './shutdown/bounded-shutdown.js';
import { MetalcastError } from '../common/errors.js';
import { Status } from 'nice-grpc-common';

const DESCRIPTOR_SET = fileURLToPath(new URL('../gen/metalcast.binpb', import.meta.url));

/** A running controller, as `startController` returns it. */
export interface RunningController {
  /** host:port the gRPC server listens on (the real port when 0 was asked for). */
  grpcAddress: string;
  /** host:port of /metrics and /healthz. */
  httpAddress: string;
  store: Store;
  imageFiles: ImageFiles;
  /** Chunk manifests of the images (built at upload and import, or lazily for older images). */
  manifests: ImageManifests;
  registry: Registry;
  sessions: AgentSessions;
  locks: NodeLocks;
  feed: NodeFeed;
  sweep: Sweep;
  recorder: HeartbeatRecorder;
  membership: Membership;
  powerSync: PowerSync;
  /**
   * Stops accepting, ends heartbeat streams, flushes heartbeats, closes the
   * store. Idempotent. Every phase is bounded, and the whole by
   * --shutdown-deadline: rejects (after the deadline at the latest) naming
   * the phases that did not finish.
   */
  stop(): Promise<void>;
}

/** Opens the store the database URL names: SQLite for one controller, PostgreSQL for several. */
export async function openStore(
  config: Pick<ControllerConfig, 'database'> & Partial<Pick<ControllerConfig, 'databasePoolSize' | 'databasePoolWait'>>,
  logger: Logger,
): Promise<Store> {
  if (config.database.startsWith('sqlite:')) return SqliteStore.open(config.database.slice('sqlite:'.length));
  const { PostgresStore } = await import('./store/postgres.js');
  return PostgresStore.open(config.database, {
    logger: logger.child({ component: 'postgres' }),
    poolSize: config.databasePoolSize,
    poolWaitMs: config.databasePoolWait,
  });
}

/** The host machines and BMCs reach this controller at: the advertised one, or the listen host when it is a single address. */
function advertisedHost(config: ControllerConfig): string {
  const address = config.advertiseAddress || config.listen;
  const host = address.slice(0, address.lastIndexOf(':'));
  return ['0.0.0.0', '[::]', '::', ''].includes(host) ? hostname() : host;
}

/** The HTTP routes: agent ISOs first, then network boot. */
function withVirtualMedia(
  media: VirtualMediaBoot,
  boot: (req: IncomingMessage, res: ServerResponse, path: string) => boolean,
): (req: IncomingMessage, res: ServerResponse, path: string) => boolean {
  const iso = media.handler();
  return (req, res, path) => iso(req, res, path) || boot(req, res, path);
}

/** What other controllers dial: the advertised address, or the listen address with a reachable host. */
function advertisedAddress(config: ControllerConfig, port: number): string {
  if (config.advertiseAddress !== '') return config.advertiseAddress;
  const host = config.listen.slice(0, config.listen.lastIndexOf(':'));
  const anyHost = ['0.0.0.0', '[::]', '::', ''].includes(host);
  return `${anyHost ? hostname() : host}:${port}`;
}

/** Starts every part of the controller; the order of stop() is the reverse. */
export async function startController(
  config: ControllerConfig,
  logger: Logger,
  /** Power drivers by name (default: the built-in ones; tests register `fake`). */
  power = new PowerDrivers(),
): Promise<RunningController> {
  const startedAt = Date.now();
  // TLS files are read and checked before anything starts: a bad one is a ConfigError (exit code 2).
  const transport = setUpControllerTransport(config, logger.child({ component: 'tls' }));
  const agentCa = loadAgentCa(config);
  // Node secrets (BMC passwords) are sealed with this key before they reach the database.
  const secretBox = SecretBox.loadOrCreate(config.secretsKeyFile || join(config.dataDir, SECRETS_KEY_FILE));
  power.useSecrets(secretBox);
  // BMC connections and sessions, shared by every redfish driver this controller makes; closed at stop.
  const redfish = new RedfishConnections(logger.child({ component: 'redfish' }));
  if (!power.has('redfish')) power.register('redfish', redfishDriverFactory(redfish, logger.child({ component: 'redfish' })));
  const store = await openStore(config, logger);
  // A previous run of this controller (same id) may have died holding locks, maybe half-way through a step.
  const leftovers = await store.releaseHolder(
    config.controllerId,
    `controller ${config.controllerId} restarted while it held the node`,
    Date.now(),
  );
  if (leftovers.released > 0) {
    logger.warn(
      { cleared: leftovers.released, failedNodes: leftovers.failed.map((n) => n.name), holder: config.controllerId },
      'cleared node locks left by a previous run of this controller',
    );
  }

  const imageFiles = new ImageFiles(join(config.dataDir, 'images'));
  await imageFiles.init();

  const registry = new Registry();
  const feed = new NodeFeed();
  const stopRelay = relayNodeChanges(store, feed, config.controllerId, logger.child({ component: 'feed-relay' }));
  const sessions = new AgentSessions();
  const metrics = createControllerMetrics(
    registry,
    store,
    () => sessions.size,
    () => membership.members.length,
  );
  const recorder = new HeartbeatRecorder(
    store,
    metrics,
    logger.child({ component: 'heartbeats' }),
    config.heartbeatFlushInterval,
    (uuids) => {
      for (const uuid of uuids) sessions.revoke(uuid, new MetalcastError(Status.NOT_FOUND, 'the node was deleted'));
    },
  );
  const membership = new Membership(
    store,
    {
      id: config.controllerId,
      touchIntervalMs: config.controllerTouchInterval,
      deadAfterMs: config.controllerDeadAfter,
    },
    logger.child({ component: 'membership' }),
    (_dead, result) => {
      metrics.takeovers.inc();
      metrics.takeoverFailedNodes.inc(result.failed.length);
      for (const node of result.failed) void store.getNode(node.uuid).then((record) => record && feed.publish({ node: record }));
    },
  );
  const sweep = new Sweep(
    store,
    recorder,
    metrics,
    logger.child({ component: 'sweep' }),
    {
      intervalMs: config.sweepInterval,
      heartbeatTimeoutMs: config.heartbeatTimeout,
      graceUntil: startedAt + config.startupGrace,
      share: () => membership.ranges(),
    },
    (node) => {
      sessions.revoke(node.uuid, new MetalcastError(Status.UNAUTHENTICATED, `the node timed out and is now ${node.toState}`));
      void store.getNode(node.uuid).then(async (record) => {
        if (!record) return;
        feed.publish({ node: record });
        await ejectVirtualMedia({ power, store, node: record, logger: logger.child({ component: 'sweep' }), actor: 'sweep' });
      });
    },
  );
  const locks = new NodeLocks(store, config.controllerId, metrics.lockWait);
  // Known once both listen: the address agents dial (for the ISO's command line) and the HTTP port BMCs fetch ISOs from.
  let grpcPortKnown = 0;
  let httpAddressKnown = '';
  const agentControllerAddress = () => config.bootControllerAddress || advertisedAddress(config, grpcPortKnown);
  const virtualMediaBase = () => config.virtualMediaUrl || `http://${advertisedHost(config)}:${splitHostPort(httpAddressKnown).port}`;
  const virtualMedia = new VirtualMediaBoot({
    builder: new AgentIsoBuilder(join(config.dataDir, 'virtual-media')),
    bootDir: config.bootDir,
    // The same command line the iPXE script gives network-booted agents (controller/boot/boot-endpoint.ts).
    cmdline: (node) =>
      agentCmdline({
        controllerAddress: agentControllerAddress(),
        insecure: config.insecure,
        // The ISO's agent fetches the CA from the same place the ISO comes from.
        ca: agentCa && { fingerprint: agentCa.fingerprint, url: `${virtualMediaBase()}/ca.pem` },
        extra: node.properties[KERNEL_ARGS_PROPERTY],
      }),
    baseUrl: virtualMediaBase,
    logger: logger.child({ component: 'virtual-media' }),
  });
  const provisioner = new Provisioner(
    store,
    sessions,
    locks,
    feed,
    logger.child({ component: 'provisioner' }),
    config.controllerId,
    power,
    virtualMedia,
  );
  // A recorded heartbeat is fresh for the longest interval an agent may wait, plus the write-behind of the recorder.
  const freshnessMs = config.heartbeatIntervalMax + 2 * config.heartbeatFlushInterval + 1000;
  const directory = new AgentDirectory(sessions, freshnessMs, {
    allowPlaintext: config.insecure,
    logger: logger.child({ component: 'agent-directory' }),
  });
  const keepalive = { timeMs: config.keepaliveTime, timeoutMs: config.keepaliveTimeout };
  const agentClients = new AgentClients(keepalive, config.agentCallTimeout, logger.child({ component: 'agent-client' }));
  // The fan-out tracker (docs/fanout.md): the agent gateway answers ExchangeChunks with it; the conductor tells it who left.
  const fanoutTracker = new FanoutTracker(
    {
      ...DEFAULT_FANOUT_POLICY,
      enabled: config.fanout,
      maxPeers: config.fanoutMaxPeers,
      maxUploads: config.fanoutMaxUploads,
      controllerStreams: config.fanoutControllerStreams,
      maxUploadBytesPerSecond: config.fanoutMaxUploadRate,
    },
    {
      bytes: (source, bytes) => metrics.fanoutBytes.inc({ source }, bytes),
      peerFailure: (kind) => metrics.fanoutPeerFailures.inc({ kind }),
      peerDropped: () => metrics.fanoutPeersDropped.inc(),
    },
    logger.child({ component: 'fanout' }),
  );
  const conductor = new Conductor(
    store,
    sessions,
    directory,
    membership,
    agentClients,
    provisioner,
    locks,
    feed,
    {
      holder: config.controllerId,
      finalPower: config.deployFinalPower,
      verifyReadback: config.deployVerifyReadback,
      stallTimeoutMs: config.transferStallTimeout,
      transferAttempts: config.transferAttempts,
      cleanMode: config.cleanMode,
      deploys: new Admission(config.maxConcurrentDeploys),
      cleans: new Admission(config.maxConcurrentCleans),
      dueScanIntervalMs: Math.min(config.sweepInterval, config.controllerTouchInterval),
      heartbeatCheckWindowMs: config.heartbeatCheckWindow,
      freshnessMs,
      power,
      onImageWritten: (written) => {
        metrics.imageBytesSkipped.inc(written.bytesSkipped);
        metrics.imageChunksRefetched.inc(written.chunksRefetched);
      },
      onWaveLeft: (nodeUuid) => fanoutTracker.leave(nodeUuid),
    },
    logger.child({ component: 'conductor' }),
  );
  // An abort stops the conductor's step on the node and powers the machine off through its agent when it has no driver.
  provisioner.steps = conductor;
  const powerSync = new PowerSync(
    store,
    power,
    metrics,
    logger.child({ component: 'power-sync' }),
    {
      intervalMs: config.powerSyncInterval,
      concurrency: config.powerSyncConcurrency,
      maxFailures: config.powerSyncMaxFailures,
      holder: config.controllerId,
      share: () => membership.ranges(),
    },
    (node) => feed.publish({ node }),
  );
  const heartbeat = {
    intervalMinMs: config.heartbeatIntervalMin,
    intervalMaxMs: config.heartbeatIntervalMax,
    timeoutMs: config.heartbeatTimeout,
  };

  const rateLimitLog = logger.child({ component: 'rate-limit' });
  const operatorAuth = await setUpOperatorAuth(
    store,
    { mode: config.operatorAuth, dataDir: config.dataDir, listen: config.listen },
    logger.child({ component: 'operator-auth' }),
    // Operator mTLS (--tls-client-ca): a verified client certificate's OU gives its role.
    clientCertificateRole,
    new PeerLimit(
      'operator_auth',
      { perMinute: config.operatorAuthFailureLimit, burst: config.operatorAuthFailureBurst },
      metrics,
      rateLimitLog,
    ),
  );
  const manifests = new ImageManifests(store, imageFiles, config.imageManifestChunkSize, logger.child({ component: 'image-manifests' }));
  const imageServer = createImageServer({
    store,
    files: imageFiles,
    metrics,
    logger: logger.child({ component: 'image-server' }),
    chunkSize: config.imageChunkSize,
    maxTransfers: config.maxImageTransfers,
    readTimeoutMs: config.imageReadTimeout,
    manifests,
  });
  const health = HealthState();
  const agentAuthLog = logger.child({ component: 'agent-gateway' });
  const agentAuthLimit = { perMinute: config.agentAuthFailureLimit, burst: config.agentAuthFailureBurst };
  // The interceptor hands a verified client certificate to the operator middleware (and strips forged ones).
  const server = createServer({ ...serverChannelOptions(keepalive), interceptors: [clientCertificateInterceptor] })
    .use(grpcServerMetricsMiddleware(registry))
    .use(errorMappingMiddleware(logger.child({ component: 'grpc' })))
    .use(
      agentGatewayRateLimits(
        {
          lookup: new PeerLimit('lookup', { perMinute: config.lookupRateLimit, burst: config.lookupBurst }, metrics, rateLimitLog),
          agentAuth: new PeerLimit('agent_auth', agentAuthLimit, metrics, rateLimitLog),
          agentAuthByNode: new PeerLimit('agent_auth_node', agentAuthLimit, metrics, rateLimitLog),
        },
        (context) => withAuthenticatedAgent(context, store, agentAuthLog),
      ),
    )
    .use(rejectUndecodableRequests());
  server.add(
    guardRequestDecoding(FastAgentGatewayServiceDefinition, AGENT_REQUEST_LIMIT_BYTES),
    createAgentGatewayService({
      store,
      sessions,
      recorder,
      metrics,
      logger: logger.child({ component: 'agent-gateway' }),
      heartbeat,
      onHeartbeat: (uuid) => conductor.onHeartbeat(uuid),
      requireAgentCertificate: !config.insecure,
      images: imageServer,
      fanout: {
        manifests,
        tracker: fanoutTracker,
      },
    }),
  );
  // Operator services need a token (agents and health do not): see controller/auth/operator-auth.ts.
  const operatorServer = operatorAuth ? server.with(operatorAuth.middleware) : server;
  operatorServer.add(
    guardRequestDecoding(NodeServiceDefinition, OPERATOR_REQUEST_LIMIT_BYTES),
    createNodeService({
      store,
      provisioner,
      locks,
      feed,
      logger: logger.child({ component: 'node-service' }),
      secrets: secretBox,
      power,
    }),
  );
  const images = createImageService({
    store,
    files: imageFiles,
    config,
    logger: logger.child({ component: 'image-service' }),
    peerClient: transport.peerClient,
  });
  await images.init();
  // UploadImage data is as large as the server's transport limit allows.
  const imageLimits = (method: string) => (method === 'UploadImage' ? undefined : OPERATOR_REQUEST_LIMIT_BYTES);
  operatorServer.add(guardRequestDecoding(FastImageServiceDefinition, imageLimits), images.implementation);
  server.add(guardRequestDecoding(HealthDefinition, HEALTH_REQUEST_LIMIT_BYTES), HealthServiceImpl(health));
  // Reflection shows the whole API, so it needs an operator token; it describes every service it lists (health too).
  const reflection = ServerReflection(Buffer.concat([readFileSync(DESCRIPTOR_SET), healthDescriptorSet()]), [
    AgentGatewayServiceDefinition.fullName,
    NodeServiceDefinition.fullName,
    ImageServiceDefinition.fullName,
    HEALTH_SERVICE,
  ]);
  operatorServer.add(guardRequestDecoding(ServerReflectionService, OPERATOR_REQUEST_LIMIT_BYTES), reflection);
  operatorServer.add(guardRequestDecoding(ServerReflectionV1AlphaService, OPERATOR_REQUEST_LIMIT_BYTES), reflection);
  const servedServices = [
    AgentGatewayServiceDefinition.fullName,
    NodeServiceDefinition.fullName,
    ImageServiceDefinition.fullName,
    HEALTH_SERVICE,
    REFLECTION_V1,
    REFLECTION_V1ALPHA,
  ];

  let grpcPort: number;
  let http: Awaited<ReturnType<typeof startHttpServer>> | undefined;
  try {
    grpcPort = await transport.listen(server, config.listen);
    grpcPortKnown = grpcPort;
    http = await startHttpServer(
      config.metricsListen,
      registry,
      async () => health.getStatus() === 'healthy',
      logger.child({ component: 'http' }),
      withVirtualMedia(
        virtualMedia,
        createBootEndpoint({
          store,
          bootDir: config.bootDir,
          // Known once gRPC listens; network boots come later.
          controllerAddress: () => config.bootControllerAddress || advertisedAddress(config, grpcPort),
          insecure: config.insecure,
          agentCa,
          logger: logger.child({ component: 'boot' }),
        }),
      ),
    );
    httpAddressKnown = http.address;
  } catch (error) {
    await server.forceShutdown();
    transport.close();
    locks.close();
    await store.close();
    throw new Error(
      `cannot listen: ${(error as Error).message} (check --listen ${config.listen} and --metrics-listen ${config.metricsListen})`,
    );
  }
  const advertise = advertisedAddress(config, grpcPort);
  try {
    await membership.start(advertise);
  } catch (error) {
    await server.forceShutdown();
    await http.close();
    locks.close();
    await store.close();
    throw new Error(`cannot register this controller in the database: ${(error as Error).message}`);
  }
  recorder.start();
  sweep.start();
  conductor.start();
  powerSync.start();
  setServingStatus(health, servedServices, 'healthy');
  const grpcAddress = `${config.listen.slice(0, config.listen.lastIndexOf(':'))}:${grpcPort}`;

  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      logger.info('controller stopping');
      const shutdown = new BoundedShutdown(config.shutdownDeadline, logger);
      setServingStatus(health, servedServices, 'unhealthy');
      // Heartbeat streams never end by themselves; end them so that shutdown is not held open.
      sessions.revokeAll(SHUTTING_DOWN);
      imageServer.stop();
      images.stopTransfers(); // DownloadImage streams end at their next chunk too; the replicator stops in images.stop()
      await shutdown.phase(
        'calls',
        async () => {
          const shutdownTimer = setTimeout(() => {
            logger.warn({ timeoutMs: config.shutdownTimeout }, 'calls did not finish in time; cancelling them');
            server.forceShutdown();
            // Sockets that outlive forceShutdown would hold the close open: one still in its TLS handshake, or one of a
            // gracefully closed session whose peer went silent (common/tls.ts listenWatchingHandshakes says more).
            const peers = transport.destroyConnections();
            if (peers.length > 0) {
              logger.warn({ connections: peers.length, peers: peers.slice(0, 10) }, 'closed connections that outlived the cancelled calls');
            }
          }, config.shutdownTimeout);
          try {
            await server.shutdown();
          } finally {
            clearTimeout(shutdownTimer);
          }
        },
        // The calls' own time, then a little for cancelled ones to go; a connection that never closes is left to exit.
        config.shutdownTimeout + CANCELLED_CALLS_GRACE_MS,
      );
      await shutdown.phase('image transfers and imports', () => images.stop());
      await shutdown.phase('conductor', () => conductor.stop());
      await shutdown.phase('power sync', () => powerSync.stop());
      agentClients.closeAll();
      await shutdown.phase('sweep', () => sweep.stop());
      await shutdown.phase('heartbeat flush', () => recorder.stop());
      // Leaving the ring last: the others take this controller's share at once.
      await shutdown.phase('leaving the cluster', () => membership.stop());
      stopRelay();
      locks.close();
      await shutdown.phase('HTTP server', () => http?.close());
      await shutdown.phase('BMC connections', () => redfish.close());
      transport.close();
      await shutdown.phase('database', () => store.close());
      shutdown.finish();
    })();
    return stopping;
  };

  logger.info(
    {
      grpc: grpcAddress,
      http: http.address,
      database: config.database.replace(/\/\/[^@/]*@/, '//***@'),
      controllerId: config.controllerId,
      advertise,
      controllers: membership.members,
      tls: transport.summary,
      agentCa: agentCa ? { fingerprint: agentCa.fingerprint, subject: agentCa.subject } : 'none',
    },
    'controller started',
  );
  return {
    grpcAddress,
    httpAddress: http.address,
    store,
    imageFiles,
    manifests,
    registry,
    sessions,
    locks,
    feed,
    sweep,
    recorder,
    membership,
    powerSync,
    stop,
  };
}
