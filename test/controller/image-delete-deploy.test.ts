import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { MetalcastError } from '../../common/errors.js';
import { PostgresStore } from '../../controller/store/postgres.js';
import { SqliteStore } from '../../controller/store/sqlite.js';
import type { NodeRecord, Store } from '../../controller/store/store.js';
import { tempDir } from '../helpers/controller.js';
import { postgresSchema, postgresSkipReason } from '../helpers/postgres.js';
import { holdNextCommit, settledOrWaitingForLock } from '../helpers/postgres-hold.js';

const skipPostgres = await postgresSkipReason();
const SHA = 'ab'.repeat(32);
let serial = 0;

async function readyImage(store: Store, name: string): Promise<void> {
  await store.createImage({ name, state: 'importing', sha256: '', sizeBytes: 0, sourceUrl: '', expectedChecksum: '', error: '' });
  await store.updateImage(name, { state: 'ready', sha256: SHA, sizeBytes: 4096 });
}

async function availableNode(store: Store, name: string): Promise<NodeRecord> {
  serial++;
  const mac = `02:00:00:00:${(serial >> 8).toString(16).padStart(2, '0')}:${(serial & 255).toString(16).padStart(2, '0')}`;
  return store.createNode(
    { name, macAddresses: [mac], properties: {} },
    { kind: 'created', message: 'created', actor: 'test', fromState: null, toState: null },
  );
}

/** The store write that starts a deploy of `image` (Provisioner's move to deploying). */
function startDeploy(store: Store, node: NodeRecord, image: string) {
  return store.transition(node.uuid, {
    from: [node.provisionState],
    to: 'deploying',
    target: 'active',
    keepAgentToken: false,
    deployJson: JSON.stringify({ image, target: '', imageFormat: 'IMAGE_FORMAT_RAW', imageSha256: SHA, imageSourceSha256: SHA }),
    event: { kind: 'provision', message: `deploy of ${image}`, actor: 'test', fromState: node.provisionState, toState: 'deploying' },
  });
}

const outcome = (promise: Promise<unknown>) =>
  promise.then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );

function assertRefused(result: { ok: boolean; error?: unknown }, message: RegExp): void {
  assert.equal(result.ok, false, 'refused');
  const error = result.error as MetalcastError;
  assert.ok(error instanceof MetalcastError, String(error));
  assert.equal(error.status, Status.FAILED_PRECONDITION);
  assert.match(error.message, message);
}

describe('deleteImage and the start of a deploy are exclusive', () => {
  describe('on SQLite', () => {
    const dir = tempDir('metalcast-image-deploy-');
    let store: SqliteStore;
    before(async () => {
      store = await SqliteStore.open(`${dir.path}/metalcast.db`);
    });
    after(async () => {
      await store.close();
      dir.remove();
    });

    it('a deploy checked before the image was deleted does not start on it', async () => {
      await readyImage(store, 'gone');
      const node = await availableNode(store, 'sqlite-deploy-1');
      assert.equal((await store.getImage('gone'))?.state, 'ready', 'the provisioner checked the image: ready');
      assert.equal((await store.deleteImage('gone')).deleted, true);
      assertRefused(await outcome(startDeploy(store, node, 'gone')), /^image 'gone' was deleted while the deploy started/);
      assert.equal((await store.getNode(node.uuid))?.provisionState, 'enroll', 'the node did not move');
    });

    it('an image that a deploy started on is not deleted', async () => {
      await readyImage(store, 'kept');
      const node = await availableNode(store, 'sqlite-deploy-2');
      assert.ok(await startDeploy(store, node, 'kept'));
      assertRefused(await outcome(store.deleteImage('kept')), /^image 'kept' is being deployed to node 'sqlite-deploy-2'/);
    });

    it('a deploy whose image was replaced (same name, other content) since it was checked does not start', async () => {
      await readyImage(store, 'swapped');
      const node = await availableNode(store, 'sqlite-deploy-3');
      await store.updateImage('swapped', { sha256: 'cd'.repeat(32) });
      assertRefused(await outcome(startDeploy(store, node, 'swapped')), /^image 'swapped' was replaced while the deploy started/);
    });
  });

  describe('on PostgreSQL, two controllers racing', { skip: skipPostgres }, () => {
    let schema: Awaited<ReturnType<typeof postgresSchema>>;
    let one: PostgresStore;
    let two: PostgresStore;
    before(async () => {
      schema = await postgresSchema();
      one = await PostgresStore.open(schema.url);
      two = await PostgresStore.open(schema.url);
    });
    after(async () => {
      await Promise.all([one?.close(), two?.close()]);
      await schema?.drop();
    });

    it('delete first (its commit held), deploy meanwhile: the deploy is refused', async () => {
      await readyImage(one, 'pg-gone');
      const node = await availableNode(one, 'pg-deploy-1');
      const held = holdNextCommit(one);
      const deleting = outcome(one.deleteImage('pg-gone'));
      await held.atCommit;
      const deploying = outcome(startDeploy(two, node, 'pg-gone'));
      await settledOrWaitingForLock(schema.url, deploying, 'FROM images');
      held.release();
      const [deleted, deployed] = await Promise.all([deleting, deploying]);
      assert.ok(deleted.ok, 'the delete went through');
      assertRefused(deployed, /^image 'pg-gone' was deleted while the deploy started/);
      assert.equal((await two.getNode(node.uuid))?.provisionState, 'enroll', 'the node did not start a deploy of a deleted image');
    });

    it('deploy first (its commit held), delete meanwhile: the delete is refused', async () => {
      await readyImage(one, 'pg-kept');
      const node = await availableNode(one, 'pg-deploy-2');
      const held = holdNextCommit(one);
      const deploying = outcome(startDeploy(one, node, 'pg-kept'));
      await held.atCommit;
      const deleting = outcome(two.deleteImage('pg-kept'));
      await settledOrWaitingForLock(schema.url, deleting, 'FROM images');
      held.release();
      const [deployed, deleted] = await Promise.all([deploying, deleting]);
      assert.ok(deployed.ok, 'the deploy started');
      assertRefused(deleted, /^image 'pg-kept' is being deployed to node 'pg-deploy-2'/);
      assert.equal((await two.getImage('pg-kept'))?.state, 'ready', 'the image is still there');
    });
  });
});
