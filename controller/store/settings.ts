/** A name -> value map with `set` applied, then `unset` removed: a node's properties or secrets after an update. */
export function applySettings(
  current: Readonly<Record<string, string>>,
  set: Readonly<Record<string, string>>,
  unset: readonly string[],
): Record<string, string> {
  const next: Record<string, string> = { ...current, ...set };
  for (const name of unset) delete next[name];
  return next;
}
