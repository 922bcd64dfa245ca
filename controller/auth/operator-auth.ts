import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { CallContext, ServerMiddleware, ServerMiddlewareCall } from 'nice-grpc';
import { Metadata } from 'nice-grpc-common';
import { ServerReflectionService } from 'nice-grpc-server-reflection';
import { ServerReflectionV1AlphaService } from '../services/health-reflection.js';
import { bearerToken } from '../../common/agent-metadata.js';
import { permissionDenied, unauthenticated, unavailable } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { ImageServiceDefinition } from '../../gen/metalcast/v1/image.js';
import { NodeServiceDefinition } from '../../gen/metalcast/v1/node.js';
import { chargeFailure, clientKey, isUnauthenticated, type PeerLimit } from './rate-limit.js';
import type { EpochMs, OperatorRole, OperatorTokenRecord, Store } from '../store/store.js';

/** Operator tokens start with this, so that one pasted in the wrong place is recognisable (and greppable by secret scanners). */
export const OPERATOR_TOKEN_PREFIX = 'mco_';
/** The credential controllers present to each other: this prefix and the cluster secret. */
export const CLUSTER_CREDENTIAL_PREFIX = 'mcc_';
/** The file in the data directory that the first start writes the first admin token to. */
export const ADMIN_TOKEN_FILE = 'admin.token';

/** What a caller is told when it has no valid credential. */
const HOW_TO_GET_A_TOKEN =
  "pass an operator token with --token or METALCAST_TOKEN (metadata 'authorization: Bearer <token>'); " +
  "an administrator makes one with 'metalcast token create --role reader' (or --role admin) where the controller's database is reachable";

const nodeMethod = (method: keyof typeof NodeServiceDefinition.methods) =>
  `/${NodeServiceDefinition.fullName}/${NodeServiceDefinition.methods[method].name}`;
const imageMethod = (method: keyof typeof ImageServiceDefinition.methods) =>
  `/${ImageServiceDefinition.fullName}/${ImageServiceDefinition.methods[method].name}`;

/** The role each NodeService method needs; a Record, so that a method added to the proto does not compile until it is here. */
const NODE_ROLES: Record<keyof typeof NodeServiceDefinition.methods, OperatorRole> = {
  createNode: 'admin',
  getNode: 'reader',
  listNodes: 'reader',
  deleteNode: 'admin',
  addNodePort: 'admin',
  removeNodePort: 'admin',
  updateNode: 'admin',
  setMaintenance: 'admin',
  setProvisionState: 'admin',
  setNodePower: 'admin',
  getNodePower: 'reader',
  // Admin: it logs in to the BMC, and failed logins can lock a BMC account.
  validateNode: 'admin',
  listNodeEvents: 'reader',
  watchNodes: 'reader',
};

const IMAGE_ROLES: Record<keyof typeof ImageServiceDefinition.methods, OperatorRole> = {
  uploadImage: 'admin',
  importImage: 'admin',
  getImage: 'reader',
  listImages: 'reader',
  deleteImage: 'admin',
  downloadImage: 'reader',
};

/**
 * The role every operator method needs, by gRPC path: readers read, admins
 * also change state. Methods the middleware sees that are not here need
 * admin (fail closed); test/controller/operator-auth.test.ts checks that
 * every NodeService and ImageService method is here.
 */
export const OPERATOR_METHOD_ROLES: ReadonlyMap<string, OperatorRole> = new Map<string, OperatorRole>([
  ...Object.entries(NODE_ROLES).map(([method, role]) => [nodeMethod(method as keyof typeof NODE_ROLES), role] as const),
  ...Object.entries(IMAGE_ROLES).map(([method, role]) => [imageMethod(method as keyof typeof IMAGE_ROLES), role] as const),
  [ServerReflectionService.serverReflectionInfo.path, 'reader'],
  [ServerReflectionV1AlphaService.serverReflectionInfo.path, 'reader'],
]);

/** Who made an operator call, as far as logs and refusals need to know; never the token. */
export interface OperatorIdentity {
  /** How the caller proved itself. */
  kind: 'token' | 'cluster' | 'certificate';
  /** Safe to log: the token id (tok_…), 'cluster', or the certificate's subject. */
  name: string;
  role: OperatorRole;
}

export function hashOperatorToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

/** A fresh operator token (256 random bits, base64url, with the mco_ prefix) and the record that stores its hash. */
export function newOperatorToken(
  role: OperatorRole,
  description: string,
  now: EpochMs = Date.now(),
): { token: string; record: OperatorTokenRecord } {
  const token = `${OPERATOR_TOKEN_PREFIX}${randomBytes(32).toString('base64url')}`;
  return {
    token,
    record: {
      id: `tok_${randomBytes(4).toString('hex')}`,
      tokenHash: hashOperatorToken(token),
      role,
      description,
      createdAt: now,
      lastUsedAt: null,
    },
  };
}

/** Call metadata that presents an operator token (or the cluster credential). */
export function operatorMetadata(token: string): Metadata {
  return Metadata({ authorization: `Bearer ${token}` });
}

