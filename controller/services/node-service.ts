import { Status } from 'nice-grpc-common';
import { invalidArgument, MetalcastError, notFound } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { normaliseMac, normaliseMacList } from '../../common/mac.js';
import { AbortPower, type NodeServiceImplementation } from '../../gen/metalcast/v1/node.js';
import { actionFromProto, eventToProto, nodeToProto, stateFromProto } from './convert.js';
import type { NodeLocks } from '../provisioning/locks.js';
import type { NodeChange, NodeFeed } from '../provisioning/node-feed.js';
import type { Provisioner } from '../provisioning/provisioner.js';
import { buildConfigDrive, checkInstanceConfig } from '../configdrive/config-drive.js';
import type { ProvisionState } from '../provisioning/states.js';
import type { NodeRecord, Store } from '../store/store.js';
import { applySettings } from '../store/settings.js';
import {
  decodePageToken,
  encodePageToken,
  MAX_NODE_PORTS,
  pageSize,
  validateDeploySpec,
  validateMaintenanceReason,
  validateNodeName,
  validateNodeRef,
  MAX_NODE_SECRETS,
  validateProperties,
  validateSecrets,
  validateUnset,
  validateWatchedNodes,
} from './validation.js';
import type { PowerDrivers } from '../power/drivers.js';
import type { SecretBox } from '../secrets/secret-box.js';
import { createNodePowerMethods } from './node-power.js';

/** States a node may be deleted from: nothing is running on it or for it. */
const DELETABLE: readonly ProvisionState[] = ['enroll', 'manageable', 'available', 'inspect_failed', 'clean_failed', 'deploy_failed'];

export interface NodeServiceDeps {
  store: Store;
  provisioner: Provisioner;
  locks: NodeLocks;
  feed: NodeFeed;
  logger: Logger;
  /** Seals secrets before they reach the store. */
  secrets: SecretBox;
  /** Checks power settings as they are set (the drivers this controller knows). */
  power: PowerDrivers;
}

/** Most node changes a WatchNodes stream buffers for a slow reader before it is ended. */
const WATCH_BUFFER = 1000;

