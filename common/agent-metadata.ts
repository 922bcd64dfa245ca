import { Metadata } from 'nice-grpc-common';

/** Metadata key carrying the node uuid on agent calls. */
export const NODE_UUID_KEY = 'metalcast-node-uuid';

/** Metadata an agent sends with every call after lookup. */
export function agentMetadata(nodeUuid: string, token: string): Metadata {
  return Metadata(agentMetadataFields(nodeUuid, token));
}

/** The same as plain fields, for a worker thread (agent/imaging/lanes) to build its own. */
export function agentMetadataFields(nodeUuid: string, token: string): Record<string, string> {
  return { [NODE_UUID_KEY]: nodeUuid, authorization: `Bearer ${token}` };
}

/** Reads the bearer token from call metadata; '' when absent or malformed. */
export function bearerToken(metadata: Metadata): string {
  const value = metadata.get('authorization') ?? '';
  const match = /^Bearer (\S+)$/.exec(value);
  return match?.[1] ?? '';
}
