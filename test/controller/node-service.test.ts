import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc-common';
import { ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode } from '../helpers/agent-client.js';
import { startTestController, type TestController } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

const { PROVISION_ACTION_ABORT, PROVISION_ACTION_DEPLOY, PROVISION_ACTION_INSPECT, PROVISION_ACTION_MANAGE, PROVISION_ACTION_PROVIDE } =
  ProvisionAction;

describe('NodeService', () => {
  let t: TestController;
  before(async () => {
    // Default timeouts: nothing here waits for an agent, and nothing should time out under the tests.
    t = await startTestController();
  });
  after(async () => t.destroy());

  const list = (request: { provisionState?: ProvisionState; maintenance?: boolean; pageSize?: number; pageToken?: string }) =>
    t.nodes.listNodes({ provisionState: ProvisionState.PROVISION_STATE_UNSPECIFIED, pageSize: 0, pageToken: '', ...request });

  describe('create and get', () => {
    it('creates a node in enroll with normalised MACs and properties, and gets it by uuid and by name', async () => {
      const { node } = await t.nodes.createNode({
        name: 'ns-create',
        macAddresses: ['02-00-00-00-51-0B', '02:00:00:00:51:0a'],
        properties: { rack: 'r1', 'cpu/arch': 'x86_64' },
      });
      assert.match(node!.uuid, /^[0-9a-f-]{36}$/);
      assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_ENROLL);
      assert.deepEqual(node?.macAddresses, ['02:00:00:00:51:0a', '02:00:00:00:51:0b']);
      assert.deepEqual(node?.properties, { rack: 'r1', 'cpu/arch': 'x86_64' });
      assert.equal(node?.maintenance, false);
      assert.ok(node?.createdAt instanceof Date);
      assert.deepEqual((await t.nodes.getNode({ node: node!.uuid })).node, node);
      assert.deepEqual((await t.nodes.getNode({ node: 'ns-create' })).node, node);
    });

    it('refuses a MAC that another node owns with ALREADY_EXISTS naming the MAC and its owner', async () => {
      await t.nodes.createNode({ name: 'ns-owner', macAddresses: ['02:00:00:00:52:01'] });
      await assertRejectsWith(
        t.nodes.createNode({ name: 'ns-second', macAddresses: ['02:00:00:00:52:02', '02-00-00-00-52-01'] }),
        Status.ALREADY_EXISTS,
        /MAC address 02:00:00:00:52:01 already belongs to node 'ns-owner'/,
      );
      await assertRejectsWith(t.nodes.getNode({ node: 'ns-second' }), Status.NOT_FOUND);
      await assertRejectsWith(
        t.nodes.createNode({ name: 'ns-owner', macAddresses: ['02:00:00:00:52:03'] }),
        Status.ALREADY_EXISTS,
        /a node named 'ns-owner' already exists/,
      );
    });

    it('refuses malformed input with INVALID_ARGUMENT naming the field and the value', async () => {
      await assertRejectsWith(
        t.nodes.createNode({ name: 'ns-bad-mac', macAddresses: ['zz:11'] }),
        Status.INVALID_ARGUMENT,
        /mac_addresses: MAC address 'zz:11' is not of the form aa:bb:cc:dd:ee:ff/,
      );
      await assertRejectsWith(t.nodes.createNode({ name: 'ns-no-mac', macAddresses: [] }), Status.INVALID_ARGUMENT, /at least one MAC/);
      await assertRejectsWith(
        t.nodes.createNode({ name: '-bad name', macAddresses: ['02:00:00:00:53:01'] }),
        Status.INVALID_ARGUMENT,
        /name: '-bad name' is not a valid node name/,
      );
      await assertRejectsWith(
        t.nodes.createNode({ name: 'ns-bad-prop', macAddresses: ['02:00:00:00:53:02'], properties: { 'bad key': 'x' } }),
        Status.INVALID_ARGUMENT,
        /properties: key 'bad key'/,
      );
      await assertRejectsWith(t.nodes.getNode({ node: '' }), Status.INVALID_ARGUMENT, /node: a node uuid or name is required/);
    });

    it('answers NOT_FOUND for an unknown node', async () => {
      await assertRejectsWith(t.nodes.getNode({ node: 'ns-nobody' }), Status.NOT_FOUND, /node 'ns-nobody' not found/);
      await assertRejectsWith(t.nodes.getNode({ node: '00000000-0000-4000-8000-000000000000' }), Status.NOT_FOUND);
    });
  });

  describe('list', () => {
    before(async () => {
      // Seven nodes under the prefix ls-, created out of name order.
      for (const i of [4, 1, 6, 3, 7, 2, 5]) {
        await t.nodes.createNode({ name: `ls-${i}`, macAddresses: [`02:00:00:00:54:0${i}`] });
      }
      await t.nodes.setProvisionState({ node: 'ls-2', action: PROVISION_ACTION_MANAGE });
      await t.nodes.setProvisionState({ node: 'ls-5', action: PROVISION_ACTION_MANAGE });
      await t.nodes.setMaintenance({ node: 'ls-5', enabled: true, reason: 'list test' });
      await t.nodes.setMaintenance({ node: 'ls-6', enabled: true, reason: 'list test' });
    });
    const names = (nodes: { name: string }[]) => nodes.map((n) => n.name).filter((n) => n.startsWith('ls-'));

    it('pages through every node in name order with page tokens', async () => {
      const seen: string[] = [];
      let pageToken = '';
      let pages = 0;
      do {
        const page = await list({ pageSize: 3, pageToken });
        assert.ok(page.nodes.length <= 3);
        seen.push(...page.nodes.map((n) => n.name));
        pageToken = page.nextPageToken;
        pages++;
        assert.ok(pages < 20, 'pagination ends');
      } while (pageToken !== '');
      assert.deepEqual(seen, [...seen].sort(), 'name order');
      assert.equal(new Set(seen).size, seen.length, 'no node twice');
      assert.deepEqual(names(seen.map((name) => ({ name }))), ['ls-1', 'ls-2', 'ls-3', 'ls-4', 'ls-5', 'ls-6', 'ls-7']);
      const all = (await list({})).nodes;
      assert.equal(seen.length, all.length);
    });

    it('filters by provision state and by maintenance, and pages within a filter', async () => {
      assert.deepEqual(names((await list({ provisionState: ProvisionState.PROVISION_STATE_MANAGEABLE })).nodes), ['ls-2', 'ls-5']);
      assert.deepEqual(names((await list({ maintenance: true })).nodes), ['ls-5', 'ls-6']);
      assert.deepEqual(names((await list({ maintenance: false })).nodes), ['ls-1', 'ls-2', 'ls-3', 'ls-4', 'ls-7']);
      assert.deepEqual(names((await list({ provisionState: ProvisionState.PROVISION_STATE_MANAGEABLE, maintenance: false })).nodes), [
        'ls-2',
      ]);
      const first = await list({ provisionState: ProvisionState.PROVISION_STATE_MANAGEABLE, pageSize: 1 });
      assert.deepEqual(names(first.nodes), ['ls-2']);
      assert.notEqual(first.nextPageToken, '');
      const second = await list({ provisionState: ProvisionState.PROVISION_STATE_MANAGEABLE, pageSize: 1, pageToken: first.nextPageToken });
      assert.deepEqual(names(second.nodes), ['ls-5']);
      assert.equal(second.nextPageToken, '', 'the last page says so');
    });

    it('refuses a page token it did not issue and an oversized page', async () => {
      await assertRejectsWith(list({ pageToken: 'not-a-token' }), Status.INVALID_ARGUMENT, /page_token/);
      await assertRejectsWith(list({ pageSize: 1001 }), Status.INVALID_ARGUMENT, /page_size: at most 1000, got 1001/);
    });
  });

  describe('delete', () => {
    it('refuses to delete a node waiting for its agent with FAILED_PRECONDITION, and deletes it once aborted', async () => {
      const node = await createWaitingNode(t.nodes, 'ns-delete', ['02:00:00:00:55:01']);
      await assertRejectsWith(
        t.nodes.deleteNode({ node: node.uuid }),
        Status.FAILED_PRECONDITION,
        /node 'ns-delete' is inspect wait; delete is allowed only in .*manageable/,
      );
      assert.equal((await t.nodes.getNode({ node: node.uuid })).node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
      await t.nodes.setProvisionState({ node: node.uuid, action: PROVISION_ACTION_ABORT });
      await t.nodes.deleteNode({ node: node.uuid });
      await assertRejectsWith(t.nodes.getNode({ node: node.uuid }), Status.NOT_FOUND);
      await assertRejectsWith(t.nodes.deleteNode({ node: node.uuid }), Status.NOT_FOUND);
      // Its MAC is free for a new node.
      await t.nodes.createNode({ name: 'ns-delete-2', macAddresses: ['02:00:00:00:55:01'] });
    });

    it('refuses to delete a node another operation holds locked', async () => {
      const { node } = await t.nodes.createNode({ name: 'ns-locked', macAddresses: ['02:00:00:00:55:02'] });
      assert.ok(await t.controller.store.tryLock(node!.uuid, 'another-controller', 'deploy'));
      await assertRejectsWith(
        t.nodes.deleteNode({ node: node!.uuid }),
        Status.FAILED_PRECONDITION,
        /locked by another-controller for deploy/,
      );
      assert.ok((await t.nodes.getNode({ node: node!.uuid })).node);
      assert.ok(await t.controller.store.unlock(node!.uuid, 'another-controller'));
      await t.nodes.deleteNode({ node: node!.uuid });
    });
  });

  describe('ports', () => {
    it('adds and removes ports, refusing a MAC in use and the last port', async () => {
      await t.nodes.createNode({ name: 'ns-ports-other', macAddresses: ['02:00:00:00:56:09'] });
      const { node } = await t.nodes.createNode({ name: 'ns-ports', macAddresses: ['02:00:00:00:56:01'] });
      const added = await t.nodes.addNodePort({ node: 'ns-ports', macAddress: '02-00-00-00-56-02' });
      assert.deepEqual(added.node?.macAddresses, ['02:00:00:00:56:01', '02:00:00:00:56:02']);
      await assertRejectsWith(
        t.nodes.addNodePort({ node: 'ns-ports', macAddress: '02:00:00:00:56:09' }),
        Status.ALREADY_EXISTS,
        /02:00:00:00:56:09 already belongs to node 'ns-ports-other'/,
      );
      await assertRejectsWith(t.nodes.addNodePort({ node: 'ns-ports', macAddress: 'nope' }), Status.INVALID_ARGUMENT, /'nope'/);
      const removed = await t.nodes.removeNodePort({ node: node!.uuid, macAddress: '02:00:00:00:56:01' });
      assert.deepEqual(removed.node?.macAddresses, ['02:00:00:00:56:02']);
      await assertRejectsWith(
        t.nodes.removeNodePort({ node: node!.uuid, macAddress: '02:00:00:00:56:02' }),
        Status.FAILED_PRECONDITION,
        /last port/,
      );
    });
  });

  describe('maintenance', () => {
    it('requires a reason to turn maintenance on, keeps it while on, and clears it when off', async () => {
      const { node } = await t.nodes.createNode({ name: 'ns-maint', macAddresses: ['02:00:00:00:57:01'] });
      await assertRejectsWith(
        t.nodes.setMaintenance({ node: node!.uuid, enabled: true, reason: '' }),
        Status.INVALID_ARGUMENT,
        /reason: required when turning maintenance on/,
      );
      await assertRejectsWith(
        t.nodes.setMaintenance({ node: node!.uuid, enabled: true, reason: '   ' }),
        Status.INVALID_ARGUMENT,
        /reason/,
      );
      await assertRejectsWith(
        t.nodes.setMaintenance({ node: node!.uuid, enabled: true, reason: 'x'.repeat(256) }),
        Status.INVALID_ARGUMENT,
        /reason: at most 255 characters/,
      );
      assert.equal((await t.nodes.getNode({ node: node!.uuid })).node?.maintenance, false);

      const on = await t.nodes.setMaintenance({ node: node!.uuid, enabled: true, reason: '  replacing PSU ' });
      assert.equal(on.node?.maintenance, true);
      assert.equal(on.node?.maintenanceReason, 'replacing PSU');
      // Operator actions wait until maintenance is over.
      await assertRejectsWith(
        t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_MANAGE }),
        Status.FAILED_PRECONDITION,
        /in maintenance \(replacing PSU\); take it out of maintenance first/,
      );
      const off = await t.nodes.setMaintenance({ node: node!.uuid, enabled: false, reason: '' });
      assert.equal(off.node?.maintenance, false);
      assert.equal(off.node?.maintenanceReason, '');
      await t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_MANAGE });
    });
  });

  describe('provision actions', () => {
    it('refuses an action from the wrong state with FAILED_PRECONDITION naming the state and the allowed actions', async () => {
      const { node } = await t.nodes.createNode({ name: 'ns-actions', macAddresses: ['02:00:00:00:58:01'] });
      await assertRejectsWith(
        t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_PROVIDE }),
        Status.FAILED_PRECONDITION,
        /cannot provide node 'ns-actions' in state enroll; allowed from enroll: manage$/,
      );
      await assertRejectsWith(
        t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_INSPECT }),
        Status.FAILED_PRECONDITION,
        /cannot inspect node 'ns-actions' in state enroll; allowed from enroll: manage$/,
      );
      await t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_MANAGE });
      await assertRejectsWith(
        t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_MANAGE }),
        Status.FAILED_PRECONDITION,
        /cannot manage node 'ns-actions' in state manageable; allowed from manageable: provide, inspect$/,
      );
      await t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_INSPECT });
      await assertRejectsWith(
        t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_DEPLOY, deploy: { image: 'ubuntu' } }),
        Status.FAILED_PRECONDITION,
        /cannot deploy node 'ns-actions' in state inspect wait; allowed from inspect wait: abort$/,
      );
      assert.equal((await t.nodes.getNode({ node: node!.uuid })).node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
      await assertRejectsWith(
        t.nodes.setProvisionState({ node: node!.uuid, action: ProvisionAction.PROVISION_ACTION_UNSPECIFIED }),
        Status.INVALID_ARGUMENT,
        /action: must be one of/,
      );
    });

    it('inspects into inspect wait and aborts into inspect failed with the reason in last_error', async () => {
      const { node } = await t.nodes.createNode({ name: 'ns-abort', macAddresses: ['02:00:00:00:58:02'] });
      const managed = await t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_MANAGE });
      assert.equal(managed.node?.provisionState, ProvisionState.PROVISION_STATE_MANAGEABLE);
      const inspecting = await t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_INSPECT });
      assert.equal(inspecting.node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_WAIT);
      assert.equal(inspecting.node?.targetProvisionState, ProvisionState.PROVISION_STATE_MANAGEABLE);
      const aborted = await t.nodes.setProvisionState({ node: node!.uuid, action: PROVISION_ACTION_ABORT });
      assert.equal(aborted.node?.provisionState, ProvisionState.PROVISION_STATE_INSPECT_FAILED);
      assert.equal(aborted.node?.targetProvisionState, ProvisionState.PROVISION_STATE_UNSPECIFIED);
      assert.equal(aborted.node?.lastError, 'aborted by operator while in inspect wait');
    });
  });

  describe('events', () => {
    it('lists a node’s events oldest first, in pages', async () => {
      const node = await createWaitingNode(t.nodes, 'ns-events', ['02:00:00:00:59:01']);
      await t.nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'events test' });

      const { events: all, nextPageToken: none } = await t.nodes.listNodeEvents({ node: node.uuid, pageSize: 0, pageToken: '' });
      assert.equal(none, '');
      assert.deepEqual(
        all.map((e) => [e.kind, e.fromState, e.toState]),
        [
          ['created', ProvisionState.PROVISION_STATE_UNSPECIFIED, ProvisionState.PROVISION_STATE_ENROLL],
          ['transition', ProvisionState.PROVISION_STATE_ENROLL, ProvisionState.PROVISION_STATE_MANAGEABLE],
          ['transition', ProvisionState.PROVISION_STATE_MANAGEABLE, ProvisionState.PROVISION_STATE_INSPECTING],
          ['transition', ProvisionState.PROVISION_STATE_INSPECTING, ProvisionState.PROVISION_STATE_INSPECT_WAIT],
          ['maintenance', ProvisionState.PROVISION_STATE_UNSPECIFIED, ProvisionState.PROVISION_STATE_UNSPECIFIED],
        ],
      );
      assert.equal(all[0]?.message, 'enrolled with MACs 02:00:00:00:59:01');
      assert.equal(all[0]?.actor, 'operator');
      assert.equal(all[3]?.actor, 'test-controller');
      assert.equal(all[4]?.message, 'maintenance on: events test');
      assert.ok(all.every((e, i) => i === 0 || e.id > (all[i - 1]?.id ?? 0)));
      assert.ok(all.every((e, i) => i === 0 || (e.time?.getTime() ?? 0) >= (all[i - 1]?.time?.getTime() ?? 0)));

      const paged = [];
      let pageToken = '';
      do {
        const page = await t.nodes.listNodeEvents({ node: 'ns-events', pageSize: 2, pageToken });
        assert.ok(page.events.length <= 2);
        paged.push(...page.events);
        pageToken = page.nextPageToken;
      } while (pageToken !== '');
      assert.deepEqual(paged, all);
      await assertRejectsWith(t.nodes.listNodeEvents({ node: 'ns-nobody', pageSize: 0, pageToken: '' }), Status.NOT_FOUND);
    });
  });
});
