import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { type Channel, ClientError, createChannel, createClient, Metadata, Status } from 'nice-grpc';
import { HealthDefinition } from 'nice-grpc-server-health';
import { ServerReflectionService } from 'nice-grpc-server-reflection';
import { createLogger } from '../../common/logging.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import {
  ADMIN_TOKEN_FILE,
  clusterCredential,
  hashOperatorToken,
  OPERATOR_METHOD_ROLES,
  OperatorAuth,
} from '../../controller/auth/operator-auth.js';
import type { Store } from '../../controller/store/store.js';
import { AgentGatewayServiceDefinition } from '../../gen/metalcast/v1/agent_gateway.js';
import { ImageServiceDefinition } from '../../gen/metalcast/v1/image.js';
import { NodeServiceDefinition, PowerAction, ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { createTestOperatorToken, eventually, operatorCallOptions, tempDir } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';
import { ServerReflectionV1AlphaService } from '../../controller/services/health-reflection.js';

// google-protobuf CommonJS: its classes are not visible to an ESM named import.
const REFLECTION_PB = 'nice-grpc-server-reflection/lib/proto/grpc/reflection/v1/reflection_pb.js';
const { ServerReflectionRequest } = createRequire(import.meta.url)(
  REFLECTION_PB,
) as typeof import('nice-grpc-server-reflection/lib/proto/grpc/reflection/v1/reflection_pb.js');

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));
const run = promisify(execFile);

/** What every refusal for a missing or wrong credential tells the caller to do. */
const HINT = /metalcast token create --role reader.*|--token or METALCAST_TOKEN/;

/** Methods a reader may call; every other NodeService and ImageService method needs admin. */
const READER_METHODS = new Set([
  '/metalcast.v1.NodeService/GetNode',
  '/metalcast.v1.NodeService/ListNodes',
  '/metalcast.v1.NodeService/ListNodeEvents',
  '/metalcast.v1.NodeService/WatchNodes',
  '/metalcast.v1.NodeService/GetNodePower',
  '/metalcast.v1.ImageService/GetImage',
  '/metalcast.v1.ImageService/ListImages',
  '/metalcast.v1.ImageService/DownloadImage',
]);

const operatorPaths = () =>
  [NodeServiceDefinition, ImageServiceDefinition].flatMap((definition) =>
    Object.values(definition.methods).map((method) => `/${definition.fullName}/${method.name}`),
  );

type Clients = {
  nodes: ReturnType<typeof createClient<typeof NodeServiceDefinition>>;
  images: ReturnType<typeof createClient<typeof ImageServiceDefinition>>;
};

async function drain(stream: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of stream) {
    // Only the status matters.
  }
}

/**
 * One call per operator method, with a request that cannot change anything
 * (unknown names, invalid input): past authentication it ends in OK,
 * NOT_FOUND or INVALID_ARGUMENT, never in an auth refusal.
 */
