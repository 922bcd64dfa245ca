import { ProvisionState } from '../gen/metalcast/v1/node.js';

/** A provision state as the CLI prints it: `deploy_wait`, or `-` when unset. */
export const stateName = (state: ProvisionState) =>
  state === ProvisionState.PROVISION_STATE_UNSPECIFIED
    ? '-'
    : (ProvisionState[state] ?? String(state)).replace('PROVISION_STATE_', '').toLowerCase();
