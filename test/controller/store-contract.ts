import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { type ChunkManifest, isZeroChunk, ManifestBuilder } from '../../common/chunk-manifest.js';
import { MetalcastError } from '../../common/errors.js';
import { RING_SIZE, ringHash } from '../../controller/cluster/hash-ring.js';
import { PROVISION_STATES, type ProvisionState } from '../../controller/provisioning/states.js';
import type {
  HeartbeatRecord,
  NewNodeEvent,
  NodeEventRecord,
  NodeRecord,
  OperatorTokenRecord,
  Store,
  TimedOutNode,
} from '../../controller/store/store.js';
import { deferred } from '../helpers/deferred.js';

/** What a store implementation hands the contract suite. */
export interface OpenedStore {
  store: Store;
  /** Closes the store and removes whatever it created (files, schemas). */
  cleanup: () => Promise<void>;
}

const event = (kind: string, message = kind): NewNodeEvent => ({ kind, message, actor: 'test', fromState: null, toState: null });
const created = (): NewNodeEvent => ({ kind: 'created', message: 'enrolled', actor: 'test', fromState: null, toState: 'enroll' });

function heartbeat(nodeUuid: string, time: number, fields: Partial<HeartbeatRecord> = {}): HeartbeatRecord {
  return { nodeUuid, time, agentAddress: '10.0.0.5:7351', agentVersion: 'agent/1', agentStatus: 'idle', progressJson: null, ...fields };
}