const CALLS: Record<string, (c: Clients) => Promise<unknown>> = {
  '/metalcast.v1.NodeService/CreateNode': (c) => c.nodes.createNode({ name: '', macAddresses: [] }),
  '/metalcast.v1.NodeService/GetNode': (c) => c.nodes.getNode({ node: 'no-such-node' }),
  '/metalcast.v1.NodeService/ListNodes': (c) => c.nodes.listNodes({}),
  '/metalcast.v1.NodeService/DeleteNode': (c) => c.nodes.deleteNode({ node: 'no-such-node' }),
  '/metalcast.v1.NodeService/AddNodePort': (c) => c.nodes.addNodePort({ node: 'no-such-node', macAddress: '52:54:00:00:00:01' }),
  '/metalcast.v1.NodeService/RemoveNodePort': (c) => c.nodes.removeNodePort({ node: 'no-such-node', macAddress: '52:54:00:00:00:01' }),
  '/metalcast.v1.NodeService/UpdateNode': (c) =>
    c.nodes.updateNode({ node: 'no-such-node', setProperties: {}, unsetProperties: [], setSecrets: {}, unsetSecrets: [] }),
  '/metalcast.v1.NodeService/SetMaintenance': (c) => c.nodes.setMaintenance({ node: 'no-such-node', enabled: true, reason: 'x' }),
  '/metalcast.v1.NodeService/SetProvisionState': (c) =>
    c.nodes.setProvisionState({ node: 'no-such-node', action: ProvisionAction.PROVISION_ACTION_MANAGE }),
  '/metalcast.v1.NodeService/SetNodePower': (c) => c.nodes.setNodePower({ node: 'no-such-node', action: PowerAction.POWER_ACTION_ON }),
  '/metalcast.v1.NodeService/GetNodePower': (c) => c.nodes.getNodePower({ node: 'no-such-node' }),
  '/metalcast.v1.NodeService/ValidateNode': (c) => c.nodes.validateNode({ node: 'no-such-node' }),
  '/metalcast.v1.NodeService/ListNodeEvents': (c) => c.nodes.listNodeEvents({ node: 'no-such-node' }),
  '/metalcast.v1.NodeService/WatchNodes': (c) => drain(c.nodes.watchNodes({ nodes: ['no-such-node'] })),
  '/metalcast.v1.ImageService/UploadImage': (c) =>
    c.images.uploadImage(
      (async function* () {
        yield { part: { $case: 'header' as const, value: { name: '', sha256: '', sizeBytes: 0 } } };
      })(),
    ),
  '/metalcast.v1.ImageService/ImportImage': (c) => c.images.importImage({ name: '', url: '', checksum: '' }),
  '/metalcast.v1.ImageService/GetImage': (c) => c.images.getImage({ name: 'no-such-image' }),
  '/metalcast.v1.ImageService/ListImages': (c) => c.images.listImages({}),
  '/metalcast.v1.ImageService/DeleteImage': (c) => c.images.deleteImage({ name: 'no-such-image' }),
  '/metalcast.v1.ImageService/DownloadImage': (c) => drain(c.images.downloadImage({ name: 'no-such-image' })),
};

/** The status a call ended with. */
async function outcome(call: Promise<unknown>): Promise<Status> {
  try {
    await call;
    return Status.OK;
  } catch (error) {
    if (error instanceof ClientError) return error.code;
    throw error;
  }
}

/** A controller in this process whose log lines (debug and up) are kept for inspection. */
async function startLogged(
  dataDir: string,
  flags: Record<string, string> = {},
): Promise<{ controller: RunningController; lines: string[] }> {
  const lines: string[] = [];
  const logger = createLogger({ name: 'auth-test', level: 'debug', destination: { write: (line: string) => void lines.push(line) } });
  const config = loadControllerConfig(
    // Plaintext: TLS is not what these tests are about (test/controller/tls.test.ts is).
    // No limit on failures: these tests fail on purpose, many times (test/controller/rate-limit.test.ts tests the limit).
    {
      listen: '127.0.0.1:0',
      metricsListen: '127.0.0.1:0',
      dataDir,
      controllerId: 'auth-test',
      insecure: 'true',
      operatorAuthFailureLimit: '0',
      ...flags,
    },
    {},
  );
  return { controller: await startController(config, logger), lines };
}

