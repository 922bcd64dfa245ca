import { Counter, Gauge, Histogram, type Registry, collectDefaultMetrics } from 'prom-client';
import { labelNames, labelNamesWithCode, prometheusServerMiddleware } from 'nice-grpc-prometheus';
import type { ServerMiddleware } from 'nice-grpc';
import { WAIT_STATES } from '../provisioning/states.js';
import type { Store } from '../store/store.js';

/** The kinds of metalcast_rate_limited_total (controller/auth/rate-limit.ts), so that each series exists from the start. */
export const RATE_LIMIT_KINDS = ['lookup', 'agent_auth', 'agent_auth_node', 'operator_auth'] as const;
/** Every `result` of metalcast_lookups_total (controller/services/lookup.ts). */
export const LOOKUP_RESULTS = ['found', 'not_found', 'agent_alive', 'invalid'] as const;
/** Every `result` of metalcast_sweep_runs_total (controller/provisioning/sweep.ts). */
export const SWEEP_RESULTS = ['ok', 'grace', 'error'] as const;
/** Every `result` of metalcast_image_transfer_duration_seconds (controller/images/image-server.ts). */
export const TRANSFER_RESULTS = ['ok', 'error', 'timeout', 'cancelled'] as const;

/** prom-client default metrics that are gauges but end in `_total`. */
export const GAUGES_NAMED_LIKE_COUNTERS = ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'];

/**
 * The controller's metrics, all in the one registry passed in, so that
 * tests and several controllers in one process never share counters.
 */
