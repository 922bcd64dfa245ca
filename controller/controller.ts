import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createServer } from 'nice-grpc';
import { HealthDefinition, HealthServiceImpl, HealthState } from 'nice-grpc-server-health';
import { ServerReflection, ServerReflectionService } from 'nice-grpc-server-reflection';
import { Registry } from 'prom-client';
import { errorMappingMiddleware } from '../common/errors.js';
import { FastAgentGatewayServiceDefinition } from '../common/read-image-codec.js';
import type { Logger } from '../common/logging.js';
import { serverChannelOptions } from '../common/grpc-options.js';
import { AgentGatewayServiceDefinition } from '../gen/metalcast/v1/agent_gateway.js';
import { ImageServiceDefinition } from '../gen/metalcast/v1/image.js';
import { NodeServiceDefinition } from '../gen/metalcast/v1/node.js';
import { AgentClients } from './agent-client.js';
import { AgentSessions } from './agent-sessions.js';
import { ImageFiles } from './images/image-files.js';
import { createImageServer } from './images/image-server.js';
import { NodeLocks } from './locks.js';
import { NodeFeed } from './node-feed.js';
import { Admission } from './provisioning/admission.js';
import { Conductor } from './provisioning/conductor.js';
import type { ControllerConfig } from './config.js';
import { HeartbeatRecorder } from './heartbeat-recorder.js';
import { startHttpServer } from './http-server.js';
import { createControllerMetrics, grpcServerMetricsMiddleware } from './metrics.js';
import { Provisioner } from './provisioning/provisioner.js';
import { createAgentGatewayService } from './services/agent-gateway.js';
import { SHUTTING_DOWN } from './services/heartbeat.js';
import { createImageService } from './services/image-service.js';
import { createNodeService } from './services/node-service.js';
import { SqliteStore } from './store/sqlite.js';
import type { Store } from './store/store.js';
import { Sweep } from './sweep.js';
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
  registry: Registry;
  sessions: AgentSessions;
  locks: NodeLocks;
  feed: NodeFeed;
  sweep: Sweep;
  recorder: HeartbeatRecorder;
  /** Stops accepting, ends heartbeat streams, flushes heartbeats, closes the store. Idempotent. */
  stop(): Promise<void>;
}

export function openStore(config: ControllerConfig): Store {
  return SqliteStore.open(config.database.slice('sqlite:'.length));
}