describe('operator authentication', () => {
  const dir = tempDir('metalcast-auth-');
  // Named like the default --data-dir, so that the CLI run from its parent finds admin.token by itself.
  const dataDir = join(dir.path, 'metalcast-data');
  let controller: RunningController;
  let lines: string[];
  let channel: Channel;
  let store: Store;
  let bootstrapToken: string;
  let readerToken: string;
  const clientsWith = (token: string): Clients => ({
    nodes: createClient(NodeServiceDefinition, channel, operatorCallOptions(token)),
    images: createClient(ImageServiceDefinition, channel, operatorCallOptions(token)),
  });
  const rawClients = (authorization: string): Clients => {
    const options = { '*': { metadata: Metadata({ authorization }) } };
    return { nodes: createClient(NodeServiceDefinition, channel, options), images: createClient(ImageServiceDefinition, channel, options) };
  };
  const wrongToken = `mco_${'A'.repeat(43)}`;

  before(async () => {
    ({ controller, lines } = await startLogged(dataDir));
    store = controller.store;
    channel = createChannel(controller.grpcAddress);
    bootstrapToken = readFileSync(join(dataDir, ADMIN_TOKEN_FILE), 'utf8').trim();
    readerToken = await createTestOperatorToken(store, 'reader');
  });
  after(async () => {
    channel?.close();
    await controller?.stop();
    dir.remove();
  });

  it('has a role for every NodeService and ImageService method (admin unless it only reads), and a call for each in this test', () => {
    for (const path of operatorPaths()) {
      assert.equal(OPERATOR_METHOD_ROLES.get(path), READER_METHODS.has(path) ? 'reader' : 'admin', path);
      assert.ok(CALLS[path], `${path} has no call in CALLS`);
    }
    assert.equal(OPERATOR_METHOD_ROLES.get(ServerReflectionService.serverReflectionInfo.path), 'reader');
    assert.deepEqual(
      [...OPERATOR_METHOD_ROLES.keys()].filter((path) => !operatorPaths().includes(path)),
      [ServerReflectionService.serverReflectionInfo.path, ServerReflectionV1AlphaService.serverReflectionInfo.path],
      'no stale entries',
    );
  });

  it('the first start wrote one admin token to <data-dir>/admin.token, readable only by its owner, and logged the path, not the token', async () => {
    assert.match(bootstrapToken, /^mco_[A-Za-z0-9_-]{43}$/);
    assert.equal(statSync(join(dataDir, ADMIN_TOKEN_FILE)).mode & 0o777, 0o600);
    const [first] = await store.listOperatorTokens();
    assert.equal(first?.role, 'admin');
    assert.equal(first?.tokenHash, hashOperatorToken(bootstrapToken));
    const logged = lines.map((line) => JSON.parse(line) as Record<string, unknown>).find((l) => l.path === join(dataDir, ADMIN_TOKEN_FILE));
    assert.ok(logged, 'the path is logged');
    assert.equal(logged.tokenId, first?.id);
  });

  for (const path of operatorPaths()) {
    const needsAdmin = !READER_METHODS.has(path);
    it(`${path}: no token or a wrong one UNAUTHENTICATED; reader ${needsAdmin ? 'PERMISSION_DENIED' : 'allowed'}; admin allowed`, async () => {
      const call = CALLS[path] as (c: Clients) => Promise<unknown>;
      await assertRejectsWith(
        call(clientsWith('')),
        Status.UNAUTHENTICATED,
        /needs an operator token.*metalcast token create --role reader/,
      );
      await assertRejectsWith(call(clientsWith(wrongToken)), Status.UNAUTHENTICATED, /not valid.*--token or METALCAST_TOKEN/);
      const asReader = call(clientsWith(readerToken));
      if (needsAdmin) {
        await assertRejectsWith(
          asReader,
          Status.PERMISSION_DENIED,
          new RegExp(`${path}.*needs the admin role; token tok_[0-9a-f]{8} has the reader role`),
        );
      } else {
        assert.ok([Status.OK, Status.NOT_FOUND].includes(await outcome(asReader)), 'a reader gets past authentication');
      }
      const asAdmin = await outcome(call(clientsWith(bootstrapToken)));
      assert.ok([Status.OK, Status.NOT_FOUND, Status.INVALID_ARGUMENT].includes(asAdmin), `admin got ${Status[asAdmin]}`);
    });
  }

  it('refuses malformed authorization metadata as UNAUTHENTICATED', async () => {
    for (const authorization of [
      `Basic ${readerToken}`,
      readerToken,
      'Bearer',
      `Bearer ${readerToken}x`,
      `Bearer ${readerToken.slice(0, -1)}`,
    ]) {
      await assertRejectsWith(rawClients(authorization).nodes.listNodes({}), Status.UNAUTHENTICATED, HINT);
    }
  });

  it('accepts the cluster credential as a reader, and refuses a wrong one', async () => {
    const secret = await store.ensureClusterSecret('not used: the controller made the secret at start');
    const cluster = clientsWith(clusterCredential(secret));
    assert.equal(await outcome(cluster.images.listImages({})), Status.OK);
    await assertRejectsWith(
      cluster.images.deleteImage({ name: 'x' }),
      Status.PERMISSION_DENIED,
      /the cluster credential has the reader role/,
    );
    await assertRejectsWith(clientsWith(clusterCredential(`${secret}x`)).images.listImages({}), Status.UNAUTHENTICATED, HINT);
  });

  it('leaves health and the agent gateway to their own rules, and wants a reader for reflection', async () => {
    const health = createClient(HealthDefinition, channel);
    assert.equal((await health.check({ service: '' })).status, 1 /* SERVING */);
    const gateway = createClient(AgentGatewayServiceDefinition, channel);
    await assertRejectsWith(gateway.lookup({ macAddresses: ['52:54:00:ff:ff:ff'], agentVersion: 'test' }), Status.NOT_FOUND);

    const listServices = async (token: string) => {
      const reflection = createClient(ServerReflectionService, channel, operatorCallOptions(token));
      const replies = reflection.serverReflectionInfo(
        (async function* () {
          yield new ServerReflectionRequest().setListServices('');
        })(),
      );
      const names: string[] = [];
      for await (const reply of replies)
        names.push(
          ...reply
            .getListServicesResponse()!
            .getServiceList()
            .map((s) => s.getName()),
        );
      return names;
    };
    await assertRejectsWith(listServices(''), Status.UNAUTHENTICATED, HINT);
    assert.ok((await listServices(readerToken)).includes('metalcast.v1.NodeService'));
  });

  it('stops accepting a deleted token within the cache time (5 s)', async () => {
    const token = await createTestOperatorToken(store, 'admin', 'to be deleted');
    const nodes = clientsWith(token).nodes;
    await nodes.listNodes({});
    const record = await store.findOperatorTokenByHash(hashOperatorToken(token));
    assert.ok(record);
    assert.ok(await store.deleteOperatorToken(record.id));
    const deletedAt = Date.now();
    await eventually(async () => (await outcome(nodes.listNodes({}))) === Status.UNAUTHENTICATED, {
      timeoutMs: 8000,
      intervalMs: 100,
      what: 'the deleted token to be refused',
    });
    assert.ok(Date.now() - deletedAt < 5000 + 1000, `refused after ${Date.now() - deletedAt} ms`);
  });

  it('records when a token was last used', async () => {
    const token = await createTestOperatorToken(store, 'reader', 'touched');
    await clientsWith(token).nodes.listNodes({});
    await eventually(async () => (await store.findOperatorTokenByHash(hashOperatorToken(token)))?.lastUsedAt, { what: 'last_used_at' });
  });

  it('logs refusals with the peer and the token id, and never a token or the cluster secret', async () => {
    await assertRejectsWith(clientsWith(readerToken).nodes.deleteNode({ node: 'x' }), Status.PERMISSION_DENIED);
    await assertRejectsWith(clientsWith(wrongToken).nodes.listNodes({}), Status.UNAUTHENTICATED);
    const parsed = lines.map((line) => JSON.parse(line) as Record<string, unknown>);
    const denied = parsed.find(
      (l) => l.msg === 'operator call refused: the caller lacks the role' && l.method === '/metalcast.v1.NodeService/DeleteNode',
    );
    assert.match(String(denied?.caller), /^tok_[0-9a-f]{8}$/);
    assert.match(String(denied?.peer), /127\.0\.0\.1/);
    assert.ok(parsed.some((l) => l.msg === 'operator call refused: the operator token is not valid' && typeof l.peer === 'string'));

    const secret = await store.ensureClusterSecret('unused');
    const all = lines.join('\n');
    for (const secretText of [bootstrapToken, readerToken, wrongToken, secret, hashOperatorToken(readerToken)]) {
      assert.ok(!all.includes(secretText), 'a token, its hash or the cluster secret reached the log');
    }
  });

  describe('the metalcast CLI', () => {
    /** The environment without METALCAST_* variables, so that the caller's settings do not leak in. */
    const cleanEnv = (more: Record<string, string> = {}) => ({
      ...Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('METALCAST_'))),
      METALCAST_CONTROLLER: controller.grpcAddress,
      METALCAST_INSECURE: 'true',
      ...more,
    });
    const cli = (args: string[], options: { cwd?: string; env?: Record<string, string> } = {}) =>
      run(process.execPath, [BIN, ...args], { cwd: options.cwd ?? dir.path, env: cleanEnv(options.env) }).then(
        ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
        (error: { code: number; stdout: string; stderr: string }) => ({ code: error.code, stdout: error.stdout, stderr: error.stderr }),
      );

    it('token create prints the token once; list shows it without secrets; the token works for its role; delete ends it', async () => {
      const created = await cli(['token', 'create', '--role', 'reader', '--description', 'ci dashboards', '--data-dir', dataDir]);
      assert.equal(created.code, 0, created.stderr);
      const token = created.stdout.trim();
      assert.match(token, /^mco_[A-Za-z0-9_-]{43}$/);
      assert.match(created.stderr, /created reader token tok_[0-9a-f]{8}/);
      assert.match(created.stderr, /will not be shown again/);

      const listed = await cli(['token', 'list', '--data-dir', dataDir]);
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(listed.stdout, /tok_[0-9a-f]{8} +│? *reader *│? *ci dashboards/);
      assert.match(listed.stdout, /never/);
      assert.ok(!listed.stdout.includes(token) && !listed.stdout.includes(hashOperatorToken(token)), 'no token or hash in the list');
      const json = JSON.parse((await cli(['token', 'list', '--json'], { env: { METALCAST_DATA_DIR: dataDir } })).stdout) as {
        id: string;
        role: string;
        description: string;
      }[];
      const mine = json.find((t) => t.description === 'ci dashboards');
      assert.equal(mine?.role, 'reader');
      assert.deepEqual(Object.keys(mine ?? {}).sort(), ['createdAt', 'description', 'id', 'lastUsedAt', 'role']);

      const read = await cli(['node', 'list', '--token', token]);
      assert.equal(read.code, 0, read.stderr);
      const write = await cli(['node', 'create', 'cli-node', '--mac', '52:54:00:00:10:01'], { env: { METALCAST_TOKEN: token } });
      assert.equal(write.code, 4);
      assert.match(write.stderr, /PERMISSION_DENIED: \/metalcast\.v1\.NodeService\/CreateNode changes state and needs the admin role/);

      const deleted = await cli(['token', 'delete', mine?.id as string, '--data-dir', dataDir]);
      assert.equal(deleted.code, 0, deleted.stderr);
      assert.match(deleted.stdout, /deleted token tok_/);
      const again = await cli(['token', 'delete', mine?.id as string, '--data-dir', dataDir]);
      assert.equal(again.code, 3);
      assert.match(again.stderr, /no operator token has the id/);
      assert.ok(!(await store.listOperatorTokens()).some((t) => t.id === mine?.id));
    });

    it('refuses a bad role, and deletes a token given as itself', async () => {
      const bad = await cli(['token', 'create', '--role', 'root', '--data-dir', dataDir]);
      assert.notEqual(bad.code, 0);
      assert.match(bad.stderr, /Allowed choices are admin, reader/);
      const token = (await cli(['token', 'create', '--role', 'admin', '--data-dir', dataDir])).stdout.trim();
      const deleted = await cli(['token', 'delete', token, '--data-dir', dataDir]);
      assert.equal(deleted.code, 0, deleted.stderr);
      assert.equal(await store.findOperatorTokenByHash(hashOperatorToken(token)), undefined);
    });

    it('uses ./metalcast-data/admin.token when no token is given, and says how to get one when there is none', async () => {
      const created = await cli(['node', 'create', 'bootstrap-node', '--mac', '52:54:00:00:10:02']);
      assert.equal(created.code, 0, created.stderr);
      const elsewhere = join(dir.path, 'elsewhere');
      mkdirSync(elsewhere, { recursive: true });
      const refused = await cli(['node', 'list'], { cwd: elsewhere });
      assert.equal(refused.code, 4);
      assert.match(
        refused.stderr,
        /UNAUTHENTICATED: .*needs an operator token.*--token or METALCAST_TOKEN.*metalcast token create --role reader/,
      );
    });
  });
});

