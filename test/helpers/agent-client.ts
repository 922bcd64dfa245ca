import type { createClient } from 'nice-grpc';
import { agentMetadata } from '../../common/agent-metadata.js';
import {
  type AgentGatewayServiceDefinition,
  AgentStatus,
  type HeartbeatRequest,
  type HeartbeatResponse,
  type LookupResponse,
} from '../../gen/metalcast/v1/agent_gateway.js';
import { type NodeServiceDefinition, type Node, ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { AsyncQueue } from '../../common/async-queue.js';

export type GatewayClient = ReturnType<typeof createClient<typeof AgentGatewayServiceDefinition>>;
export type NodeClient = ReturnType<typeof createClient<typeof NodeServiceDefinition>>;

/**
 * A heartbeat stream driven by a test, the way an agent drives it: the test
 * decides when each heartbeat goes out, and everything the controller sends
 * back is collected as it arrives, so that the end of the call is noticed
 * even while the test is not reading.
 */
export interface HeartbeatStream {
  /** Sends one heartbeat (sequence numbered from 1); returns its sequence. */
  send(fields?: Partial<HeartbeatRequest>): number;
  /** Sends one heartbeat and waits for its acknowledgement. */
  beat(fields?: Partial<HeartbeatRequest>, timeoutMs?: number): Promise<HeartbeatResponse>;
  /** Acknowledgements not yet taken. */
  readonly responses: AsyncQueue<HeartbeatResponse>;
  /** Settles when the call ends: undefined when it ended OK, else the error (a ClientError or an AbortError). Never rejects. */
  readonly ended: Promise<unknown>;
  /** True once the call has ended. */
  readonly isEnded: boolean;
  /** Half-closes: tells the controller this agent is done, as an agent that exits cleanly does. */
  end(): void;
  /** Cancels the call, as an agent that is killed does. */
  cancel(): void;
}

export const AGENT_VERSION = 'test-agent/1.0';

/** Opens a heartbeat stream for `nodeUuid` with `token` (either may be '' to leave the metadata out). */
export function openHeartbeat(gateway: GatewayClient, nodeUuid: string, token: string): HeartbeatStream {
  const requests = new AsyncQueue<HeartbeatRequest>();
  const responses = new AsyncQueue<HeartbeatResponse>();
  const abort = new AbortController();
  const metadata = agentMetadata(nodeUuid, token);
  if (nodeUuid === '') metadata.delete('metalcast-node-uuid');
  if (token === '') metadata.delete('authorization');
  let sequence = 0;
  let isEnded = false;
  const ended = (async () => {
    try {
      for await (const response of gateway.heartbeat(requests, { metadata, signal: abort.signal })) responses.push(response);
      return undefined;
    } catch (error) {
      return error;
    } finally {
      isEnded = true;
      requests.end();
      responses.end();
    }
  })();

  const stream: HeartbeatStream = {
    send(fields = {}) {
      sequence++;
      requests.push({
        sequence,
        // No agent API to call back: with an address, the controller would start inspecting through it.
        agentAddress: '',
        agentVersion: AGENT_VERSION,
        status: AgentStatus.AGENT_STATUS_IDLE,
        command: undefined,
        agentCertificatePem: '',
        ...fields,
      });
      return fields.sequence ?? sequence;
    },
    async beat(fields = {}, timeoutMs = 5000) {
      const sent = stream.send(fields);
      const response = await responses.take(timeoutMs, `acknowledgement of heartbeat ${sent}`);
      if (response.sequence !== sent) throw new Error(`heartbeat ${sent} was acknowledged as ${response.sequence}`);
      return response;
    },
    responses,
    ended,
    get isEnded() {
      return isEnded;
    },
    end: () => requests.end(),
    cancel: () => abort.abort(),
  };
  return stream;
}

/** Creates a node and starts inspection, which leaves it in inspect_wait: a node waiting for its agent. */
export async function createWaitingNode(nodes: NodeClient, name: string, macAddresses: string[]): Promise<Node> {
  const created = await nodes.createNode({ name, macAddresses });
  await nodes.setProvisionState({ node: created.node!.uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
  const { node } = await nodes.setProvisionState({ node: created.node!.uuid, action: ProvisionAction.PROVISION_ACTION_INSPECT });
  return node!;
}

/** Looks up as an agent with these MACs would. */
export function lookup(gateway: GatewayClient, macAddresses: string[]): Promise<LookupResponse> {
  return gateway.lookup({ macAddresses, systemSerial: '', systemUuid: '', agentVersion: AGENT_VERSION });
}
