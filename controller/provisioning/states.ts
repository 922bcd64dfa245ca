/**
 * The provisioning state machine of DESIGN.md as data: every state, every
 * operator action and where it leads. The API, the CLI's help and the docs
 * read this table; nothing else decides what is allowed.
 */
export const PROVISION_STATES = [
  'enroll',
  'manageable',
  'inspecting',
  'inspect_wait',
  'inspect_failed',
  'cleaning',
  'clean_wait',
  'clean_failed',
  'available',
  'deploying',
  'deploy_wait',
  'deploy_failed',
  'active',
  'deleting',
] as const;
export type ProvisionState = (typeof PROVISION_STATES)[number];

export const PROVISION_ACTIONS = ['manage', 'provide', 'inspect', 'deploy', 'undeploy', 'abort'] as const;
export type ProvisionAction = (typeof PROVISION_ACTIONS)[number];

/** Wait states, each with the failed state the sweep moves a silent node to. */
export const WAIT_STATE_FAILURES = {
  inspect_wait: 'inspect_failed',
  clean_wait: 'clean_failed',
  deploy_wait: 'deploy_failed',
} as const satisfies Partial<Record<ProvisionState, ProvisionState>>;
export type WaitState = keyof typeof WAIT_STATE_FAILURES;
export const WAIT_STATES = Object.keys(WAIT_STATE_FAILURES) as WaitState[];

/**
 * Working states a controller passes through while it holds the node's
 * lock, each with the failed state a node left in it by a controller that
 * died is moved to (a crash between two steps of an action).
 */
export const ACTIVE_STATE_FAILURES = {
  inspecting: 'inspect_failed',
  cleaning: 'clean_failed',
  deploying: 'deploy_failed',
  deleting: 'clean_failed',
} as const satisfies Partial<Record<ProvisionState, ProvisionState>>;
export type ActiveState = keyof typeof ACTIVE_STATE_FAILURES;

/** States in which an agent is expected: lookups succeed only here. */
export const AGENT_STATES: readonly ProvisionState[] = ['inspecting', 'inspect_wait', 'cleaning', 'clean_wait', 'deploying', 'deploy_wait'];

/** A transition an operator action starts: from a state, through an optional working state. */
export interface ActionTransition {
  /** The state the node enters at once. */
  to: ProvisionState;
  /** Where the operation is heading when it succeeds. */
  target: ProvisionState;
}

/** For each action, the states it is allowed from and where it goes. */
export const ACTION_TRANSITIONS: Record<ProvisionAction, Partial<Record<ProvisionState, ActionTransition>>> = {
  manage: {
    enroll: { to: 'manageable', target: 'manageable' },
    inspect_failed: { to: 'manageable', target: 'manageable' },
    clean_failed: { to: 'manageable', target: 'manageable' },
  },
  provide: {
    manageable: { to: 'cleaning', target: 'available' },
  },
  inspect: {
    manageable: { to: 'inspecting', target: 'manageable' },
  },
  deploy: {
    available: { to: 'deploying', target: 'active' },
  },
  undeploy: {
    active: { to: 'deleting', target: 'available' },
    deploy_failed: { to: 'deleting', target: 'available' },
  },
  abort: {
    inspect_wait: { to: 'inspect_failed', target: 'manageable' },
    clean_wait: { to: 'clean_failed', target: 'available' },
    deploy_wait: { to: 'deploy_failed', target: 'active' },
  },
};

/** Actions allowed from a state, for error messages and help. */
export function allowedActions(state: ProvisionState): ProvisionAction[] {
  return PROVISION_ACTIONS.filter((action) => ACTION_TRANSITIONS[action][state] !== undefined);
}

export function isWaitState(state: ProvisionState): state is WaitState {
  return state in WAIT_STATE_FAILURES;
}

export function isAgentState(state: ProvisionState): boolean {
  return AGENT_STATES.includes(state);
}