export function createControllerMetrics(
  registry: Registry,
  store: Store,
  agentsConnected: () => number,
  /** Live controllers on the ring, as this one sees them. */
  controllersLive: () => number = () => 1,
) {
  collectDefaultMetrics({ register: registry });
  // prom-client exports these three gauges twice, once with a counter's `_total` suffix, which makes
  // `promtool check metrics` exit 3 on every scrape. The same values stay as nodejs_active_handles,
  // nodejs_active_requests and nodejs_active_resources.
  for (const name of GAUGES_NAMED_LIKE_COUNTERS) registry.removeSingleMetric(name);
  const metrics = {
    heartbeats: new Counter({
      name: 'metalcast_heartbeats_total',
      help: 'Heartbeats received from agents.',
      registers: [registry],
    }),
    lookups: new Counter({
      name: 'metalcast_lookups_total',
      help: 'Agent lookups by result (found, not_found, invalid, agent_alive).',
      labelNames: ['result'],
      registers: [registry],
    }),
    agentsConnected: new Gauge({
      name: 'metalcast_agents_connected',
      help: 'Agents with an open heartbeat stream to this controller.',
      registers: [registry],
      collect() {
        this.set(agentsConnected());
      },
    }),
    controllersLive: new Gauge({
      name: 'metalcast_controllers_live',
      help: 'Controllers sharing the database that this one counts alive (the members of the hash ring).',
      registers: [registry],
      collect() {
        this.set(controllersLive());
      },
    }),
    takeovers: new Counter({
      name: 'metalcast_controller_takeovers_total',
      help: 'Dead controllers whose nodes this controller took over.',
      registers: [registry],
    }),
    takeoverFailedNodes: new Counter({
      name: 'metalcast_takeover_failed_nodes_total',
      help: 'Nodes failed at a takeover because a dead controller left them between two steps.',
      registers: [registry],
    }),
    nodes: new Gauge({
      name: 'metalcast_nodes',
      help: 'Nodes by provision state, counted at scrape time.',
      labelNames: ['provision_state'],
      registers: [registry],
      async collect() {
        for (const [state, count] of await store.countByProvisionState()) this.set({ provision_state: state }, count);
      },
    }),
    sweepDuration: new Histogram({
      name: 'metalcast_sweep_duration_seconds',
      help: 'Time one sweep for silent agents took.',
      buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
      registers: [registry],
    }),
    sweepRuns: new Counter({
      name: 'metalcast_sweep_runs_total',
      help: 'Sweeps run, by result (ok, error, grace).',
      labelNames: ['result'],
      registers: [registry],
    }),
    heartbeatTimeouts: new Counter({
      name: 'metalcast_heartbeat_timeouts_total',
      help: 'Nodes failed because their agent stopped heartbeating.',
      labelNames: ['provision_state'],
      registers: [registry],
    }),
    imageBytesServed: new Counter({
      name: 'metalcast_image_bytes_served_total',
      help: 'Image bytes sent to agents by ReadImage (all-zero chunks count, though they travel as a marker).',
      registers: [registry],
    }),
    fanoutBytes: new Counter({
      name: 'metalcast_fanout_image_bytes_total',
      help: 'Image bytes agents of fan-out deploys received, by source: "peer" (another agent of the wave) or "controller" (docs/fanout.md).',
      labelNames: ['source'] as const,
      registers: [registry],
    }),
    fanoutPeerFailures: new Counter({
      name: 'metalcast_fanout_peer_failures_total',
      help: 'Chunk fetches from peers that failed, as the fetching agents reported them, by kind: corrupt (wrong bytes), stalled, gone (its deploy moved on), error.',
      labelNames: ['kind'] as const,
      registers: [registry],
    }),
    fanoutPeersDropped: new Counter({
      name: 'metalcast_fanout_peers_dropped_total',
      help: 'Peers dropped from a fan-out wave for serving a wrong chunk, stalling or failing repeatedly.',
      registers: [registry],
    }),
    imageTransfersActive: new Gauge({
      name: 'metalcast_image_transfers_active',
      help: 'ReadImage streams being served now.',
      registers: [registry],
    }),
    imageBytesSkipped: new Counter({
      name: 'metalcast_image_delta_bytes_saved_total',
      help: 'Image bytes that deploys did not transfer because the target disk already held those chunks (delta re-imaging and resume, docs/chunk-manifest.md).',
      registers: [registry],
    }),
    imageChunksRefetched: new Counter({
      name: 'metalcast_image_chunks_refetched_total',
      help: 'Image chunks that agents fetched again because they failed verification against the chunk manifest.',
      registers: [registry],
    }),
    imageTransferResumes: new Counter({
      name: 'metalcast_image_transfer_resumes_total',
      help: 'ReadImage calls that start past offset 0: an agent resuming a broken or stalled transfer.',
      registers: [registry],
    }),
    imageTransfersRejected: new Counter({
      name: 'metalcast_image_transfers_rejected_total',
      help: 'ReadImage calls refused because --max-image-transfers were already running.',
      registers: [registry],
    }),
    imageTransferDuration: new Histogram({
      name: 'metalcast_image_transfer_duration_seconds',
      help: 'Duration of ReadImage streams, whatever their outcome.',
      labelNames: ['result'],
      buckets: [0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800],
      registers: [registry],
    }),
    lockWait: new Histogram({
      name: 'metalcast_lock_wait_seconds',
      help: 'Time spent waiting for a node lock, by kind (patient hand-offs wait in arrival order).',
      labelNames: ['kind'],
      buckets: [0.001, 0.01, 0.1, 0.5, 1, 5, 15, 60, 300],
      registers: [registry],
    }),
    heartbeatFlushDuration: new Histogram({
      name: 'metalcast_heartbeat_flush_duration_seconds',
      help: 'Time writing one batch of heartbeats to the database took.',
      buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1],
      registers: [registry],
    }),
    rateLimited: new Counter({
      name: 'metalcast_rate_limited_total',
      help: 'Calls refused RESOURCE_EXHAUSTED by a per-client limit, by kind (lookup: --lookup-rate-limit; agent_auth: --agent-auth-failure-limit per address; agent_auth_node: the same per node uuid; operator_auth: --operator-auth-failure-limit per address or IPv6 /64).',
      labelNames: ['kind'],
      registers: [registry],
    }),
    powerSyncChecks: new Counter({
      name: 'metalcast_power_sync_checks_total',
      help: 'Power state reads by the power sync, by result (on, off, failed).',
      labelNames: ['result'],
      registers: [registry],
    }),
    powerStateChanges: new Counter({
      name: 'metalcast_power_state_changes_total',
      help: 'Power states the power sync found different from what the controller last knew (changed outside metalcast), by the state found.',
      labelNames: ['power_state'],
      registers: [registry],
    }),
    bmcUnreachableNodes: new Gauge({
      name: 'metalcast_bmc_unreachable_nodes',
      help: "Nodes of this controller's share whose BMC failed --power-sync-max-failures power state reads in a row, as of the last power sync round.",
      registers: [registry],
    }),
    powerSyncRoundDuration: new Histogram({
      name: 'metalcast_power_sync_round_duration_seconds',
      help: 'Time one power sync round took (spread over --power-sync-interval).',
      buckets: [0.1, 1, 5, 15, 30, 60, 120, 300, 600],
      registers: [registry],
    }),
  };
  // Series that alerts take increase() or rate() of exist from the start at 0:
  // a series born at 1 would hide the first timeout, failed sweep or lock wait.
  for (const state of WAIT_STATES) metrics.heartbeatTimeouts.inc({ provision_state: state }, 0);
  metrics.lockWait.zero({ kind: 'patient' });
  for (const kind of RATE_LIMIT_KINDS) metrics.rateLimited.inc({ kind }, 0);
  for (const result of ['on', 'off', 'failed']) metrics.powerSyncChecks.inc({ result }, 0);
  for (const state of ['on', 'off']) metrics.powerStateChanges.inc({ power_state: state }, 0);
  // The dashboard's panels on lookups, sweeps and transfers showed "No data" on a fresh install: a
  // labelled series exists only from its first event unless it is made here, at 0.
  for (const result of LOOKUP_RESULTS) metrics.lookups.inc({ result }, 0);
  for (const result of SWEEP_RESULTS) metrics.sweepRuns.inc({ result }, 0);
  for (const result of TRANSFER_RESULTS) metrics.imageTransferDuration.zero({ result });
  return metrics;
}

export type ControllerMetrics = ReturnType<typeof createControllerMetrics>;

/** nice-grpc-prometheus's server metrics, registered in our registry instead of its global one. */
export function grpcServerMetricsMiddleware(registry: Registry): ServerMiddleware {
  const buckets = [0.001, 0.004, 0.016, 0.064, 0.256, 1, 4, 16, 64, 256, 1024, 4096];
  return prometheusServerMiddleware({
    serverStartedMetric: new Counter({
      name: 'grpc_server_started_total',
      help: 'Total number of RPCs started on the server.',
      labelNames,
      registers: [registry],
    }),
    serverHandledMetric: new Counter({
      name: 'grpc_server_handled_total',
      help: 'Total number of RPCs completed on the server, regardless of success or failure.',
      labelNames: labelNamesWithCode,
      registers: [registry],
    }),
    serverStreamMsgReceivedMetric: new Counter({
      name: 'grpc_server_msg_received_total',
      help: 'Total number of RPC stream messages received by the server.',
      labelNames,
      registers: [registry],
    }),
    serverStreamMsgSentMetric: new Counter({
      name: 'grpc_server_msg_sent_total',
      help: 'Total number of gRPC stream messages sent by the server.',
      labelNames,
      registers: [registry],
    }),
    serverHandlingSecondsMetric: new Histogram({
      name: 'grpc_server_handling_seconds',
      help: 'Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.',
      labelNames: labelNamesWithCode,
      buckets,
      registers: [registry],
    }),
  });
}