/** `promise`, or a rejection naming `what` if it has not settled within 5 s (rather than the test hanging until its timeout). */
export async function within<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not happen within 5 s`)), 5000);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const byName = (a: { name: string }, b: { name: string }) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);

/** Asserts that `promise` rejects with a MetalcastError of `status` whose message matches `message`. */
async function rejectsWithStatus(promise: Promise<unknown>, status: Status, message: RegExp): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof MetalcastError, `expected a MetalcastError, got ${String(error)}`);
    assert.equal(Status[error.status], Status[status]);
    assert.match(error.message, message);
    return true;
  });
}

/**
 * The behaviour every Store must have, run against each implementation
 * (store-sqlite.test.ts now, PostgreSQL later). It talks to the store only
 * through the Store interface, and never assumes anything about time beyond
 * what the interface passes in: the sweep is driven with explicit clocks.
 */
export function runStoreContract(name: string, openStore: () => Promise<OpenedStore>): void {
  describe(`Store contract: ${name}`, () => {
    let opened: OpenedStore;
    let store: Store;

    beforeEach(async () => {
      opened = await openStore();
      store = opened.store;
    });
    afterEach(async () => {
      await opened.cleanup();
    });

    /** A node moved straight into `state` (the store does not enforce the state machine; the provisioner does). */
    async function nodeIn(
      state: ProvisionState,
      nodeName: string,
      macs: string[],
      target: ProvisionState | null = null,
    ): Promise<NodeRecord> {
      const node = await store.createNode({ name: nodeName, macAddresses: macs, properties: {} }, created());
      if (state === 'enroll') return node;
      const moved = await store.transition(node.uuid, {
        from: ['enroll'],
        to: state,
        target,
        keepAgentToken: true,
        event: { kind: 'transition', message: `enroll -> ${state}`, actor: 'test', fromState: 'enroll', toState: state },
      });
      assert.ok(moved, `could not move ${nodeName} to ${state}`);
      return moved;
    }

    describe('image formats and config drives', () => {
      it("records an image's format, source checksum and extents, and reads the extents apart", async () => {
        const reserved = await store.createImage({
          name: 'fmt',
          state: 'importing',
          sha256: '',
          sizeBytes: 0,
          sourceUrl: '',
          expectedChecksum: '',
          error: '',
        });
        assert.deepEqual(
          [reserved.format, reserved.sourceSha256, reserved.sourceSizeBytes, reserved.allocatedBytes, reserved.extentCount],
          ['raw', '', 0, null, 0],
        );
        assert.equal(await store.getImageExtents('fmt'), undefined);
        const extents: [number, number][] = [
          [0, 4096],
          [2 ** 33, 2 ** 20],
        ];
        const ready = await store.updateImage('fmt', {
          state: 'ready',
          sha256: 'a'.repeat(64),
          sizeBytes: 2 ** 34,
          format: 'qcow2',
          sourceSha256: 'b'.repeat(64),
          sourceSizeBytes: 123_456,
          extents,
        });
        assert.deepEqual(
          [ready?.format, ready?.sourceSha256, ready?.sourceSizeBytes, ready?.allocatedBytes, ready?.extentCount, ready?.sizeBytes],
          ['qcow2', 'b'.repeat(64), 123_456, 4096 + 2 ** 20, 2, 2 ** 34],
        );
        assert.deepEqual(await store.getImageExtents('fmt'), extents);
        assert.equal((await store.listImages()).find((i) => i.name === 'fmt')?.format, 'qcow2');
      });

      it("stores, replaces and deletes a node's config drive; deleting the node deletes it", async () => {
        const node = await nodeIn('available', 'cd', ['52:54:00:00:cd:01']);
        assert.equal(await store.getConfigDrive(node.uuid), undefined);
        const gzip = Buffer.from([0x1f, 0x8b, 0, 1, 2, 255]);
        await store.putConfigDrive({ nodeUuid: node.uuid, gzip, sha256: 'c'.repeat(64), sizeBytes: 4096, createdAt: 1000 });
        await store.putConfigDrive({
          nodeUuid: node.uuid,
          gzip: Buffer.from([9, 9]),
          sha256: 'd'.repeat(64),
          sizeBytes: 8192,
          createdAt: 2000,
        });
        assert.deepEqual(await store.getConfigDrive(node.uuid), {
          nodeUuid: node.uuid,
          gzip: Buffer.from([9, 9]),
          sha256: 'd'.repeat(64),
          sizeBytes: 8192,
          createdAt: 2000,
        });
        assert.equal(await store.deleteConfigDrive(node.uuid), true);
        assert.equal(await store.deleteConfigDrive(node.uuid), false);
        await store.putConfigDrive({ nodeUuid: node.uuid, gzip, sha256: 'c'.repeat(64), sizeBytes: 4096, createdAt: 1000 });
        await store.deleteNode(node.uuid);
        assert.equal(await store.getConfigDrive(node.uuid), undefined);
      });

      it('stores a chunk manifest per content, above 2^32 bytes, replaces it, and deletes it', async () => {
        const sha = 'e'.repeat(64);
        assert.equal(await store.getImageManifest(sha), undefined);
        // 5 GiB in 4 MiB chunks: sizes past 32 bits must round-trip exactly.
        const builder = new ManifestBuilder(4096);
        builder.update(Buffer.alloc(4096));
        builder.update(Buffer.from('not zero'));
        const { manifest: small } = builder.finish();
        const big = { ...small, chunkSize: 4 * 1024 * 1024, sizeBytes: 5 * 1024 ** 3 };
        await store.putImageManifest(sha, big);
        assert.deepEqual(await store.getImageManifest(sha), big);
        await store.putImageManifest(sha, small);
        const back = await store.getImageManifest(sha);
        assert.deepEqual(back, small);
        assert.equal(back?.digests.length, 64);
        assert.equal(isZeroChunk(back as ChunkManifest, 0), true);
        assert.equal(isZeroChunk(back as ChunkManifest, 1), false);
        assert.equal(await store.deleteImageManifest(sha), true);
        assert.equal(await store.deleteImageManifest(sha), false);
        assert.equal(await store.getImageManifest(sha), undefined);
      });
    });

    describe('nodes', () => {
      it('creates a node in enroll with its ports, properties and a created event', async () => {
        const before = Date.now();
        const node = await store.createNode(
          { name: 'node-a', macAddresses: ['aa:00:00:00:00:02', 'aa:00:00:00:00:01'], properties: { rack: 'r1' } },
          created(),
        );
        assert.match(node.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
        assert.equal(node.name, 'node-a');
        assert.equal(node.provisionState, 'enroll');
        assert.equal(node.targetProvisionState, null);
        assert.equal(node.maintenance, false);
        assert.equal(node.lastError, '');
        assert.deepEqual(node.macAddresses, ['aa:00:00:00:00:01', 'aa:00:00:00:00:02']);
        assert.deepEqual(node.properties, { rack: 'r1' });
        assert.equal(node.agentTokenHash, null);
        assert.equal(node.lastHeartbeatAt, null);
        assert.equal(node.livenessAt, null);
        assert.equal(node.reservation, null);
        assert.ok(node.createdAt >= before && node.createdAt <= Date.now());
        assert.equal(node.updatedAt, node.createdAt);
        const events = await store.listEvents(node.uuid, 0, 10);
        assert.equal(events.length, 1);
        assert.equal(events[0]?.kind, 'created');
        assert.equal(events[0]?.toState, 'enroll');
        assert.equal(events[0]?.nodeUuid, node.uuid);
      });

      it('gets a node by uuid and by name, and undefined for neither', async () => {
        const node = await store.createNode({ name: 'node-b', macAddresses: ['aa:00:00:00:00:03'], properties: {} }, created());
        assert.deepEqual(await store.getNode(node.uuid), node);
        assert.deepEqual(await store.getNode('node-b'), node);
        assert.equal(await store.getNode('node-missing'), undefined);
        assert.equal(await store.getNode('00000000-0000-4000-8000-000000000000'), undefined);
      });

      it('refuses a duplicate name with ALREADY_EXISTS naming it, and creates nothing', async () => {
        await store.createNode({ name: 'dup', macAddresses: ['aa:00:00:00:00:04'], properties: {} }, created());
        await rejectsWithStatus(
          store.createNode({ name: 'dup', macAddresses: ['aa:00:00:00:00:05'], properties: {} }, created()),
          Status.ALREADY_EXISTS,
          /'dup'/,
        );
        assert.deepEqual(await store.findNodesByMacs(['aa:00:00:00:00:05']), []);
      });

      it('refuses a MAC that another node owns with ALREADY_EXISTS naming the MAC and the owner, and creates nothing', async () => {
        await store.createNode({ name: 'owner', macAddresses: ['aa:00:00:00:00:06'], properties: {} }, created());
        await rejectsWithStatus(
          store.createNode({ name: 'thief', macAddresses: ['aa:00:00:00:00:07', 'aa:00:00:00:00:06'], properties: {} }, created()),
          Status.ALREADY_EXISTS,
          /aa:00:00:00:00:06.*'owner'/,
        );
        assert.equal(await store.getNode('thief'), undefined);
        assert.deepEqual(await store.findNodesByMacs(['aa:00:00:00:00:07']), []);
      });

      it('finds the nodes owning any of the MACs, once each', async () => {
        const a = await store.createNode(
          { name: 'fa', macAddresses: ['aa:00:00:00:01:01', 'aa:00:00:00:01:02'], properties: {} },
          created(),
        );
        const b = await store.createNode({ name: 'fb', macAddresses: ['aa:00:00:00:01:03'], properties: {} }, created());
        assert.deepEqual(await store.findNodesByMacs([]), []);
        assert.deepEqual(await store.findNodesByMacs(['aa:00:00:00:01:ff']), []);
        assert.deepEqual(
          (await store.findNodesByMacs(['aa:00:00:00:01:02'])).map((n) => n.uuid),
          [a.uuid],
        );
        assert.deepEqual(
          (await store.findNodesByMacs(['aa:00:00:00:01:01', 'aa:00:00:00:01:02', 'aa:00:00:00:01:ff'])).map((n) => n.uuid),
          [a.uuid],
        );
        const both = await store.findNodesByMacs(['aa:00:00:00:01:03', 'aa:00:00:00:01:01']);
        assert.deepEqual(both.map((n) => n.uuid).sort(), [a.uuid, b.uuid].sort());
        assert.deepEqual(both.find((n) => n.uuid === a.uuid)?.macAddresses, ['aa:00:00:00:01:01', 'aa:00:00:00:01:02']);
      });

      it('lists nodes ordered by name, with state, maintenance, afterName and limit', async () => {
        // Created out of order, so that ordering by insertion would show.
        await nodeIn('manageable', 'n-c', ['aa:00:00:00:02:03']);
        await nodeIn('enroll', 'n-a', ['aa:00:00:00:02:01']);
        const d = await nodeIn('manageable', 'n-d', ['aa:00:00:00:02:04']);
        await nodeIn('enroll', 'n-b', ['aa:00:00:00:02:02', 'aa:00:00:00:02:05']);
        await store.setMaintenance(d.uuid, true, 'disk swap', event('maintenance'));
        const names = (nodes: NodeRecord[]) => nodes.map((n) => n.name);

        const all = await store.listNodes({ limit: 100 });
        assert.deepEqual(names(all), ['n-a', 'n-b', 'n-c', 'n-d']);
        assert.deepEqual(all[1]?.macAddresses, ['aa:00:00:00:02:02', 'aa:00:00:00:02:05']);
        assert.deepEqual(names(await store.listNodes({ limit: 2 })), ['n-a', 'n-b']);
        assert.deepEqual(names(await store.listNodes({ limit: 2, afterName: 'n-b' })), ['n-c', 'n-d']);
        assert.deepEqual(names(await store.listNodes({ limit: 2, afterName: 'n-d' })), []);
        assert.deepEqual(names(await store.listNodes({ limit: 100, provisionState: 'manageable' })), ['n-c', 'n-d']);
        assert.deepEqual(names(await store.listNodes({ limit: 100, provisionState: 'inspect_wait' })), []);
        assert.deepEqual(names(await store.listNodes({ limit: 100, maintenance: true })), ['n-d']);
        assert.deepEqual(names(await store.listNodes({ limit: 100, maintenance: false })), ['n-a', 'n-b', 'n-c']);
        assert.deepEqual(names(await store.listNodes({ limit: 100, provisionState: 'manageable', maintenance: false, afterName: 'n-a' })), [
          'n-c',
        ]);
      });

      it('deletes a node with its ports and events; the second delete finds nothing', async () => {
        const node = await store.createNode({ name: 'gone', macAddresses: ['aa:00:00:00:03:01'], properties: {} }, created());
        assert.equal(await store.deleteNode(node.uuid), true);
        assert.equal(await store.getNode(node.uuid), undefined);
        assert.deepEqual(await store.listEvents(node.uuid, 0, 10), []);
        assert.equal(await store.deleteNode(node.uuid), false);
        // Its MAC and name are free again.
        const again = await store.createNode({ name: 'gone', macAddresses: ['aa:00:00:00:03:01'], properties: {} }, created());
        assert.notEqual(again.uuid, node.uuid);
      });
    });

    describe('properties and secrets', () => {
      it('stores the secrets given at creation as given, and a node without any has none', async () => {
        const node = await store.createNode(
          {
            name: 'bmc-a',
            macAddresses: ['aa:00:00:00:04:01'],
            properties: { 'power.driver': 'redfish' },
            secrets: { 'power.redfish.password': 'mcs1.sealed-value' },
          },
          created(),
        );
        assert.deepEqual(node.secrets, { 'power.redfish.password': 'mcs1.sealed-value' });
        assert.deepEqual((await store.getNode('bmc-a'))?.secrets, { 'power.redfish.password': 'mcs1.sealed-value' });
        assert.deepEqual((await store.listNodes({ limit: 10 }))[0]?.secrets, { 'power.redfish.password': 'mcs1.sealed-value' });
        const plain = await store.createNode({ name: 'bmc-b', macAddresses: ['aa:00:00:00:04:02'], properties: {} }, created());
        assert.deepEqual(plain.secrets, {});
      });

      it('sets and unsets properties and secrets in one write with its event, keeping the rest', async () => {
        const node = await store.createNode(
          {
            name: 'bmc-c',
            macAddresses: ['aa:00:00:00:04:03'],
            properties: { rack: 'r1', 'power.driver': 'qemu', 'power.qmp_socket': '/run/x' },
            secrets: { 'power.ipmi.password': 'old' },
          },
          created(),
        );
        const updated = await store.updateNodeSettings(
          node.uuid,
          {
            setProperties: { 'power.driver': 'redfish', 'power.redfish.address': 'https://10.0.0.9' },
            unsetProperties: ['power.qmp_socket', 'never.set'],
            setSecrets: { 'power.redfish.password': 'new' },
            unsetSecrets: ['power.ipmi.password'],
          },
          event('settings', 'power settings changed'),
        );
        assert.ok(updated);
        assert.deepEqual(updated.properties, { rack: 'r1', 'power.driver': 'redfish', 'power.redfish.address': 'https://10.0.0.9' });
        assert.deepEqual(updated.secrets, { 'power.redfish.password': 'new' });
        assert.ok(updated.updatedAt >= node.updatedAt);
        assert.deepEqual(await store.getNode(node.uuid), updated);
        const events = await store.listEvents(node.uuid, 0, 10);
        assert.equal(events.at(-1)?.kind, 'settings');
        assert.equal(events.at(-1)?.message, 'power settings changed');
      });

      it('answers undefined for a node that is gone', async () => {
        const change = { setProperties: { a: 'b' }, unsetProperties: [], setSecrets: {}, unsetSecrets: [] };
        assert.equal(await store.updateNodeSettings('00000000-0000-4000-8000-000000000000', change, event('settings')), undefined);
      });
    });

    describe('ports', () => {
      it('adds and removes ports with an event each, refusing duplicates, unknown ports and the last port', async () => {
        const node = await store.createNode({ name: 'ports', macAddresses: ['aa:00:00:00:04:01'], properties: {} }, created());
        await store.createNode({ name: 'other', macAddresses: ['aa:00:00:00:04:09'], properties: {} }, created());

        const added = await store.addPort(node.uuid, 'aa:00:00:00:04:02', event('port', 'port aa:00:00:00:04:02 added'));
        assert.deepEqual(added.macAddresses, ['aa:00:00:00:04:01', 'aa:00:00:00:04:02']);
        assert.deepEqual(
          (await store.findNodesByMacs(['aa:00:00:00:04:02'])).map((n) => n.uuid),
          [node.uuid],
        );
        await rejectsWithStatus(
          store.addPort(node.uuid, 'aa:00:00:00:04:09', event('port')),
          Status.ALREADY_EXISTS,
          /aa:00:00:00:04:09.*'other'/,
        );
        await rejectsWithStatus(store.addPort(node.uuid, 'aa:00:00:00:04:01', event('port')), Status.ALREADY_EXISTS, /aa:00:00:00:04:01/);
        await rejectsWithStatus(
          store.addPort('00000000-0000-4000-8000-000000000000', 'aa:00:00:00:04:03', event('port')),
          Status.NOT_FOUND,
          /no longer exists/,
        );

        await rejectsWithStatus(store.removePort(node.uuid, 'aa:00:00:00:04:09', event('port')), Status.NOT_FOUND, /aa:00:00:00:04:09/);
        const removed = await store.removePort(node.uuid, 'aa:00:00:00:04:01', event('port', 'port aa:00:00:00:04:01 removed'));
        assert.deepEqual(removed.macAddresses, ['aa:00:00:00:04:02']);
        assert.deepEqual(await store.findNodesByMacs(['aa:00:00:00:04:01']), []);
        await rejectsWithStatus(store.removePort(node.uuid, 'aa:00:00:00:04:02', event('port')), Status.FAILED_PRECONDITION, /last port/);
        assert.deepEqual((await store.getNode(node.uuid))?.macAddresses, ['aa:00:00:00:04:02']);

        const events = await store.listEvents(node.uuid, 0, 10);
        assert.deepEqual(
          events.map((e) => e.message),
          ['enrolled', 'port aa:00:00:00:04:02 added', 'port aa:00:00:00:04:01 removed'],
        );
      });
    });

    describe('maintenance', () => {
      it('turns maintenance on with a reason and off clearing it, with an event each', async () => {
        const node = await store.createNode({ name: 'maint', macAddresses: ['aa:00:00:00:05:01'], properties: {} }, created());
        const on = await store.setMaintenance(node.uuid, true, 'bad DIMM', event('maintenance', 'maintenance on: bad DIMM'));
        assert.equal(on?.maintenance, true);
        assert.equal(on?.maintenanceReason, 'bad DIMM');
        const off = await store.setMaintenance(node.uuid, false, 'fixed', event('maintenance', 'maintenance off'));
        assert.equal(off?.maintenance, false);
        assert.equal(off?.maintenanceReason, '');
        assert.equal(await store.setMaintenance('00000000-0000-4000-8000-000000000000', true, 'x', event('maintenance')), undefined);
        const kinds = (await store.listEvents(node.uuid, 0, 10)).map((e) => e.kind);
        assert.deepEqual(kinds, ['created', 'maintenance', 'maintenance']);
      });

      it('restarts the liveness clock of a waiting node when it leaves maintenance', async () => {
        const node = await nodeIn('inspect_wait', 'maint-wait', ['aa:00:00:00:05:02']);
        assert.ok(node.livenessAt !== null);
        await store.setMaintenance(node.uuid, true, 'hold', event('maintenance'));
        const before = Date.now();
        const off = await store.setMaintenance(node.uuid, false, '', event('maintenance'));
        assert.ok(off?.livenessAt !== null && off?.livenessAt !== undefined && off.livenessAt >= before, 'liveness restarted');
        // A node that waits for nothing keeps no clock.
        const idle = await nodeIn('manageable', 'maint-idle', ['aa:00:00:00:05:03']);
        await store.setMaintenance(idle.uuid, true, 'hold', event('maintenance'));
        assert.equal((await store.setMaintenance(idle.uuid, false, '', event('maintenance')))?.livenessAt, null);
      });
    });

    describe('power status', () => {
      it('saves and reads back a node power status, replaces it, and forgets it with the node', async () => {
        const a = await store.createNode({ name: 'pw-a', macAddresses: ['aa:00:00:00:06:01'], properties: {} }, created());
        const b = await store.createNode({ name: 'pw-b', macAddresses: ['aa:00:00:00:06:02'], properties: {} }, created());
        assert.equal((await store.getPowerStatuses([a.uuid, b.uuid])).size, 0);
        await store.savePowerStatus(a.uuid, { powerState: 'on', checkedAt: 1_700_000_000_123, failures: 0, error: '' });
        await store.savePowerStatus(b.uuid, { powerState: '', checkedAt: null, failures: 2, error: 'BMC said no' });
        await store.savePowerStatus(a.uuid, { powerState: 'off', checkedAt: 1_700_000_000_456, failures: 0, error: '' });
        const found = await store.getPowerStatuses([a.uuid, b.uuid, '00000000-0000-4000-8000-000000000000']);
        assert.deepEqual(found.get(a.uuid), { powerState: 'off', checkedAt: 1_700_000_000_456, failures: 0, error: '' });
        assert.deepEqual(found.get(b.uuid), { powerState: '', checkedAt: null, failures: 2, error: 'BMC said no' });
        assert.equal(found.size, 2);
        // A node that is gone: nothing saved, nothing thrown.
        await store.savePowerStatus('00000000-0000-4000-8000-000000000000', { powerState: 'on', checkedAt: 1, failures: 0, error: '' });
        assert.ok(await store.deleteNode(a.uuid));
        assert.deepEqual([...(await store.getPowerStatuses([a.uuid, b.uuid])).keys()], [b.uuid]);
      });
    });

    describe('transitions', () => {
      it('moves a node only from the expected state (compare-and-set)', async () => {
        const node = await store.createNode({ name: 'cas', macAddresses: ['aa:00:00:00:06:01'], properties: {} }, created());
        const lost = await store.transition(node.uuid, {
          from: ['manageable', 'available'],
          to: 'inspecting',
          target: 'manageable',
          keepAgentToken: true,
          event: { kind: 'transition', message: 'should not happen', actor: 'test', fromState: 'manageable', toState: 'inspecting' },
        });
        assert.equal(lost, undefined);
        const unchanged = await store.getNode(node.uuid);
        assert.equal(unchanged?.provisionState, 'enroll');
        assert.deepEqual(
          (await store.listEvents(node.uuid, 0, 10)).map((e) => e.kind),
          ['created'],
          'a lost compare-and-set writes no event',
        );

        const moved = await store.transition(node.uuid, {
          from: ['enroll'],
          to: 'manageable',
          target: 'manageable',
          lastError: 'previous failure',
          keepAgentToken: false,
          event: { kind: 'transition', message: 'enroll -> manageable', actor: 'test', fromState: 'enroll', toState: 'manageable' },
        });
        assert.equal(moved?.provisionState, 'manageable');
        assert.equal(moved?.targetProvisionState, 'manageable');
        assert.equal(moved?.lastError, 'previous failure');
        assert.equal(moved?.livenessAt, null, 'a state that waits for no agent has no liveness clock');
        assert.ok((moved?.provisionUpdatedAt ?? 0) >= node.provisionUpdatedAt);
        const events = await store.listEvents(node.uuid, 0, 10);
        assert.equal(events.at(-1)?.message, 'enroll -> manageable');
        assert.equal(events.at(-1)?.fromState, 'enroll');
        assert.equal(events.at(-1)?.toState, 'manageable');
        assert.equal(events.at(-1)?.actor, 'test');

        // A second identical compare-and-set loses: the node is no longer in enroll.
        assert.equal(
          await store.transition(node.uuid, {
            from: ['enroll'],
            to: 'manageable',
            target: null,
            keepAgentToken: false,
            event: event('transition'),
          }),
          undefined,
        );
        assert.equal(
          await store.transition('00000000-0000-4000-8000-000000000000', {
            from: ['enroll'],
            to: 'manageable',
            target: null,
            keepAgentToken: false,
            event: event('transition'),
          }),
          undefined,
        );
      });

      it('starts the liveness clock on entering a wait state, keeps or wipes the agent token, and leaves or clears last_error', async () => {
        const node = await nodeIn('inspecting', 'clock', ['aa:00:00:00:06:02']);
        assert.equal(node.livenessAt, null);
        await store.setAgentToken(node.uuid, 'a'.repeat(64), 'api-token');
        const before = Date.now();
        const waiting = await store.transition(node.uuid, {
          from: ['inspecting'],
          to: 'inspect_wait',
          target: 'manageable',
          lastError: '',
          keepAgentToken: true,
          event: event('transition'),
        });
        assert.ok(waiting?.livenessAt !== null && waiting?.livenessAt !== undefined && waiting.livenessAt >= before);
        assert.equal(waiting.agentTokenHash, 'a'.repeat(64), 'keepAgentToken keeps the hash');
        assert.equal(waiting.agentApiToken, 'api-token', 'and the API credential');
        assert.equal(waiting.lastError, '');

        const failed = await store.transition(node.uuid, {
          from: ['inspect_wait'],
          to: 'inspect_failed',
          target: null,
          lastError: 'disk not found',
          keepAgentToken: false,
          inventoryJson: '{"cpu":{"cores":8}}',
          event: event('transition'),
        });
        assert.equal(failed?.agentTokenHash, null, 'leaving the agent states wipes the hash');
        assert.equal(failed?.agentApiToken, null, 'and the API credential');
        assert.equal(failed?.livenessAt, null);
        assert.equal(failed?.lastError, 'disk not found');
        assert.equal(failed?.inventoryJson, '{"cpu":{"cores":8}}');
        assert.equal(failed?.targetProvisionState, null);

        const again = await store.transition(node.uuid, {
          from: ['inspect_failed'],
          to: 'manageable',
          target: null,
          keepAgentToken: false,
          deployJson: '{"image":"ubuntu"}',
          event: event('transition'),
        });
        assert.equal(again?.lastError, 'disk not found', 'lastError undefined leaves it');
        assert.equal(again?.inventoryJson, '{"cpu":{"cores":8}}', 'inventory undefined leaves it');
        assert.equal(again?.deployJson, '{"image":"ubuntu"}');
      });

      it('with a holder, moves a node only while that holder has its lock (fencing)', async () => {
        const node = await nodeIn('deploying', 'fence', ['aa:00:00:00:06:03'], 'active');
        const moveBy = (holder: string) =>
          store.transition(node.uuid, {
            from: ['deploying'],
            to: 'deploy_wait',
            target: 'active',
            keepAgentToken: true,
            holder,
            event: event('transition', `moved by ${holder}`),
          });
        assert.equal(await moveBy('controller-a'), undefined, 'nobody holds the lock');
        assert.ok(await store.tryLock(node.uuid, 'controller-b', 'deploy'));
        assert.equal(await moveBy('controller-a'), undefined, 'another holder has the lock');
        assert.equal((await store.getNode(node.uuid))?.provisionState, 'deploying');
        assert.deepEqual(
          (await store.listEvents(node.uuid, 0, 10)).map((e) => e.kind),
          ['created', 'transition'],
          'a fenced-off transition writes no event',
        );
        const moved = await moveBy('controller-b');
        assert.equal(moved?.provisionState, 'deploy_wait');
        assert.equal(moved?.reservation, 'controller-b', 'a transition leaves the lock alone');
        assert.equal((await store.listEvents(node.uuid, 0, 10)).at(-1)?.message, 'moved by controller-b');
      });
    });

    describe('agent tokens and heartbeats', () => {
      it('stores and clears the agent token hash and the agent API credential', async () => {
        const node = await nodeIn('inspect_wait', 'token', ['aa:00:00:00:07:01']);
        assert.equal(node.agentApiToken, null);
        await store.setAgentToken(node.uuid, 'b'.repeat(64), 'api-token-1');
        const set = await store.getNode(node.uuid);
        assert.equal(set?.agentTokenHash, 'b'.repeat(64));
        assert.equal(set?.agentApiToken, 'api-token-1');
        await store.setAgentToken(node.uuid, 'c'.repeat(64), 'api-token-2');
        assert.equal((await store.getNode(node.uuid))?.agentApiToken, 'api-token-2', 'a new token replaces both');
        await store.setAgentToken(node.uuid, null, 'stray');
        const cleared = await store.getNode(node.uuid);
        assert.equal(cleared?.agentTokenHash, null);
        assert.equal(cleared?.agentApiToken, null, 'no API credential without a token');
      });

      it('reads the heartbeat views of a batch of nodes in one call, leaving out the ones that do not exist', async () => {
        const waiting = await nodeIn('deploy_wait', 'views-wait', ['aa:00:00:00:07:11'], 'active');
        await store.setAgentToken(waiting.uuid, 'e'.repeat(64), 'api-token');
        const resting = await nodeIn('manageable', 'views-rest', ['aa:00:00:00:07:12']);
        await store.setMaintenance(resting.uuid, true, 'bad DIMM', event('maintenance'));
        // More uuids than one SQLite statement takes (HEARTBEAT_VIEW_SLICE), the real ones past the first slice.
        const missing = Array.from({ length: 1500 }, (_, i) => `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`);
        const views = await store.getHeartbeatViews([...missing, waiting.uuid, resting.uuid]);
        assert.deepEqual(
          views.sort((a, b) => a.uuid.localeCompare(b.uuid)),
          [
            { uuid: waiting.uuid, provisionState: 'deploy_wait', maintenance: false, agentTokenHash: 'e'.repeat(64) },
            { uuid: resting.uuid, provisionState: 'manageable', maintenance: true, agentTokenHash: null },
          ].sort((a, b) => a.uuid.localeCompare(b.uuid)),
        );
        assert.deepEqual(await store.getHeartbeatViews([]), []);
      });

      it('setting a token restarts the liveness clock of a waiting node, never moving it back', async () => {
        const node = await nodeIn('inspect_wait', 'token-clock', ['aa:00:00:00:07:05']);
        const future = Date.now() + 60_000;
        await store.recordHeartbeats([heartbeat(node.uuid, future)]);
        const before = Date.now();
        await store.setAgentToken(node.uuid, 'c'.repeat(64), 'api-token');
        assert.equal((await store.getNode(node.uuid))?.livenessAt, future, 'not moved back');
        const other = await nodeIn('inspect_wait', 'token-clock-2', ['aa:00:00:00:07:06']);
        await store.setAgentToken(other.uuid, 'd'.repeat(64), 'api-token');
        assert.ok(((await store.getNode(other.uuid))?.livenessAt ?? 0) >= before);
      });

      it('records a batch of heartbeats, returning the uuids that no longer exist', async () => {
        const waiting = await nodeIn('inspect_wait', 'hb-wait', ['aa:00:00:00:07:02']);
        const idle = await nodeIn('manageable', 'hb-idle', ['aa:00:00:00:07:03']);
        const time = (waiting.livenessAt ?? 0) + 5000;
        const missing = await store.recordHeartbeats([
          heartbeat(waiting.uuid, time, { progressJson: '{"percent":40}', agentStatus: 'busy' }),
          heartbeat('00000000-0000-4000-8000-000000000001', time),
          heartbeat(idle.uuid, time, { agentAddress: '10.0.0.6:7351' }),
        ]);
        assert.deepEqual(missing, ['00000000-0000-4000-8000-000000000001']);
        const w = await store.getNode(waiting.uuid);
        assert.equal(w?.lastHeartbeatAt, time);
        assert.equal(w?.livenessAt, time);
        assert.equal(w?.agentAddress, '10.0.0.5:7351');
        assert.equal(w?.agentVersion, 'agent/1');
        assert.equal(w?.agentStatus, 'busy');
        assert.equal(w?.progressJson, '{"percent":40}');
        const i = await store.getNode(idle.uuid);
        assert.equal(i?.lastHeartbeatAt, time);
        assert.equal(i?.agentAddress, '10.0.0.6:7351');
        assert.equal(i?.livenessAt, null, 'a node waiting for nothing gets no liveness clock from a heartbeat');

        // Progress is kept when a later heartbeat carries none; an older heartbeat never moves liveness back.
        await store.recordHeartbeats([heartbeat(waiting.uuid, time - 1000, { progressJson: null })]);
        const after = await store.getNode(waiting.uuid);
        assert.equal(after?.progressJson, '{"percent":40}');
        assert.equal(after?.livenessAt, time);
        assert.deepEqual(await store.recordHeartbeats([]), []);
      });

      it('records a batch larger than one write (SQLite writes slices of 250), every heartbeat and every missing uuid', async () => {
        const first = await nodeIn('inspect_wait', 'hb-big-1', ['aa:00:00:00:07:21']);
        const last = await nodeIn('inspect_wait', 'hb-big-2', ['aa:00:00:00:07:22']);
        const time = Math.max(first.livenessAt ?? 0, last.livenessAt ?? 0) + 5000;
        const absent = Array.from({ length: 700 }, (_, i) => `00000000-0000-4000-8000-${String(i + 100).padStart(12, '0')}`);
        const missing = await store.recordHeartbeats([
          heartbeat(first.uuid, time),
          ...absent.map((uuid) => heartbeat(uuid, time)),
          heartbeat(last.uuid, time, { agentAddress: '10.0.0.9:7351' }),
        ]);
        assert.deepEqual(missing, absent);
        assert.equal((await store.getNode(first.uuid))?.livenessAt, time);
        const l = await store.getNode(last.uuid);
        assert.equal(l?.livenessAt, time, 'the heartbeat in the last slice is written too');
        assert.equal(l?.agentAddress, '10.0.0.9:7351');
      });

      it('keeps progress to the step it was reported in (issue 18 item 6): cleared by a state change and by an empty progress; never written from before the state change or onto a node in no agent state', async () => {
        const node = await nodeIn('deploy_wait', 'hb-progress', ['aa:00:00:00:07:0a'], 'active');
        const entered = node.provisionUpdatedAt;
        const progressOf = async () => (await store.getNode(node.uuid))?.progressJson;
        await store.recordHeartbeats([heartbeat(node.uuid, entered + 10, { progressJson: '{"phase":"writing"}' })]);
        assert.equal(await progressOf(), '{"phase":"writing"}');
        await store.recordHeartbeats([heartbeat(node.uuid, entered + 20, { progressJson: null })]);
        assert.equal(await progressOf(), '{"phase":"writing"}', 'a heartbeat that says nothing keeps it');
        await store.recordHeartbeats([heartbeat(node.uuid, entered + 30, { progressJson: '' })]);
        assert.equal(await progressOf(), null, "'' (the command ended) clears it");
        await store.recordHeartbeats([heartbeat(node.uuid, entered - 1, { progressJson: '{"phase":"erasing sda"}' })]);
        assert.equal(await progressOf(), null, 'a heartbeat received before the node entered its state is an earlier step');

        await store.recordHeartbeats([heartbeat(node.uuid, entered + 40, { progressJson: '{"phase":"flushing"}' })]);
        const active = await store.transition(node.uuid, {
          from: ['deploy_wait'],
          to: 'active',
          target: null,
          keepAgentToken: false,
          event: event('transition'),
        });
        assert.equal(active?.progressJson, null, 'a state change clears it');
        await store.recordHeartbeats([heartbeat(node.uuid, Date.now() + 1000, { progressJson: '{"phase":"flushing"}' })]);
        assert.equal(await progressOf(), null, 'no progress onto a node in no agent state');
      });

      it('pins the agent certificate once per token, by compare-and-set', async () => {
        const node = await nodeIn('inspect_wait', 'pin', ['aa:00:00:00:07:07']);
        const [hash, pem, other] = ['e'.repeat(64), 'PEM of the first certificate', 'PEM of another certificate'];
        assert.equal(node.agentCertificatePem, null);
        assert.equal(await store.pinAgentCertificate(node.uuid, hash, pem), 'stale', 'no token yet: nothing to pin to');
        await store.setAgentToken(node.uuid, hash, 'api-token');
        assert.equal(await store.pinAgentCertificate(node.uuid, 'f'.repeat(64), pem), 'stale', 'another token');
        assert.equal((await store.getNode(node.uuid))?.agentCertificatePem, null);
        assert.equal(await store.pinAgentCertificate(node.uuid, hash, pem), 'pinned');
        assert.equal((await store.getNode(node.uuid))?.agentCertificatePem, pem);
        assert.equal(await store.pinAgentCertificate(node.uuid, hash, pem), 'same');
        assert.equal(await store.pinAgentCertificate(node.uuid, hash, other), 'different');
        assert.equal((await store.getNode(node.uuid))?.agentCertificatePem, pem, 'the first one stays');
        assert.equal(await store.pinAgentCertificate('00000000-0000-4000-8000-000000000002', hash, pem), 'stale', 'no such node');

        // Two pins racing for one token: exactly one wins.
        await store.setAgentToken(node.uuid, hash, 'api-token');
        assert.equal((await store.getNode(node.uuid))?.agentCertificatePem, null, 'a new lookup forgets the pin');
        const results = await Promise.all([
          store.pinAgentCertificate(node.uuid, hash, pem),
          store.pinAgentCertificate(node.uuid, hash, other),
        ]);
        assert.deepEqual([...results].sort(), ['different', 'pinned']);
      });

      it('forgets the pinned certificate wherever it wipes the agent token', async () => {
        const pinned = async (state: ProvisionState, nodeName: string, mac: string) => {
          const node = await nodeIn(state, nodeName, [mac]);
          await store.setAgentToken(node.uuid, 'a'.repeat(64), 'api-token');
          assert.equal(await store.pinAgentCertificate(node.uuid, 'a'.repeat(64), 'PEM'), 'pinned');
          return node;
        };
        const certificateOf = async (uuid: string) => (await store.getNode(uuid))?.agentCertificatePem;

        const kept = await pinned('inspect_wait', 'pin-kept', 'aa:00:00:00:07:08');
        const move = (from: ProvisionState, to: ProvisionState, keepAgentToken: boolean) => ({
          from: [from],
          to,
          target: null,
          keepAgentToken,
          event: { kind: 'transition', message: `${from} -> ${to}`, actor: 'test', fromState: from, toState: to },
        });
        assert.ok(await store.transition(kept.uuid, move('inspect_wait', 'inspect_wait', true)));
        assert.equal(await certificateOf(kept.uuid), 'PEM', 'a transition that keeps the token keeps the pin');
        assert.ok(await store.transition(kept.uuid, move('inspect_wait', 'manageable', false)));
        assert.equal(await certificateOf(kept.uuid), null, 'a transition that wipes the token');

        const cleared = await pinned('inspect_wait', 'pin-cleared', 'aa:00:00:00:07:09');
        await store.setAgentToken(cleared.uuid, null, null);
        assert.equal(await certificateOf(cleared.uuid), null, 'a cleared token');

        const swept = await pinned('deploy_wait', 'pin-swept', 'aa:00:00:00:07:0a');
        const now = (swept.livenessAt ?? 0) + 10_000;
        assert.ok((await store.sweepTimedOut(now, now - 1000, 1000)).some((n) => n.uuid === swept.uuid));
        assert.equal(await certificateOf(swept.uuid), null, 'the sweep');

        const stranded = await pinned('deploying', 'pin-stranded', 'aa:00:00:00:07:0b');
        assert.ok(await store.tryLock(stranded.uuid, 'controller-gone', 'deploy'));
        assert.equal((await store.releaseHolder('controller-gone', 'gone', Date.now())).failed.length, 1);
        assert.equal(await certificateOf(stranded.uuid), null, 'a takeover that fails the node');
      });
    });

    describe('sweep', () => {
      const TIMEOUT = 120_000;

      it('fails waiting nodes whose liveness is older than the cutoff, with last_error and a timeout event', async () => {
        const heard = await nodeIn('inspect_wait', 'sw-heard', ['aa:00:00:00:08:01']);
        const silent = await nodeIn('clean_wait', 'sw-silent', ['aa:00:00:00:08:02']);
        const deploying = await nodeIn('deploy_wait', 'sw-deploy', ['aa:00:00:00:08:03']);
        const fresh = await nodeIn('inspect_wait', 'sw-fresh', ['aa:00:00:00:08:04']);
        const idle = await nodeIn('manageable', 'sw-idle', ['aa:00:00:00:08:05']);
        const active = await nodeIn('active', 'sw-active', ['aa:00:00:00:08:06']);
        await store.setAgentToken(heard.uuid, 'e'.repeat(64), 'api-token');

        const base = Date.now();
        const heardAt = base + 1000;
        await store.recordHeartbeats([
          heartbeat(heard.uuid, heardAt),
          heartbeat(deploying.uuid, heardAt),
          heartbeat(idle.uuid, heardAt),
          heartbeat(active.uuid, heardAt),
        ]);
        const now = heardAt + 125_500;
        // The fresh node was heard a moment before the sweep.
        await store.recordHeartbeats([heartbeat(fresh.uuid, now - 1000)]);
        const silentSince = (await store.getNode(silent.uuid))?.livenessAt;
        assert.ok(silentSince !== null && silentSince !== undefined);

        const timedOut = await store.sweepTimedOut(now, now - TIMEOUT, TIMEOUT);
        const byName = new Map(timedOut.map((n) => [n.name, n]));
        assert.deepEqual([...byName.keys()].sort(), ['sw-deploy', 'sw-heard', 'sw-silent']);
        assert.deepEqual(byName.get('sw-heard'), {
          uuid: heard.uuid,
          name: 'sw-heard',
          fromState: 'inspect_wait',
          toState: 'inspect_failed',
          lastError: 'no heartbeat from the agent for 125s (timeout 120s)',
        });
        assert.equal(byName.get('sw-deploy')?.toState, 'deploy_failed');
        assert.equal(byName.get('sw-silent')?.toState, 'clean_failed');
        assert.equal(
          byName.get('sw-silent')?.lastError,
          `no heartbeat from the agent since the node entered clean wait ${Math.floor((now - silentSince) / 1000)}s ago (timeout 120s)`,
        );

        const failed = await store.getNode(heard.uuid);
        assert.equal(failed?.provisionState, 'inspect_failed');
        assert.equal(failed?.targetProvisionState, null);
        assert.equal(failed?.agentTokenHash, null, 'the silent agent token is revoked');
        assert.equal(failed?.agentApiToken, null, 'and its API credential');
        assert.equal(failed?.lastError, 'no heartbeat from the agent for 125s (timeout 120s)');
        assert.equal(failed?.provisionUpdatedAt, now);
        const events = await store.listEvents(heard.uuid, 0, 10);
        const timeout = events.at(-1);
        assert.equal(timeout?.kind, 'timeout');
        assert.equal(timeout?.actor, 'sweep');
        assert.equal(timeout?.message, 'no heartbeat from the agent for 125s (timeout 120s)');
        assert.equal(timeout?.fromState, 'inspect_wait');
        assert.equal(timeout?.toState, 'inspect_failed');
        assert.equal(timeout?.time, now);

        assert.equal((await store.getNode(fresh.uuid))?.provisionState, 'inspect_wait');
        assert.equal((await store.getNode(idle.uuid))?.provisionState, 'manageable');
        assert.equal((await store.getNode(active.uuid))?.provisionState, 'active');

        // Nothing is failed twice.
        assert.deepEqual(await store.sweepTimedOut(now + 1, now + 1 - TIMEOUT, TIMEOUT), []);
      });

      it('fails a node only once its liveness is strictly older than the cutoff', async () => {
        const node = await nodeIn('inspect_wait', 'sw-edge', ['aa:00:00:00:08:07']);
        const heardAt = Date.now() + 1000;
        await store.recordHeartbeats([heartbeat(node.uuid, heardAt)]);
        assert.deepEqual(await store.sweepTimedOut(heardAt + TIMEOUT, heardAt, TIMEOUT), []);
        assert.deepEqual(
          (await store.sweepTimedOut(heardAt + TIMEOUT + 1, heardAt + 1, TIMEOUT)).map((n) => n.name),
          ['sw-edge'],
        );
      });

      it('skips nodes in maintenance', async () => {
        const node = await nodeIn('inspect_wait', 'sw-maint', ['aa:00:00:00:08:08']);
        await store.setMaintenance(node.uuid, true, 'hands off', event('maintenance'));
        const now = Date.now() + 10 * TIMEOUT;
        assert.deepEqual(await store.sweepTimedOut(now, now - TIMEOUT, TIMEOUT), []);
        assert.equal((await store.getNode(node.uuid))?.provisionState, 'inspect_wait');
      });

      it('skips locked nodes', async () => {
        const node = await nodeIn('inspect_wait', 'sw-reserved', ['aa:00:00:00:08:09']);
        assert.equal(await store.tryLock(node.uuid, 'controller-a', 'inspect'), true);
        const now = Date.now() + 10 * TIMEOUT;
        assert.deepEqual(await store.sweepTimedOut(now, now - TIMEOUT, TIMEOUT), []);
        assert.equal((await store.getNode(node.uuid))?.provisionState, 'inspect_wait');
      });

      it('with ranges, fails only the nodes whose ring hash is in them', async () => {
        const a = await nodeIn('inspect_wait', 'sw-ring-a', ['aa:00:00:00:08:0a']);
        await nodeIn('clean_wait', 'sw-ring-b', ['aa:00:00:00:08:0b']);
        await nodeIn('deploy_wait', 'sw-ring-c', ['aa:00:00:00:08:0c']);
        const hashA = ringHash(a.uuid);
        const now = Date.now() + 10 * TIMEOUT;
        const sweep = async (ranges: { from: number; to: number }[]) =>
          (await store.sweepTimedOut(now, now - TIMEOUT, TIMEOUT, ranges)).map((n) => n.name).sort();
        assert.deepEqual(await sweep([]), [], 'no ranges own nothing');
        assert.deepEqual(await sweep([{ from: hashA, to: hashA + 1 }]), ['sw-ring-a'], 'from is inclusive');
        // Everything but b's hash: `to` is exclusive, so [0, hashB) leaves b out.
        const hashB = ringHash((await store.getNode('sw-ring-b'))?.uuid ?? '');
        assert.deepEqual(
          await sweep([
            { from: 0, to: hashB },
            { from: hashB + 1, to: RING_SIZE },
          ]),
          ['sw-ring-c'],
        );
        assert.equal((await store.getNode('sw-ring-b'))?.provisionState, 'clean_wait');
        assert.deepEqual(await sweep([{ from: 0, to: RING_SIZE }]), ['sw-ring-b'], 'the whole ring owns everything');
      });
    });

    describe('due nodes', () => {
      it('lists unlocked, non-maintenance nodes in the states, heard since, in the ranges, oldest heartbeat first, up to the limit', async () => {
        const t0 = Date.now() + 60_000;
        const states: ProvisionState[] = ['inspecting', 'cleaning', 'deploying'];
        const newest = await nodeIn('inspecting', 'due-newest', ['aa:00:00:00:0c:01']);
        const older = await nodeIn('deploying', 'due-older', ['aa:00:00:00:0c:02']);
        const edge = await nodeIn('cleaning', 'due-edge', ['aa:00:00:00:0c:03']);
        const locked = await nodeIn('inspecting', 'due-locked', ['aa:00:00:00:0c:04']);
        const maintenance = await nodeIn('cleaning', 'due-maint', ['aa:00:00:00:0c:05']);
        const stale = await nodeIn('inspecting', 'due-stale', ['aa:00:00:00:0c:06']);
        await nodeIn('inspecting', 'due-silent', ['aa:00:00:00:0c:07']);
        const idle = await nodeIn('active', 'due-idle', ['aa:00:00:00:0c:08']);
        await store.recordHeartbeats([
          heartbeat(newest.uuid, t0 + 2000),
          heartbeat(older.uuid, t0 + 1000),
          heartbeat(edge.uuid, t0),
          heartbeat(locked.uuid, t0 + 500),
          heartbeat(maintenance.uuid, t0 + 500),
          heartbeat(stale.uuid, t0 - 1),
          heartbeat(idle.uuid, t0 + 500),
        ]);
        assert.ok(await store.tryLock(locked.uuid, 'controller-b', 'inspect'));
        await store.setMaintenance(maintenance.uuid, true, 'hands off', event('maintenance'));
        const all = [{ from: 0, to: RING_SIZE }];

        assert.deepEqual(await store.listDueNodes(states, t0, all, 10), [edge.uuid, older.uuid, newest.uuid]);
        assert.deepEqual(await store.listDueNodes(states, t0, all, 2), [edge.uuid, older.uuid]);
        assert.deepEqual(await store.listDueNodes(['deploying'], t0, all, 10), [older.uuid]);
        const hash = ringHash(newest.uuid);
        assert.deepEqual(await store.listDueNodes(states, t0, [{ from: hash, to: hash + 1 }], 10), [newest.uuid]);
        assert.deepEqual(await store.listDueNodes(states, t0, [], 10), []);
      });
    });

    describe('counts, events and reservations', () => {
      it('counts nodes by provision state, with every state present', async () => {
        await nodeIn('enroll', 'c-1', ['aa:00:00:00:09:01']);
        await nodeIn('inspect_wait', 'c-2', ['aa:00:00:00:09:02']);
        await nodeIn('inspect_wait', 'c-3', ['aa:00:00:00:09:03']);
        const counts = await store.countByProvisionState();
        assert.deepEqual([...counts.keys()].sort(), [...PROVISION_STATES].sort());
        assert.equal(counts.get('enroll'), 1);
        assert.equal(counts.get('inspect_wait'), 2);
        assert.equal(counts.get('active'), 0);
      });

      it('pages through a node’s events in order, after an id, and only that node’s', async () => {
        const a = await store.createNode({ name: 'ev-a', macAddresses: ['aa:00:00:00:0a:01'], properties: {} }, created());
        const b = await store.createNode({ name: 'ev-b', macAddresses: ['aa:00:00:00:0a:02'], properties: {} }, created());
        for (let i = 1; i <= 5; i++) {
          await store.addEvent(a.uuid, event('note', `a-${i}`));
          await store.addEvent(b.uuid, event('note', `b-${i}`));
        }
        const first = await store.listEvents(a.uuid, 0, 3);
        assert.deepEqual(
          first.map((e) => e.message),
          ['enrolled', 'a-1', 'a-2'],
        );
        assert.ok(
          first.every((e, i) => i === 0 || e.id > (first[i - 1]?.id ?? 0)),
          'ids increase',
        );
        const second = await store.listEvents(a.uuid, first.at(-1)?.id ?? 0, 3);
        assert.deepEqual(
          second.map((e) => e.message),
          ['a-3', 'a-4', 'a-5'],
        );
        assert.deepEqual(await store.listEvents(a.uuid, second.at(-1)?.id ?? 0, 3), []);
        const note = second[0];
        assert.equal(note?.kind, 'note');
        assert.equal(note?.actor, 'test');
        assert.equal(note?.nodeUuid, a.uuid);
        assert.equal(note?.fromState, null);
        assert.ok(typeof note?.time === 'number' && note.time > 0);
      });

      it('locks a node for one holder at a time, and unlocks only for that holder', async () => {
        const node = await nodeIn('inspect_wait', 'l-a', ['aa:00:00:00:0b:05']);
        assert.equal(await store.tryLock(node.uuid, 'controller-a', 'inspect'), true);
        const locked = await store.getNode(node.uuid);
        assert.equal(locked?.reservation, 'controller-a');
        assert.equal(locked?.reservationOperation, 'inspect');
        assert.equal(await store.tryLock(node.uuid, 'controller-b', 'deploy'), false, 'held by another');
        assert.equal(await store.tryLock(node.uuid, 'controller-a', 'deploy'), false, 'not re-entrant');
        assert.equal((await store.getNode(node.uuid))?.reservationOperation, 'inspect');
        assert.equal(await store.unlock(node.uuid, 'controller-b'), false, 'only the holder unlocks');
        assert.equal((await store.getNode(node.uuid))?.reservation, 'controller-a');
        assert.equal(await store.unlock(node.uuid, 'controller-a'), true);
        const unlocked = await store.getNode(node.uuid);
        assert.equal(unlocked?.reservation, null);
        assert.equal(unlocked?.reservationOperation, null);
        assert.equal(await store.unlock(node.uuid, 'controller-a'), false);
        assert.equal(await store.tryLock(node.uuid, 'controller-b', 'deploy'), true);
        assert.equal(await store.tryLock('00000000-0000-4000-8000-000000000000', 'controller-a', 'inspect'), false);
      });

      it('queues patient waiters in ticket order, and a fast tryLock does not jump the queue', async () => {
        const node = await nodeIn('manageable', 'q-order', ['aa:00:00:00:0b:10']);
        const first = await store.enqueueLockWaiter(node.uuid, 'controller-a', 'inspect');
        const second = await store.enqueueLockWaiter(node.uuid, 'controller-b', 'provide');
        assert.ok(second > first, 'tickets increase');
        assert.equal(await store.tryLock(node.uuid, 'controller-c', 'abort'), false, 'the lock is free, but others queue for it');
        assert.equal(await store.tryLockWithTicket(node.uuid, second), false, 'not first in the queue');
        assert.equal(await store.tryLockWithTicket(node.uuid, first), true);
        const locked = await store.getNode(node.uuid);
        assert.equal(locked?.reservation, 'controller-a', "the ticket's holder has the lock");
        assert.equal(locked?.reservationOperation, 'inspect');
        assert.equal(await store.tryLockWithTicket(node.uuid, first), false, 'a ticket serves once');
        assert.equal(await store.tryLockWithTicket(node.uuid, second), false, 'first in the queue now, but the lock is held');
        assert.ok(await store.unlock(node.uuid, 'controller-a'));
        assert.equal(await store.tryLockWithTicket(node.uuid, second), true);
        assert.equal((await store.getNode(node.uuid))?.reservationOperation, 'provide');
        assert.ok(await store.unlock(node.uuid, 'controller-b'));
        assert.equal(await store.tryLock(node.uuid, 'controller-c', 'abort'), true, 'the queue is empty again');
      });

      it('lets a waiter leave the queue, and serves no ticket that left, is unknown or is for another node', async () => {
        const node = await nodeIn('manageable', 'q-leave', ['aa:00:00:00:0b:11']);
        const other = await nodeIn('manageable', 'q-other', ['aa:00:00:00:0b:12']);
        const leaving = await store.enqueueLockWaiter(node.uuid, 'controller-a', 'inspect');
        const staying = await store.enqueueLockWaiter(node.uuid, 'controller-b', 'inspect');
        await store.dequeueLockWaiter(leaving);
        await store.dequeueLockWaiter(leaving);
        assert.equal(await store.tryLockWithTicket(node.uuid, leaving), false, 'a ticket that left');
        assert.equal(await store.tryLockWithTicket(node.uuid, staying + 1000), false, 'an unknown ticket');
        assert.equal(await store.tryLockWithTicket(other.uuid, staying), false, "another node's ticket");
        assert.equal(await store.tryLockWithTicket(node.uuid, staying), true, 'first once the other left');
        await store.dequeueLockWaiter(staying);
        assert.equal((await store.getNode(node.uuid))?.reservation, 'controller-b', 'leaving with a used ticket changes nothing');

        const orphan = await store.enqueueLockWaiter(other.uuid, 'controller-a', 'inspect');
        assert.ok(await store.deleteNode(other.uuid));
        assert.equal(await store.tryLockWithTicket(other.uuid, orphan), false, "a deleted node's queue goes with it");
        await rejectsWithStatus(
          store.enqueueLockWaiter('00000000-0000-4000-8000-000000000000', 'controller-a', 'inspect'),
          Status.NOT_FOUND,
          /no longer exists/,
        );
      });

      it('releases a gone holder: fails the nodes it left in an active state, clears its locks and its tickets', async () => {
        const reason = 'controller controller-a stopped; taken over by controller-b';
        const inspecting = await nodeIn('inspecting', 'rh-inspecting', ['aa:00:00:00:0b:21'], 'manageable');
        const cleaning = await nodeIn('cleaning', 'rh-cleaning', ['aa:00:00:00:0b:22'], 'available');
        const deploying = await nodeIn('deploying', 'rh-deploying', ['aa:00:00:00:0b:23'], 'active');
        const deleting = await nodeIn('deleting', 'rh-deleting', ['aa:00:00:00:0b:24'], 'available');
        const waiting = await nodeIn('inspect_wait', 'rh-waiting', ['aa:00:00:00:0b:25'], 'manageable');
        const active = await nodeIn('active', 'rh-active', ['aa:00:00:00:0b:26']);
        const othersLock = await nodeIn('cleaning', 'rh-others', ['aa:00:00:00:0b:27'], 'available');
        const unlocked = await nodeIn('deploying', 'rh-unlocked', ['aa:00:00:00:0b:28'], 'active');
        const mine = [inspecting, cleaning, deploying, deleting, waiting, active];
        for (const node of mine) {
          await store.setAgentToken(node.uuid, 'f'.repeat(64), 'api-token');
          assert.ok(await store.tryLock(node.uuid, 'controller-a', 'work'));
        }
        assert.ok(await store.tryLock(othersLock.uuid, 'controller-b', 'clean'));
        const ticketOfA = await store.enqueueLockWaiter(othersLock.uuid, 'controller-a', 'inspect');
        const ticketOfC = await store.enqueueLockWaiter(othersLock.uuid, 'controller-c', 'inspect');

        const now = Date.now() + 5000;
        const brief = (e: NodeEventRecord) => ({
          kind: e.kind,
          message: e.message,
          actor: e.actor,
          fromState: e.fromState,
          toState: e.toState,
          time: e.time,
        });
        // Every lock let go leaves a trace in the node's history.
        const lockReleased = {
          kind: 'lock_released',
          message: `lock of controller-a for work released: ${reason}`,
          actor: 'takeover',
          fromState: null,
          toState: null,
          time: now,
        };
        const result = await store.releaseHolder('controller-a', reason, now);
        assert.equal(result.released, mine.length, 'every lock of the holder, the failed nodes included');
        const expected: TimedOutNode[] = [
          { uuid: cleaning.uuid, name: 'rh-cleaning', fromState: 'cleaning', toState: 'clean_failed', lastError: reason },
          { uuid: deleting.uuid, name: 'rh-deleting', fromState: 'deleting', toState: 'clean_failed', lastError: reason },
          { uuid: deploying.uuid, name: 'rh-deploying', fromState: 'deploying', toState: 'deploy_failed', lastError: reason },
          { uuid: inspecting.uuid, name: 'rh-inspecting', fromState: 'inspecting', toState: 'inspect_failed', lastError: reason },
        ];
        assert.deepEqual([...result.failed].sort(byName), expected);
        for (const f of expected) {
          const node = await store.getNode(f.uuid);
          assert.equal(node?.provisionState, f.toState);
          assert.equal(node?.targetProvisionState, null);
          assert.equal(node?.lastError, reason);
          assert.equal(node?.agentTokenHash, null, `${f.name}: agent token revoked`);
          assert.equal(node?.agentApiToken, null, `${f.name}: API credential wiped`);
          assert.equal(node?.updatedAt, now);
          assert.equal(node?.provisionUpdatedAt, now);
          assert.equal(node?.reservation, null);
          assert.equal(node?.reservationOperation, null);
          assert.equal(node?.livenessAt, null, 'a failed state waits for no agent');
          assert.deepEqual((await store.listEvents(f.uuid, 0, 10)).slice(-2).map(brief), [
            { kind: 'takeover', message: reason, actor: 'takeover', fromState: f.fromState, toState: f.toState, time: now },
            lockReleased,
          ]);
        }
        // A wait state or an idle one is left as it is, only unlocked: the sweep and the agent carry on from there.
        const stillWaiting = await store.getNode(waiting.uuid);
        assert.equal(stillWaiting?.provisionState, 'inspect_wait');
        assert.equal(stillWaiting?.reservation, null);
        assert.equal(stillWaiting?.agentTokenHash, 'f'.repeat(64));
        assert.equal(stillWaiting?.lastError, '');
        const stillActive = await store.getNode(active.uuid);
        assert.equal(stillActive?.provisionState, 'active');
        assert.equal(stillActive?.reservation, null);
        for (const node of [waiting, active])
          assert.deepEqual((await store.listEvents(node.uuid, 0, 10)).slice(-1).map(brief), [lockReleased]);
        assert.equal((await store.getNode(othersLock.uuid))?.reservation, 'controller-b', "another holder's lock stays");
        assert.equal((await store.getNode(unlocked.uuid))?.provisionState, 'deploying', 'an unlocked node is not the holder’s');
        assert.equal((await store.listEvents(unlocked.uuid, 0, 10)).at(-1)?.kind, 'transition');

        // The holder's ticket is gone: the one behind it is first now.
        assert.ok(await store.unlock(othersLock.uuid, 'controller-b'));
        assert.equal(await store.tryLockWithTicket(othersLock.uuid, ticketOfA), false);
        assert.equal(await store.tryLockWithTicket(othersLock.uuid, ticketOfC), true);

        assert.deepEqual(await store.releaseHolder('controller-a', reason, now + 1), { released: 0, failed: [] });
      });
    });

    describe('controllers', () => {
      it('registers, touches, lists and removes controllers, removing only those not seen since a time', async () => {
        const byId = (a: { id: string }, b: { id: string }) => (a.id < b.id ? -1 : 1);
        await store.registerController('controller-b', '10.0.0.2:7350', 1000);
        await store.registerController('controller-a', '10.0.0.1:7350', 2000);
        assert.deepEqual((await store.listControllers()).sort(byId), [
          { id: 'controller-a', address: '10.0.0.1:7350', startedAt: 2000, lastSeenAt: 2000 },
          { id: 'controller-b', address: '10.0.0.2:7350', startedAt: 1000, lastSeenAt: 1000 },
        ]);
        assert.equal(await store.touchController('controller-b', 3000), true);
        assert.equal(await store.touchController('controller-x', 3000), false, 'never registered');
        // A restarted controller registers again: new address, new start.
        await store.registerController('controller-a', '10.0.0.9:7350', 4000);
        assert.deepEqual((await store.listControllers()).sort(byId), [
          { id: 'controller-a', address: '10.0.0.9:7350', startedAt: 4000, lastSeenAt: 4000 },
          { id: 'controller-b', address: '10.0.0.2:7350', startedAt: 1000, lastSeenAt: 3000 },
        ]);
        assert.equal(await store.removeController('controller-b', 3000), false, 'seen at 3000, not before');
        assert.equal(await store.removeController('controller-b', 3001), true);
        assert.equal(await store.removeController('controller-b', 9999), false, 'already gone');
        assert.equal(await store.touchController('controller-b', 5000), false, 'a removed controller learns it was declared dead');
        assert.deepEqual(
          (await store.listControllers()).map((c) => c.id),
          ['controller-a'],
        );
      });
    });

    describe('operator tokens and the cluster secret', () => {
      const token = (id: string, role: OperatorTokenRecord['role'], createdAt: number): OperatorTokenRecord => ({
        id,
        tokenHash: `${id.padEnd(64, '0')}`.slice(0, 64),
        role,
        description: `${role} ${id}`,
        createdAt,
        lastUsedAt: null,
      });

      it('creates, finds by hash, lists oldest first, touches (never backwards) and deletes tokens', async () => {
        assert.deepEqual(await store.listOperatorTokens(), []);
        const reader = token('tok_0000000b', 'reader', 2000);
        const admin = token('tok_0000000a', 'admin', 1000);
        await store.createOperatorToken(reader);
        await store.createOperatorToken(admin);
        assert.deepEqual(await store.listOperatorTokens(), [admin, reader]);
        assert.deepEqual(await store.findOperatorTokenByHash(reader.tokenHash), reader);
        assert.equal(await store.findOperatorTokenByHash('f'.repeat(64)), undefined);

        await store.touchOperatorToken(reader.id, 5000);
        await store.touchOperatorToken(reader.id, 4000);
        await store.touchOperatorToken('tok_missing', 5000);
        assert.equal((await store.findOperatorTokenByHash(reader.tokenHash))?.lastUsedAt, 5000);

        assert.equal(await store.deleteOperatorToken(reader.id), true);
        assert.equal(await store.deleteOperatorToken(reader.id), false, 'already gone');
        assert.equal(await store.findOperatorTokenByHash(reader.tokenHash), undefined);
        assert.deepEqual(
          (await store.listOperatorTokens()).map((t) => t.id),
          [admin.id],
        );
      });

      it('refuses a second token with the same id or hash', async () => {
        const first = token('tok_00000001', 'admin', 1000);
        await store.createOperatorToken(first);
        await rejectsWithStatus(store.createOperatorToken({ ...first, tokenHash: 'e'.repeat(64) }), Status.ALREADY_EXISTS, /tok_00000001/);
        await rejectsWithStatus(store.createOperatorToken({ ...first, id: 'tok_00000002' }), Status.ALREADY_EXISTS, /already exists/);
        assert.equal((await store.listOperatorTokens()).length, 1);
      });

      it('makes the first token only once, even when several ask at the same moment', async () => {
        const results = await Promise.all(
          Array.from({ length: 5 }, (_, i) => store.createFirstOperatorToken(token(`tok_0000010${i}`, 'admin', 1000 + i))),
        );
        assert.equal(results.filter(Boolean).length, 1);
        assert.equal((await store.listOperatorTokens()).length, 1);
        assert.equal(await store.createFirstOperatorToken(token('tok_00000200', 'admin', 2000)), false);
      });

      it('keeps the first cluster secret it was given', async () => {
        const secrets = await Promise.all(['a', 'b', 'c'].map((s) => store.ensureClusterSecret(s.repeat(43))));
        assert.equal(new Set(secrets).size, 1, 'everyone agrees');
        assert.equal(await store.ensureClusterSecret('d'.repeat(43)), secrets[0]);
      });
    });

    describe('notifications', () => {
      it('delivers notifications to the listeners of their channel in this store, in order, until they stop', async () => {
        const due: string[] = [];
        const released: string[] = [];
        const firstDue = deferred();
        const done = deferred();
        const stopDue = store.listen('node_due', (payload) => {
          due.push(payload);
          firstDue.resolve();
        });
        const stopReleased = store.listen('lock_released', (payload) => released.push(payload));
        const stopMembership = store.listen('membership', () => done.resolve());
        await store.notify('node_due', 'node-1');
        await within(firstDue.promise, 'delivery on node_due');
        stopDue();
        await store.notify('node_due', 'node-2');
        await store.notify('lock_released', 'node-3');
        await store.notify('lock_released', 'node-4');
        await store.notify('membership', 'controller-a');
        await within(done.promise, 'delivery on membership');
        assert.deepEqual(due, ['node-1'], 'a stopped listener hears nothing more');
        assert.deepEqual(released, ['node-3', 'node-4']);
        stopReleased();
        stopMembership();
      });

      it('keeps delivering when a handler throws, and notify does not reject', async () => {
        const heard: string[] = [];
        const both = deferred();
        const stopBroken = store.listen('image_ready', () => {
          throw new Error('a bug in a handler');
        });
        const stopWorking = store.listen('image_ready', (payload) => {
          heard.push(payload);
          if (heard.length === 2) both.resolve();
        });
        await store.notify('image_ready', 'ubuntu');
        await store.notify('image_ready', 'debian');
        await within(both.promise, 'delivery of both notifications');
        assert.deepEqual(heard, ['ubuntu', 'debian']);
        stopBroken();
        stopWorking();
      });
    });
  });
}
