import type { PowerStatusRecord } from './store.js';

/** A node_power row, from either dialect, as a PowerStatusRecord. */
export function powerStatusFromRow(row: Record<string, unknown>): PowerStatusRecord {
  const state = row.power_state;
  return {
    powerState: state === 'on' || state === 'off' ? state : '',
    checkedAt: row.checked_at === null || row.checked_at === undefined ? null : Number(row.checked_at),
    failures: Number(row.failures),
    error: String(row.error ?? ''),
  };
}