/** The operator API for nodes. */
export function createNodeService(deps: NodeServiceDeps): NodeServiceImplementation {
  const { store, provisioner, locks, feed } = deps;
  const operator = 'operator';

  async function requireNode(ref: string): Promise<NodeRecord> {
    const node = await store.getNode(validateNodeRef(ref));
    if (!node) throw notFound(`node '${ref}' not found; metalcast node list shows the enrolled nodes`);
    return node;
  }

  /** Runs a short state change under the node's lock (fails fast when it is held). */
  async function withLock<T>(node: NodeRecord, operation: string, fn: () => Promise<T>): Promise<T> {
    const lock = await locks.lock(node.uuid, operation);
    try {
      return await fn();
    } finally {
      await lock.release();
    }
  }

  /** INVALID_ARGUMENT naming the setting to fix when the node's power settings could not make a driver. */
  function checkPowerSettings(name: string, properties: Record<string, string>, secretKeys: readonly string[]): void {
    try {
      deps.power.check({ name, properties, secretKeys });
    } catch (error) {
      throw invalidArgument(`${(error as Error).message}; fix the node's power settings`);
    }
  }

  function published(node: NodeRecord | undefined): NodeRecord | undefined {
    if (node) feed.publish({ node });
    return node;
  }

  return {
    ...createNodePowerMethods({ store, locks, power: deps.power, logger: deps.logger }),

    async createNode(request) {
      const name = validateNodeName(request.name);
      const macs = normaliseMacList(request.macAddresses);
      const properties = validateProperties(request.properties);
      const secrets = validateSecrets(request.secrets);
      checkPowerSettings(name, properties, Object.keys(secrets));
      const secretNote = Object.keys(secrets).length ? `; secrets ${Object.keys(secrets).sort().join(', ')}` : '';
      const node = await store.createNode(
        { name, macAddresses: macs, properties, secrets: deps.secrets.sealAll(secrets) },
        {
          kind: 'created',
          message: `enrolled with MACs ${macs.join(', ')}${secretNote}`,
          actor: operator,
          fromState: null,
          toState: 'enroll',
        },
      );
      deps.logger.info({ node: node.uuid, nodeName: name, macs, secretKeys: Object.keys(secrets) }, 'node created');
      return { node: nodeToProto(node) };
    },

    async getNode(request) {
      return { node: nodeToProto(await requireNode(request.node)) };
    },

    async listNodes(request) {
      const limit = pageSize(request.pageSize);
      const nodes = await store.listNodes({
        provisionState: stateFromProto(request.provisionState, 'provision_state'),
        maintenance: request.maintenance,
        afterName: decodePageToken<string>(request.pageToken, 'string'),
        limit: limit + 1,
      });
      const page = nodes.slice(0, limit);
      const last = page.at(-1);
      return {
        nodes: page.map((n) => nodeToProto(n, false)),
        nextPageToken: nodes.length > limit && last ? encodePageToken(last.name) : '',
      };
    },

    async deleteNode(request) {
      const node = await requireNode(request.node);
      if (!DELETABLE.includes(node.provisionState)) {
        throw new MetalcastError(
          Status.FAILED_PRECONDITION,
          `node '${node.name}' is ${node.provisionState.replaceAll('_', ' ')}; delete is allowed only in ${DELETABLE.join(', ')} (undeploy or abort first)`,
        );
      }
      await withLock(node, 'delete', () => store.deleteNode(node.uuid));
      feed.publish({ node, deleted: true });
      deps.logger.info({ node: node.uuid, nodeName: node.name }, 'node deleted');
      return {};
    },

    async addNodePort(request) {
      validateNodeRef(request.node);
      const mac = normaliseMac(request.macAddress);
      const node = await requireNode(request.node);
      const updated = await withLock(node, 'add port', async () => {
        // Counted under the lock, so that two adds at once cannot both pass.
        const ports = (await store.getNode(node.uuid))?.macAddresses.length ?? 0;
        if (ports >= MAX_NODE_PORTS) {
          throw invalidArgument(`mac_address: node '${node.name}' already has ${ports} ports, the most a node may have`);
        }
        return store.addPort(node.uuid, mac, {
          kind: 'port',
          message: `port ${mac} added`,
          actor: operator,
          fromState: null,
          toState: null,
        });
      });
      return { node: nodeToProto(published(updated) as NodeRecord) };
    },

    async removeNodePort(request) {
      validateNodeRef(request.node);
      const mac = normaliseMac(request.macAddress);
      const node = await requireNode(request.node);
      const updated = await withLock(node, 'remove port', () =>
        store.removePort(node.uuid, mac, { kind: 'port', message: `port ${mac} removed`, actor: operator, fromState: null, toState: null }),
      );
      return { node: nodeToProto(published(updated) as NodeRecord) };
    },

    async updateNode(request) {
      validateNodeRef(request.node);
      const setProperties = validateProperties(request.setProperties, 'set_properties');
      const unsetProperties = validateUnset(request.unsetProperties, 'unset_properties', setProperties, 'set_properties');
      const setSecrets = validateSecrets(request.setSecrets, 'set_secrets');
      const unsetSecrets = validateUnset(request.unsetSecrets, 'unset_secrets', setSecrets, 'set_secrets');
      const node = await requireNode(request.node);
      const properties = applySettings(node.properties, setProperties, unsetProperties);
      const secretKeys = Object.keys(applySettings(node.secrets, setSecrets, unsetSecrets));
      if (Object.keys(properties).length > 64)
        throw invalidArgument(`set_properties: node '${node.name}' would have more than 64 properties`);
      if (secretKeys.length > MAX_NODE_SECRETS)
        throw invalidArgument(`set_secrets: node '${node.name}' would have more than ${MAX_NODE_SECRETS} secrets`);
      checkPowerSettings(node.name, properties, secretKeys);
      // Names only: property values are in the node, secret values nowhere but sealed in the store.
      const parts = [
        Object.keys(setProperties).length ? `set ${Object.keys(setProperties).sort().join(', ')}` : '',
        unsetProperties.length ? `unset ${[...unsetProperties].sort().join(', ')}` : '',
        Object.keys(setSecrets).length ? `set secret ${Object.keys(setSecrets).sort().join(', ')}` : '',
        unsetSecrets.length ? `unset secret ${[...unsetSecrets].sort().join(', ')}` : '',
      ].filter((part) => part !== '');
      if (parts.length === 0) return { node: nodeToProto(node) };
      // No lock: this is one atomic write, and a driver is made from the node as it is when it is needed.
      const updated = await store.updateNodeSettings(
        node.uuid,
        { setProperties, unsetProperties, setSecrets: deps.secrets.sealAll(setSecrets), unsetSecrets },
        { kind: 'settings', message: parts.join('; '), actor: operator, fromState: null, toState: null },
      );
      if (!updated) throw notFound(`node '${request.node}' was deleted meanwhile`);
      published(updated);
      deps.logger.info({ node: node.uuid, nodeName: node.name, change: parts.join('; ') }, 'node settings changed');
      return { node: nodeToProto(updated) };
    },

    async setMaintenance(request) {
      validateNodeRef(request.node);
      const reason = validateMaintenanceReason(request.reason, request.enabled);
      const node = await requireNode(request.node);
      // Maintenance on must work while a long step holds the lock: it is how an operator says "stop touching this".
      const change = () =>
        store.setMaintenance(node.uuid, request.enabled, reason, {
          kind: 'maintenance',
          message: request.enabled ? `maintenance on: ${reason}` : `maintenance off${reason ? `: ${reason}` : ''}`,
          actor: operator,
          fromState: null,
          toState: null,
        });
      const updated = published(request.enabled ? await change() : await withLock(node, 'maintenance', change));
      if (!updated) throw notFound(`node '${request.node}' was deleted meanwhile`);
      deps.logger.info({ node: node.uuid, nodeName: node.name, maintenance: request.enabled, reason }, 'maintenance changed');
      return { node: nodeToProto(updated) };
    },

    async setProvisionState(request) {
      validateNodeRef(request.node);
      const action = actionFromProto(request.action);
      const abortPower = abortPowerFromProto(request.abortPower);
      const deploy = action === 'deploy' ? validateDeploySpec(request.deploy) : undefined;
      // Hostname, SSH keys, user data, network data: checked here, built into a config drive (controller/configdrive/).
      const instance = action === 'deploy' && request.deploy ? checkInstanceConfig(request.deploy) : undefined;
      const node = await requireNode(request.node);
      const drive = instance ? await buildConfigDrive(instance, node.name) : undefined;
      return {
        node: nodeToProto(
          await provisioner.runAction(node, action, operator, deploy, instance && drive ? { instance, drive } : undefined, abortPower),
        ),
      };
    },

    async listNodeEvents(request) {
      validateNodeRef(request.node);
      const limit = pageSize(request.pageSize);
      const after = decodePageToken<number>(request.pageToken, 'number') ?? 0;
      const node = await requireNode(request.node);
      const events = await store.listEvents(node.uuid, after, limit + 1);
      const page = events.slice(0, limit);
      const last = page.at(-1);
      return {
        events: page.map(eventToProto),
        nextPageToken: events.length > limit && last ? encodePageToken(last.id) : '',
      };
    },

    async *watchNodes(request, context) {
      const wanted = new Set<string>();
      for (const ref of validateWatchedNodes(request.nodes)) {
        const node = await requireNode(ref);
        wanted.add(node.uuid);
      }
      // Subscribe before the snapshot, so that nothing between the two is lost.
      const changes = feed.subscribe(context.signal)[Symbol.asyncIterator]();
      const buffered: NodeChange[] = [];
      let overflow = false;
      let wake: (() => void) | undefined;
      const pump = (async () => {
        for (let next = await changes.next(); !next.done; next = await changes.next()) {
          if (wanted.size > 0 && !wanted.has(next.value.node.uuid)) continue;
          if (buffered.length >= WATCH_BUFFER) overflow = true;
          else buffered.push(next.value);
          wake?.();
        }
      })().catch(() => {});
      const initial =
        wanted.size > 0 ? await Promise.all([...wanted].map((uuid) => store.getNode(uuid))) : await store.listNodes({ limit: 10_000 });
      for (const node of initial) if (node) yield { node: nodeToProto(node, false), event: undefined, deleted: false };
      while (!context.signal.aborted) {
        const change = buffered.shift();
        if (!change) {
          await new Promise<void>((resolve) => {
            wake = resolve;
            context.signal.addEventListener('abort', () => resolve(), { once: true });
          });
          wake = undefined;
          continue;
        }
        if (overflow)
          throw new MetalcastError(Status.RESOURCE_EXHAUSTED, `the watcher fell more than ${WATCH_BUFFER} changes behind; watch again`);
        const node = nodeToProto(change.node, false);
        if (change.progress) node.progress = change.progress;
        yield { node, event: change.event ? eventToProto(change.event) : undefined, deleted: change.deleted ?? false };
      }
      await pump;
    },
  };
}

/** What an abort does with the machine: power off unless KEEP was asked. */
function abortPowerFromProto(value: AbortPower): 'off' | 'keep' {
  if (value === AbortPower.ABORT_POWER_KEEP) return 'keep';
  if (value === AbortPower.ABORT_POWER_UNSPECIFIED || value === AbortPower.ABORT_POWER_OFF) return 'off';
  throw new MetalcastError(Status.INVALID_ARGUMENT, `abort_power: ${value} is not one of ABORT_POWER_OFF, ABORT_POWER_KEEP`);
}
