import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Status } from 'nice-grpc';
import { ACTION_TRANSITIONS, PROVISION_ACTIONS, PROVISION_STATES, type ProvisionState } from '../../controller/provisioning/states.js';
import { ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { stateToProto } from '../../controller/services/convert.js';
import { startTestController, type TestController } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';
import { addImage, makeImageContent } from '../helpers/images.js';

/** Where each action is expected to leave a node right away (before any agent shows up). */
const SETTLES_IN: Partial<Record<string, ProvisionState>> = {
  manage: 'manageable',
  provide: 'clean_wait',
  inspect: 'inspect_wait',
  deploy: 'deploy_wait',
  undeploy: 'clean_wait',
};

describe('every action from every state', () => {
  let t: TestController;
  let counter = 0;
  before(async () => {
    t = await startTestController({ startupGrace: '600s' });
    await addImage(t.controller, 'tiny', makeImageContent(1024 * 1024));
  });
  after(async () => t.destroy());

  /** A node put straight into `state` (the store is the only way to reach every state without agents). */
  async function nodeIn(state: ProvisionState): Promise<string> {
    counter++;
    const mac = `02:aa:00:00:${(counter >> 8).toString(16).padStart(2, '0')}:${(counter & 0xff).toString(16).padStart(2, '0')}`;
    const { node } = await t.nodes.createNode({ name: `sm-${counter}`, macAddresses: [mac] });
    const uuid = node?.uuid as string;
    if (state !== 'enroll') {
      const moved = await t.controller.store.transition(uuid, {
        from: ['enroll'],
        to: state,
        target: null,
        keepAgentToken: false,
        event: { kind: 'test', message: `test put the node in ${state}`, actor: 'test', fromState: 'enroll', toState: state },
      });
      assert.ok(moved);
    }
    return uuid;
  }

  for (const state of PROVISION_STATES) {
    for (const action of PROVISION_ACTIONS) {
      const allowed = ACTION_TRANSITIONS[action][state] !== undefined;
      it(`${action} from ${state} ${allowed ? 'succeeds' : 'is refused with FAILED_PRECONDITION'}`, async () => {
        const uuid = await nodeIn(state);
        const request = {
          node: uuid,
          action: ProvisionAction[`PROVISION_ACTION_${action.toUpperCase()}` as keyof typeof ProvisionAction],
          deploy: action === 'deploy' ? { image: 'tiny', target: undefined } : undefined,
        };
        if (!allowed) {
          await assertRejectsWith(
            t.nodes.setProvisionState(request),
            Status.FAILED_PRECONDITION,
            new RegExp(
              `cannot ${action} node 'sm-\\d+' in state ${state.replaceAll('_', ' ')}; allowed from ${state.replaceAll('_', ' ')}: `,
            ),
          );
          assert.equal((await t.nodes.getNode({ node: uuid })).node?.provisionState, stateToProto(state), 'the node did not move');
          return;
        }
        const { node } = await t.nodes.setProvisionState(request);
        const expected = action === 'abort' ? ACTION_TRANSITIONS.abort[state]?.to : SETTLES_IN[action];
        assert.equal(node?.provisionState, stateToProto(expected as ProvisionState));
        const events = (await t.nodes.listNodeEvents({ node: uuid })).events;
        assert.equal(events.at(-1)?.toState, stateToProto(expected as ProvisionState), 'the transition is in the history');
        assert.ok(
          events.some((e) => e.actor === 'operator' && e.kind === 'transition'),
          'the operator is named as the cause',
        );
      });
    }
  }

  it('refuses actions on a node in maintenance, except abort', async () => {
    const uuid = await nodeIn('manageable');
    await t.nodes.setMaintenance({ node: uuid, enabled: true, reason: 'bad DIMM' });
    await assertRejectsWith(
      t.nodes.setProvisionState({ node: uuid, action: ProvisionAction.PROVISION_ACTION_INSPECT }),
      Status.FAILED_PRECONDITION,
      /in maintenance \(bad DIMM\)/,
    );
  });

  it('refuses an unspecified action with INVALID_ARGUMENT', async () => {
    const uuid = await nodeIn('manageable');
    await assertRejectsWith(
      t.nodes.setProvisionState({ node: uuid, action: ProvisionAction.PROVISION_ACTION_UNSPECIFIED }),
      Status.INVALID_ARGUMENT,
      /action: must be one of/,
    );
  });
});