/** The cluster secret shared by every controller on the store's database, made by whichever asks first. */
export function loadClusterSecret(store: Store): Promise<string> {
  return store.ensureClusterSecret(randomBytes(32).toString('base64url'));
}

/** What a controller presents to another when it calls its operator API (as a reader). */
export function clusterCredential(secret: string): string {
  return `${CLUSTER_CREDENTIAL_PREFIX}${secret}`;
}

const satisfies = (have: OperatorRole, need: OperatorRole) => have === 'admin' || need === 'reader';

export interface OperatorAuthOptions {
  store: Store;
  logger: Logger;
  /** The cluster secret (loadClusterSecret): `Bearer mcc_<secret>` is accepted as a reader, for image copies between controllers. */
  clusterSecret: string;
  /**
   * How long a verified (or refused) token is trusted without asking the
   * database again; a deleted token keeps working on each controller for at
   * most this long. Default 5 s.
   */
  cacheTtlMs?: number;
  /** Most tokens remembered; the oldest is forgotten first. Default 1000. */
  cacheSize?: number;
  /** last_used_at is written at most this often per token. Default 60 s. */
  touchIntervalMs?: number;
  /**
   * The role a verified client certificate gives the call, if any: the seam
   * for operator mTLS (controller/auth/operator-tls.ts). A bearer token, when one
   * is presented, is checked instead.
   */
  certificateRole?: (context: CallContext) => { role: OperatorRole; subject: string } | undefined;
  now?: () => number;
  /**
   * Failed authentications per client (IPv4 address, IPv6 /64): past it,
   * further failures are answered RESOURCE_EXHAUSTED with retry-after-ms.
   * Default: no limit.
   */
  failures?: PeerLimit;
}

interface CacheEntry {
  identity: OperatorIdentity | undefined;
  expiresAt: number;
}

/**
 * Authenticates operator calls (NodeService, ImageService, reflection) by
 * bearer token and enforces the role each method needs: a missing or wrong
 * token is UNAUTHENTICATED, a reader changing state PERMISSION_DENIED.
 * Tokens are looked up by their sha256 and compared in constant time;
 * verified ones (and refused ones) are remembered for a few seconds, so
 * that the hot path does not read the database on every call.
 */
export class OperatorAuth {
  private readonly cache = new Map<string, CacheEntry>();
  private readonly cacheTtlMs: number;
  private readonly cacheSize: number;
  private readonly touchIntervalMs: number;
  private readonly now: () => number;
  private readonly clusterHash: Buffer;

  constructor(private readonly options: OperatorAuthOptions) {
    this.cacheTtlMs = options.cacheTtlMs ?? 5000;
    this.cacheSize = options.cacheSize ?? 1000;
    this.touchIntervalMs = options.touchIntervalMs ?? 60_000;
    this.now = options.now ?? Date.now;
    this.clusterHash = createHash('sha256').update(clusterCredential(options.clusterSecret)).digest();
  }

  /** The server middleware; attach it with `server.with(auth.middleware).add(...)` to the operator services only. */
  readonly middleware: ServerMiddleware = (call, context) => this.guard(call, context);

  private async *guard<Request, Response>(call: ServerMiddlewareCall<Request, Response>, context: CallContext) {
    const method = call.method.path;
    const need = OPERATOR_METHOD_ROLES.get(method) ?? 'admin';
    let identity: OperatorIdentity;
    try {
      identity = await this.authenticate(context, method);
    } catch (error) {
      const { failures } = this.options;
      // Failures only: a valid token is never refused because another client at the same address guessed wrong.
      if (failures && isUnauthenticated(error)) {
        chargeFailure([[failures, clientKey(context.peer)]], context, error);
      }
      throw error;
    }
    if (!satisfies(identity.role, need)) {
      this.options.logger.warn(
        { peer: context.peer, method, caller: identity.name, role: identity.role, need },
        'operator call refused: the caller lacks the role',
      );
      throw permissionDenied(
        `${method} changes state and needs the ${need} role; ${callerName(identity)} has the ${identity.role} role (an administrator can make an admin token with 'metalcast token create --role admin')`,
      );
    }
    return yield* call.next(call.request, context);
  }

  /** Who the caller is; throws UNAUTHENTICATED (missing or wrong credential) or UNAVAILABLE (database down). */
  async authenticate(context: CallContext, method: string): Promise<OperatorIdentity> {
    const { logger } = this.options;
    const presented = bearerToken(context.metadata);
    if (presented === '') {
      const certificate = this.options.certificateRole?.(context);
      if (certificate) return { kind: 'certificate', name: certificate.subject, role: certificate.role };
      logger.warn({ peer: context.peer, method }, 'operator call refused: no operator token');
      throw unauthenticated(`${method} needs an operator token; ${HOW_TO_GET_A_TOKEN}`);
    }
    const identity = await this.verify(presented);
    if (!identity) {
      logger.warn({ peer: context.peer, method }, 'operator call refused: the operator token is not valid');
      throw unauthenticated(`the operator token is not valid (unknown, mistyped or deleted); ${HOW_TO_GET_A_TOKEN}`);
    }
    return identity;
  }

