import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { checkCount, checkDiskHints, checkEnum, checkLength, checkName, checkText, NAME_PATTERN, NAME_RULE } from '../../common/input.js';
import { truncate } from '../../common/mac.js';
import { AgentStatus, type HeartbeatRequest, type LookupRequest } from '../../gen/metalcast/v1/agent_gateway.js';
import { CommandState } from '../../gen/metalcast/v1/command.js';
import type { DeploySpec } from '../../gen/metalcast/v1/node.js';

/*
 * Checks of operator and agent requests, each answering INVALID_ARGUMENT
 * with a message that names the field and says what to fix. Every string
 * and list a request carries is bounded here or in the rule it passes
 * (common/input.ts, common/mac.ts).
 */

const invalid = (message: string) => new MetalcastError(Status.INVALID_ARGUMENT, message);

/** Longest page token this controller issues, with room to spare (a base64url JSON node name or event id). */
const MAX_PAGE_TOKEN_LENGTH = 256;
/** Most nodes one WatchNodes call may name. */
export const MAX_WATCHED_NODES = 1000;
/** Most MAC addresses (ports) one node may have, as CreateNode and Lookup allow. */
export const MAX_NODE_PORTS = 64;

export function validateNodeName(name: string): string {
  if (!NAME_PATTERN.test(name)) {
    throw invalid(`name: '${truncate(name)}' is not a valid node name (${NAME_RULE})`);
  }
  return name;
}

/** A node reference: uuid or name (a uuid passes the name rule). */
export function validateNodeRef(ref: string, field = 'node'): string {
  if (ref === '') throw invalid(`${field}: a node uuid or name is required`);
  if (!NAME_PATTERN.test(ref)) throw invalid(`${field}: '${truncate(ref)}' is neither a node uuid nor a node name`);
  return ref;
}

const SETTING_NAME = /^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$/;
const SETTING_NAME_RULE = "1 to 64 letters, digits, '.', '_', '/' or '-'";
/** Most secrets one node may have. */
export const MAX_NODE_SECRETS = 16;

export function validateProperties(properties: Record<string, string>, field = 'properties'): Record<string, string> {
  const entries = Object.entries(properties);
  if (entries.length > 64) throw invalid(`${field}: at most 64 entries, got ${entries.length}`);
  for (const [key, value] of entries) {
    if (!SETTING_NAME.test(key)) throw invalid(`${field}: key '${truncate(key)}' must be ${SETTING_NAME_RULE}`);
    if (value.length > 1024) throw invalid(`${field}.${key}: value longer than 1024 characters`);
    checkText(value, `${field}.${key}`, 1024);
  }
  return properties;
}

/**
 * Secrets (BMC passwords): names as property keys, values of 1 to 1024
 * characters without control characters. No message ever quotes a value.
 */
export function validateSecrets(secrets: Record<string, string>, field = 'secrets'): Record<string, string> {
  const entries = Object.entries(secrets);
  if (entries.length > MAX_NODE_SECRETS) throw invalid(`${field}: at most ${MAX_NODE_SECRETS} entries, got ${entries.length}`);
  for (const [key, value] of entries) {
    if (!SETTING_NAME.test(key)) throw invalid(`${field}: key '${truncate(key)}' must be ${SETTING_NAME_RULE}`);
    if (value === '') throw invalid(`${field}.${key}: empty; to remove a secret, unset it`);
    checkText(value, `${field}.${key}`, 1024);
  }
  return secrets;
}

/** Names to unset: at most 64, each a valid name, none also being set in the same request. */
export function validateUnset(names: readonly string[], field: string, set: Record<string, string>, setField: string): readonly string[] {
  checkCount(names, field, 64, 'names');
  for (const name of names) {
    if (!SETTING_NAME.test(name)) throw invalid(`${field}: '${truncate(name)}' must be ${SETTING_NAME_RULE}`);
    if (name in set) throw invalid(`${field}: '${name}' is also in ${setField}; set it or unset it, not both`);
  }
  return names;
}

/** A maintenance reason, trimmed: required when turning maintenance on, one line of at most 255 characters. */
export function validateMaintenanceReason(raw: string, enabling: boolean): string {
  const reason = raw.trim();
  if (enabling && reason === '') throw invalid('reason: required when turning maintenance on, so that others know why');
  if (reason.length > 255) throw invalid('reason: at most 255 characters');
  return checkText(reason, 'reason', 255);
}

