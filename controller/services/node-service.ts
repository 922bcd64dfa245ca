import { Status } from 'nice-grpc-common';
import { invalidArgument, MetalcastError, notFound, unimplemented } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { normaliseMac, normaliseMacList } from '../../common/mac.js';
import type { NodeServiceImplementation } from '../../gen/metalcast/v1/node.js';
import { actionFromProto, eventToProto, nodeToProto, stateFromProto } from '../convert.js';
import type { Provisioner } from '../provisioning/provisioner.js';
import type { ProvisionState } from '../provisioning/states.js';
import type { NodeRecord, Store } from '../store/store.js';
import { decodePageToken, encodePageToken, pageSize, validateNodeName, validateNodeRef, validateProperties } from '../validation.js';

/** States a node may be deleted from: nothing is running on it or for it. */
const DELETABLE: readonly ProvisionState[] = ['enroll', 'manageable', 'available', 'inspect_failed', 'clean_failed', 'deploy_failed'];

export interface NodeServiceDeps {
  store: Store;
  provisioner: Provisioner;
  logger: Logger;
}

/** The operator API for nodes. */
export function createNodeService(deps: NodeServiceDeps): NodeServiceImplementation {
  const { store, provisioner } = deps;
  const operator = 'operator';

  async function requireNode(ref: string): Promise<NodeRecord> {
    const node = await store.getNode(validateNodeRef(ref));
    if (!node) throw notFound(`node '${ref}' not found; metalcast node list shows the enrolled nodes`);
    return node;
  }

  function refuseIfLocked(node: NodeRecord, what: string): void {
    if (node.reservation) {
      throw new MetalcastError(
        Status.FAILED_PRECONDITION,
        `node is locked by ${node.reservation} for ${node.reservationOperation ?? 'an operation'}; cannot ${what} now, retry when it finishes`,
      );
    }
  }

  return {
    async createNode(request) {
      const name = validateNodeName(request.name);
      const macs = normaliseMacList(request.macAddresses);
      const properties = validateProperties(request.properties);
      const node = await store.createNode(
        { name, macAddresses: macs, properties },
        { kind: 'created', message: `enrolled with MACs ${macs.join(', ')}`, actor: operator, fromState: null, toState: 'enroll' },
      );
      deps.logger.info({ node: node.uuid, nodeName: name, macs }, 'node created');
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
      refuseIfLocked(node, 'delete it');
      await store.deleteNode(node.uuid);
      deps.logger.info({ node: node.uuid, nodeName: node.name }, 'node deleted');
      return {};
    },

    async addNodePort(request) {
      const node = await requireNode(request.node);
      const mac = normaliseMac(request.macAddress);
      const updated = await store.addPort(node.uuid, mac, {
        kind: 'port',
        message: `port ${mac} added`,
        actor: operator,
        fromState: null,
        toState: null,
      });
      return { node: nodeToProto(updated) };
    },

    async removeNodePort(request) {
      const node = await requireNode(request.node);
      const mac = normaliseMac(request.macAddress);
      const updated = await store.removePort(node.uuid, mac, {
        kind: 'port',
        message: `port ${mac} removed`,
        actor: operator,
        fromState: null,
        toState: null,
      });
      return { node: nodeToProto(updated) };
    },

    async setMaintenance(request) {
      const node = await requireNode(request.node);
      const reason = request.reason.trim();
      if (request.enabled && reason === '') throw invalidArgument('reason: required when turning maintenance on, so that others know why');
      if (reason.length > 255) throw invalidArgument('reason: at most 255 characters');
      const updated = await store.setMaintenance(node.uuid, request.enabled, reason, {
        kind: 'maintenance',
        message: request.enabled ? `maintenance on: ${reason}` : `maintenance off${reason ? `: ${reason}` : ''}`,
        actor: operator,
        fromState: null,
        toState: null,
      });
      if (!updated) throw notFound(`node '${request.node}' was deleted meanwhile`);
      deps.logger.info({ node: node.uuid, nodeName: node.name, maintenance: request.enabled, reason }, 'maintenance changed');
      return { node: nodeToProto(updated) };
    },

    async setProvisionState(request) {
      const node = await requireNode(request.node);
      const action = actionFromProto(request.action);
      refuseIfLocked(node, action);
      return { node: nodeToProto(await provisioner.runAction(node, action, operator)) };
    },

    async listNodeEvents(request) {
      const node = await requireNode(request.node);
      const limit = pageSize(request.pageSize);
      const events = await store.listEvents(node.uuid, decodePageToken<number>(request.pageToken, 'number') ?? 0, limit + 1);
      const page = events.slice(0, limit);
      const last = page.at(-1);
      return {
        events: page.map(eventToProto),
        nextPageToken: events.length > limit && last ? encodePageToken(last.id) : '',
      };
    },

    // biome-ignore lint/correctness/useYield: answers before streaming anything.
    async *watchNodes() {
      throw unimplemented('WatchNodes is not implemented in this controller version yet (provisioning)');
    },
  };
}
