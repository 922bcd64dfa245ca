import { Inventory } from '../../gen/metalcast/v1/inventory.js';
import { CommandProgress } from '../../gen/metalcast/v1/command.js';
import {
  DeploySpec,
  type Node,
  type NodeEvent,
  ProvisionAction as ProtoAction,
  ProvisionState as ProtoState,
} from '../../gen/metalcast/v1/node.js';
import { MetalcastError } from '../../common/errors.js';
import { Status } from 'nice-grpc-common';
import { isAgentState, PROVISION_ACTIONS, PROVISION_STATES, type ProvisionAction, type ProvisionState } from '../provisioning/states.js';
import type { NodeEventRecord, NodeRecord } from '../store/store.js';

/*
 * Conversions between proto messages and the controller's own types, kept
 * at the edge so that generated types do not leak into the core.
 */

export function stateToProto(state: ProvisionState | null): ProtoState {
  if (state === null) return ProtoState.PROVISION_STATE_UNSPECIFIED;
  return ProtoState[`PROVISION_STATE_${state.toUpperCase()}` as keyof typeof ProtoState] as ProtoState;
}

/** undefined for UNSPECIFIED; INVALID_ARGUMENT for values outside the enum. */
export function stateFromProto(value: ProtoState, field: string): ProvisionState | undefined {
  if (value === ProtoState.PROVISION_STATE_UNSPECIFIED) return undefined;
  const name = ProtoState[value];
  const state = typeof name === 'string' ? name.replace('PROVISION_STATE_', '').toLowerCase() : undefined;
  if (!state || !(PROVISION_STATES as readonly string[]).includes(state)) {
    throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}: ${value} is not a provision state`);
  }
  return state as ProvisionState;
}

export function actionFromProto(value: ProtoAction): ProvisionAction {
  const name = ProtoAction[value];
  const action = typeof name === 'string' ? name.replace('PROVISION_ACTION_', '').toLowerCase() : undefined;
  if (!action || !(PROVISION_ACTIONS as readonly string[]).includes(action)) {
    throw new MetalcastError(Status.INVALID_ARGUMENT, `action: must be one of ${PROVISION_ACTIONS.join(', ')}`);
  }
  return action as ProvisionAction;
}

/** The proto Node; `withInventory` false leaves the (large) inventory out, as lists do. */
export function nodeToProto(node: NodeRecord, withInventory = true): Node {
  return {
    uuid: node.uuid,
    name: node.name,
    provisionState: stateToProto(node.provisionState),
    targetProvisionState: stateToProto(node.targetProvisionState),
    maintenance: node.maintenance,
    maintenanceReason: node.maintenanceReason,
    lastError: node.lastError,
    macAddresses: node.macAddresses,
    properties: node.properties,
    agentAddress: node.agentAddress,
    agentVersion: node.agentVersion,
    lastHeartbeatAt: node.lastHeartbeatAt === null ? undefined : new Date(node.lastHeartbeatAt),
    reservation: node.reservation ?? '',
    reservationOperation: node.reservationOperation ?? '',
    inventory: withInventory && node.inventoryJson ? Inventory.fromJSON(JSON.parse(node.inventoryJson)) : undefined,
    deploy: node.deployJson ? deployToProto(node.deployJson, withInventory) : undefined,
    // Only a node in a step with an agent has progress; a row written before progress was cleared at
    // every state change may still hold an old one.
    progress: node.progressJson && isAgentState(node.provisionState) ? CommandProgress.fromJSON(JSON.parse(node.progressJson)) : undefined,
    createdAt: new Date(node.createdAt),
    updatedAt: new Date(node.updatedAt),
    provisionUpdatedAt: new Date(node.provisionUpdatedAt),
    secretKeys: Object.keys(node.secrets).sort(),
  };
}

/** The stored deploy (never with user data); lists leave the network data out, as they leave out inventories. */
function deployToProto(json: string, withDetails: boolean): DeploySpec {
  const spec = DeploySpec.fromJSON(JSON.parse(json));
  spec.userData = Buffer.alloc(0);
  if (!withDetails) spec.networkData = '';
  return spec;
}

export function eventToProto(event: NodeEventRecord): NodeEvent {
  return {
    id: event.id,
    time: new Date(event.time),
    kind: event.kind,
    message: event.message,
    actor: event.actor,
    fromState: stateToProto(event.fromState),
    toState: stateToProto(event.toState),
  };
}
