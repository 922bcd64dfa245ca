import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { ProvisionState } from '../../gen/metalcast/v1/node.js';
import { startTestController, type TestController } from '../helpers/controller.js';

describe('controller smoke', () => {
  let t: TestController;
  before(async () => {
    t = await startTestController();
  });
  after(async () => t.destroy());

  it('creates a node in enroll', async () => {
    const { node } = await t.nodes.createNode({ name: 'smoke-1', macAddresses: ['AA-BB-CC-DD-EE-10'] });
    assert.equal(node?.provisionState, ProvisionState.PROVISION_STATE_ENROLL);
    assert.deepEqual(node?.macAddresses, ['aa:bb:cc:dd:ee:10']);
  });
});