describe('operator authentication at start', () => {
  it('keeps an admin.token file it finds when no token exists, and makes none on a restart', async () => {
    const dir = tempDir('metalcast-auth-start-');
    try {
      writeFileSync(join(dir.path, ADMIN_TOKEN_FILE), 'left over\n', { mode: 0o600 });
      const first = await startLogged(dir.path);
      await first.controller.stop();
      assert.equal(readFileSync(join(dir.path, ADMIN_TOKEN_FILE), 'utf8'), 'left over\n', 'not overwritten');
      assert.ok(first.lines.some((line) => line.includes('the admin token file is there already')));

      // A token made meanwhile (metalcast token create): later starts make no other.
      const second = await startLogged(dir.path);
      await createTestOperatorToken(second.controller.store, 'admin');
      await second.controller.stop();
      const third = await startLogged(dir.path);
      try {
        assert.equal((await third.controller.store.listOperatorTokens()).length, 1);
      } finally {
        await third.controller.stop();
      }
    } finally {
      dir.remove();
    }
  });

  it('with --operator-auth none, serves operators without a token, warns, and makes no token', async () => {
    const dir = tempDir('metalcast-auth-none-');
    const { controller, lines } = await startLogged(dir.path, { operatorAuth: 'none' });
    const channel = createChannel(controller.grpcAddress);
    try {
      await createClient(NodeServiceDefinition, channel).createNode({ name: 'open-node', macAddresses: ['52:54:00:00:20:01'] });
      assert.ok(lines.some((line) => line.includes('operator authentication is off (--operator-auth none)')));
      assert.deepEqual(await controller.store.listOperatorTokens(), []);
    } finally {
      channel.close();
      await controller.stop();
      dir.remove();
    }
  });
});