/** Starts every part of the controller; the order of stop() is the reverse. */
export async function startController(config: ControllerConfig, logger: Logger): Promise<RunningController> {
  const startedAt = Date.now();
  const store = openStore(config);
  const cleared = await store.clearReservations(config.controllerId);
  if (cleared > 0) logger.warn({ cleared, holder: config.controllerId }, 'cleared node locks left by a previous run of this controller');

  const imageFiles = new ImageFiles(join(config.dataDir, 'images'));
  await imageFiles.init();

  const registry = new Registry();
  const feed = new NodeFeed();
  const sessions = new AgentSessions();
  const metrics = createControllerMetrics(registry, store, () => sessions.size);
  const recorder = new HeartbeatRecorder(
    store,
    metrics,
    logger.child({ component: 'heartbeats' }),
    config.heartbeatFlushInterval,
    (uuids) => {
      for (const uuid of uuids) sessions.revoke(uuid, new MetalcastError(Status.NOT_FOUND, 'the node was deleted'));
    },
  );
  const sweep = new Sweep(
    store,
    recorder,
    metrics,
    logger.child({ component: 'sweep' }),
    { intervalMs: config.sweepInterval, heartbeatTimeoutMs: config.heartbeatTimeout, graceUntil: startedAt + config.startupGrace },
    (node) => {
      sessions.revoke(node.uuid, new MetalcastError(Status.UNAUTHENTICATED, `the node timed out and is now ${node.toState}`));
      void store.getNode(node.uuid).then((record) => record && feed.publish({ node: record }));
    },
  );
  const locks = new NodeLocks(store, config.controllerId, metrics.lockWait);
  const provisioner = new Provisioner(store, sessions, locks, feed, logger.child({ component: 'provisioner' }));
  const keepalive = { timeMs: config.keepaliveTime, timeoutMs: config.keepaliveTimeout };
  const agentClients = new AgentClients(keepalive, config.agentCallTimeout, logger.child({ component: 'agent-client' }));
  const conductor = new Conductor(
    store,
    sessions,
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
    },
    logger.child({ component: 'conductor' }),
  );
  const heartbeat = {
    intervalMinMs: config.heartbeatIntervalMin,
    intervalMaxMs: config.heartbeatIntervalMax,
    timeoutMs: config.heartbeatTimeout,
  };

  const imageServer = createImageServer({
    store,
    files: imageFiles,
    metrics,
    logger: logger.child({ component: 'image-server' }),
    chunkSize: config.imageChunkSize,
    maxTransfers: config.maxImageTransfers,
    readTimeoutMs: config.imageReadTimeout,
  });
  const health = HealthState();
  const server = createServer(serverChannelOptions(keepalive))
    .use(grpcServerMetricsMiddleware(registry))
    .use(errorMappingMiddleware(logger.child({ component: 'grpc' })));
  server.add(
    FastAgentGatewayServiceDefinition,
    createAgentGatewayService({
      store,
      sessions,
      recorder,
      metrics,
      logger: logger.child({ component: 'agent-gateway' }),
      heartbeat,
      onHeartbeat: (uuid) => conductor.onHeartbeat(uuid),
      images: imageServer,
    }),
  );
  server.add(
    NodeServiceDefinition,
    createNodeService({ store, provisioner, locks, feed, logger: logger.child({ component: 'node-service' }) }),
  );
  const images = createImageService({ store, files: imageFiles, config, logger: logger.child({ component: 'image-service' }) });
  await images.init();
  server.add(ImageServiceDefinition, images.implementation);
  server.add(HealthDefinition, HealthServiceImpl(health));
  server.add(
    ServerReflectionService,
    ServerReflection(readFileSync(DESCRIPTOR_SET), [
      AgentGatewayServiceDefinition.fullName,
      NodeServiceDefinition.fullName,
      ImageServiceDefinition.fullName,
      'grpc.health.v1.Health',
    ]),
  );

  let grpcPort: number;
  let http: Awaited<ReturnType<typeof startHttpServer>> | undefined;
  try {
    grpcPort = await server.listen(config.listen);
    http = await startHttpServer(
      config.metricsListen,
      registry,
      async () => health.getStatus() === 'healthy',
      logger.child({ component: 'http' }),
    );
  } catch (error) {
    await server.forceShutdown();
    await store.close();
    throw new Error(
      `cannot listen: ${(error as Error).message} (check --listen ${config.listen} and --metrics-listen ${config.metricsListen})`,
    );
  }
  recorder.start();
  sweep.start();
  health.setStatus('healthy');
  const grpcAddress = `${config.listen.slice(0, config.listen.lastIndexOf(':'))}:${grpcPort}`;

  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      logger.info('controller stopping');
      health.setStatus('unhealthy');
      // Heartbeat streams never end by themselves; end them so that shutdown is not held open.
      sessions.revokeAll(SHUTTING_DOWN);
      imageServer.stop();
      const shutdownTimer = setTimeout(() => {
        logger.warn({ timeoutMs: config.shutdownTimeout }, 'calls did not finish in time; cancelling them');
        server.forceShutdown();
      }, config.shutdownTimeout);
      await server.shutdown();
      clearTimeout(shutdownTimer);
      await images.stop();
      await conductor.stop();
      agentClients.closeAll();
      await sweep.stop();
      await recorder.stop();
      await http?.close();
      await store.close();
      logger.info('controller stopped');
    })();
    return stopping;
  };

  logger.info(
    { grpc: grpcAddress, http: http.address, database: config.database.replace(/\/\/[^@]*@/, '//***@'), controllerId: config.controllerId },
    'controller started',
  );
  return { grpcAddress, httpAddress: http.address, store, imageFiles, registry, sessions, locks, feed, sweep, recorder, stop };
}