/** Page size: 0 means the default; larger than the maximum is an error, not silently clipped. */
export function pageSize(value: number, defaultSize = 100, max = 1000): number {
  if (value === 0) return defaultSize;
  if (value > max) throw invalid(`page_size: at most ${max}, got ${value}`);
  return value;
}

/** Page tokens are opaque to clients: base64url of the last key of the previous page. */
export function encodePageToken(key: string | number): string {
  return Buffer.from(JSON.stringify(key)).toString('base64url');
}

/** The key a page token carries: a node name ('string') or an event id ('number'); INVALID_ARGUMENT for anything else. */
export function decodePageToken<T extends string | number>(token: string, kind: 'string' | 'number'): T | undefined {
  if (token === '') return undefined;
  if (token.length <= MAX_PAGE_TOKEN_LENGTH) {
    try {
      const value: unknown = JSON.parse(Buffer.from(token, 'base64url').toString());
      if (kind === 'string' && typeof value === 'string' && NAME_PATTERN.test(value)) return value as T;
      if (kind === 'number' && typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return value as T;
    } catch {
      // fall through to the error below
    }
  }
  throw invalid('page_token: not a token this controller issued; pass next_page_token from the previous page');
}

/** WatchNodes' node list: at most MAX_WATCHED_NODES references. */
export function validateWatchedNodes(refs: readonly string[]): readonly string[] {
  checkCount(refs, 'nodes', MAX_WATCHED_NODES, 'nodes');
  for (const ref of refs) validateNodeRef(ref, 'nodes');
  return refs;
}

/** What DEPLOY needs: an image name, and disk hints whose strings are bounded. */
export function validateDeploySpec(spec: DeploySpec | undefined): {
  image: string;
  target: DeploySpec['target'];
  fanoutDisabled?: boolean;
} {
  if (!spec || spec.image === '') throw invalid('deploy.image: an image name is required to deploy');
  checkName(spec.image, 'deploy.image', 'image');
  checkDiskHints(spec.target, 'deploy.target');
  return { image: spec.image, target: spec.target, ...(spec.fanoutDisabled ? { fanoutDisabled: true } : {}) };
}

/**
 * A lookup's fields other than the MACs (normaliseMacList checks those). The
 * DMI strings are only bounded: firmware fills them with whatever it likes,
 * and refusing a lookup would strand the agent.
 */
export function validateLookup(request: LookupRequest): void {
  checkLength(request.systemSerial, 'system_serial', 256);
  checkLength(request.systemUuid, 'system_uuid', 256);
  if (request.agentVersion.length > 128) throw invalid('agent_version: at most 128 characters');
  checkText(request.agentVersion, 'agent_version', 128);
}

const AGENT_ADDRESS = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$/;

/**
 * One heartbeat: the address the controller will dial, the version shown to
 * operators, the status, and the command progress it stores.
 */
export function validateHeartbeat(hb: HeartbeatRequest): void {
  if (hb.agentAddress !== '') {
    const match = hb.agentAddress.length <= 260 ? AGENT_ADDRESS.exec(hb.agentAddress) : null;
    const port = Number(match?.[2]);
    if (!match || port < 1 || port > 65535) {
      throw invalid(`agent_address: '${truncate(hb.agentAddress)}' is not of the form host:port`);
    }
  }
  if (hb.agentVersion.length > 128) throw invalid('agent_version: at most 128 characters');
  checkText(hb.agentVersion, 'agent_version', 128);
  checkEnum(hb.status, AgentStatus, 'status');
  const command = hb.command;
  if (!command) return;
  checkLength(command.id, 'command.id', 128);
  checkText(command.name, 'command.name', 64);
  checkLength(command.requestId, 'command.request_id', 128);
  checkEnum(command.state, CommandState, 'command.state');
  const progress = command.progress;
  if (!progress) return;
  checkText(progress.phase, 'command.progress.phase', 128);
  if (!Number.isFinite(progress.rateBytesPerSecond) || progress.rateBytesPerSecond < 0) {
    throw invalid(`command.progress.rate_bytes_per_second: ${progress.rateBytesPerSecond} is not a rate`);
  }
}
