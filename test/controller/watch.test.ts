import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { type Node, ProvisionAction, ProvisionState, type WatchNodesResponse } from '../../gen/metalcast/v1/node.js';
import { startTestController, type TestController } from '../helpers/controller.js';

describe('WatchNodes', () => {
  let t: TestController;
  before(async () => {
    t = await startTestController({ startupGrace: '600s' });
  });
  after(async () => t.destroy());

  it('streams the current nodes, then every transition with its event, and deletions, until cancelled', async () => {
    const { node: existing } = await t.nodes.createNode({ name: 'watch-1', macAddresses: ['02:cc:00:00:00:01'] });
    const other = await t.nodes.createNode({ name: 'watch-other', macAddresses: ['02:cc:00:00:00:02'] });
    const abort = new AbortController();
    const seen: WatchNodesResponse[] = [];
    let gotSnapshot: () => void = () => {};
    const snapshot = new Promise<void>((resolve) => {
      gotSnapshot = resolve;
    });
    const watching = (async () => {
      try {
        for await (const change of t.nodes.watchNodes({ nodes: ['watch-1'] }, { signal: abort.signal })) {
          seen.push(change);
          if (seen.length === 1) gotSnapshot();
          if (change.deleted) break;
        }
      } catch (error) {
        if (!abort.signal.aborted) throw error;
      }
    })();
    await snapshot;
    assert.equal(seen[0]?.node?.uuid, existing?.uuid, 'the snapshot comes first');

    await t.nodes.setProvisionState({ node: 'watch-1', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setProvisionState({ node: 'watch-other', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setProvisionState({ node: 'watch-1', action: ProvisionAction.PROVISION_ACTION_INSPECT });
    await t.nodes.setProvisionState({ node: 'watch-1', action: ProvisionAction.PROVISION_ACTION_ABORT });
    await t.nodes.setProvisionState({ node: 'watch-1', action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.deleteNode({ node: 'watch-1' });
    await watching;
    abort.abort();

    assert.ok(
      seen.every((c) => c.node?.uuid === existing?.uuid),
      `only the watched node: ${other.node?.name} never appears`,
    );
    const states = seen.slice(1).map((c) => (c.deleted ? 'deleted' : ProvisionState[(c.node as Node).provisionState]));
    assert.deepEqual(states, [
      'PROVISION_STATE_MANAGEABLE',
      'PROVISION_STATE_INSPECTING',
      'PROVISION_STATE_INSPECT_WAIT',
      'PROVISION_STATE_INSPECT_FAILED',
      'PROVISION_STATE_MANAGEABLE',
      'deleted',
    ]);
    assert.match(seen[4]?.event?.message ?? '', /inspect wait -> inspect failed: aborted by operator/);
  });
});