  private async verify(presented: string): Promise<OperatorIdentity | undefined> {
    const digest = createHash('sha256').update(presented).digest();
    if (presented.startsWith(CLUSTER_CREDENTIAL_PREFIX)) {
      return timingSafeEqual(digest, this.clusterHash) ? { kind: 'cluster', name: 'cluster', role: 'reader' } : undefined;
    }
    // Not the shape of a token: no need to ask the database.
    if (!/^mco_[A-Za-z0-9_-]{43}$/.test(presented)) return undefined;
    const hash = digest.toString('hex');
    const now = this.now();
    const cached = this.cache.get(hash);
    if (cached && cached.expiresAt > now) return cached.identity;

    let record: OperatorTokenRecord | undefined;
    try {
      record = await this.options.store.findOperatorTokenByHash(hash);
    } catch (error) {
      this.options.logger.warn({ err: error }, 'cannot check an operator token: the database did not answer');
      throw unavailable('cannot check the operator token now: the controller cannot reach its database; try again');
    }
    const identity =
      record && timingSafeEqual(Buffer.from(record.tokenHash, 'hex'), digest)
        ? ({ kind: 'token', name: record.id, role: record.role } as const)
        : undefined;
    this.remember(hash, identity, now);
    if (record && identity && (record.lastUsedAt === null || now - record.lastUsedAt >= this.touchIntervalMs)) {
      this.options.store.touchOperatorToken(record.id, now).catch((error: unknown) => {
        this.options.logger.debug({ err: error, tokenId: record.id }, 'could not record when an operator token was last used');
      });
    }
    return identity;
  }

  private remember(hash: string, identity: OperatorIdentity | undefined, now: number): void {
    this.cache.delete(hash);
    while (this.cache.size >= this.cacheSize) {
      const oldest = this.cache.keys().next();
      if (oldest.done) break;
      this.cache.delete(oldest.value);
    }
    this.cache.set(hash, { identity, expiresAt: now + this.cacheTtlMs });
  }
}

function callerName(identity: OperatorIdentity): string {
  switch (identity.kind) {
    case 'token':
      return `token ${identity.name}`;
    case 'cluster':
      return 'the cluster credential';
    case 'certificate':
      return `client certificate ${identity.name}`;
  }
}

/**
 * First start: when no operator token exists, makes one admin token and
 * writes it to `<dataDir>/admin.token` (mode 0600), so that the CLI run
 * beside the data directory works at once. A file already there is never
 * overwritten (its token is then not valid: the operator makes one with
 * `metalcast token create`); with several controllers on one empty
 * database, one of them makes the token. Logs the path, never the token.
 */
export async function bootstrapAdminToken(store: Store, dataDir: string, logger: Logger): Promise<void> {
  if ((await store.listOperatorTokens()).length > 0) return;
  const path = join(dataDir, ADMIN_TOKEN_FILE);
  const { token, record } = newOperatorToken('admin', 'first admin token, made at the first start', Date.now());
  try {
    await mkdir(dataDir, { recursive: true });
    await writeFile(path, `${token}\n`, { flag: 'wx', mode: 0o600 });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') {
      logger.warn(
        { path },
        "no operator token exists, and the admin token file is there already (not overwritten, and not valid): make a token with 'metalcast token create --role admin'",
      );
    } else {
      logger.warn(
        { err: error, path },
        "no operator token exists, and the first admin token could not be written: make one with 'metalcast token create --role admin'",
      );
    }
    return;
  }
  let created = false;
  try {
    created = await store.createFirstOperatorToken(record);
  } finally {
    // Another controller on the same database was first: its token is the one.
    if (!created) await rm(path, { force: true });
  }
  if (created) {
    logger.info(
      { path, tokenId: record.id },
      "no operator token existed: made an admin token and wrote it to this file (mode 0600); the CLI finds it when run beside the data directory, or pass it with --token or METALCAST_TOKEN; make more with 'metalcast token create'",
    );
  }
}

/**
 * The controller's operator authentication as --operator-auth says: for
 * 'token', makes the first admin token if there is none and returns the
 * authenticator; for 'none', warns and returns undefined (no checks).
 */
export async function setUpOperatorAuth(
  store: Store,
  settings: { mode: 'token' | 'none'; dataDir: string; listen: string },
  logger: Logger,
  certificateRole?: OperatorAuthOptions['certificateRole'],
  failures?: PeerLimit,
): Promise<OperatorAuth | undefined> {
  if (settings.mode === 'none') {
    logger.warn(
      { listen: settings.listen },
      'operator authentication is off (--operator-auth none): anyone who can reach the gRPC API can change nodes and wipe disks',
    );
    return undefined;
  }
  await bootstrapAdminToken(store, settings.dataDir, logger);
  return new OperatorAuth({ store, logger, clusterSecret: await loadClusterSecret(store), certificateRole, failures });
}