describe('OperatorAuth cache', () => {
  it('remembers at most cacheSize tokens, and asks the store again after the cache time', async () => {
    let lookups = 0;
    let now = 1_000_000;
    const fakeStore = {
      async findOperatorTokenByHash() {
        lookups++;
        return undefined;
      },
    } as unknown as Store;
    const logger = createLogger({ name: 'cache-test', level: 'silent' });
    const auth = new OperatorAuth({ store: fakeStore, logger, clusterSecret: 's', cacheTtlMs: 5000, cacheSize: 2, now: () => now });
    const context = (token: string) => ({ metadata: Metadata({ authorization: `Bearer ${token}` }), peer: 'test' }) as never;
    const token = (c: string) => `mco_${c.repeat(43)}`;
    const attempt = (t: string) => auth.authenticate(context(t), 'm').catch(() => undefined);
    await attempt(token('a'));
    await attempt(token('a'));
    assert.equal(lookups, 1, 'the refusal is remembered');
    await attempt(token('b'));
    await attempt(token('c')); // forgets a
    await attempt(token('a'));
    assert.equal(lookups, 4);
    now += 5000;
    await attempt(token('a'));
    assert.equal(lookups, 5, 'asked again after the cache time');
    await attempt('not-a-token');
    assert.equal(lookups, 5, 'no database lookup for something that is not shaped like a token');
  });
});
