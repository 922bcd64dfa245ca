import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root: profile places are shown relative to it. */
const REPO = fileURLToPath(new URL('../..', import.meta.url));

// ---------------------------------------------------------------------------
// CPU profiles (--cpu-prof): self time by function and by package or file.

export interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

export interface ProfileSummary {
  totalMs: number;
  functions: { name: string; ms: number }[];
  places: { name: string; ms: number }[];
}

export function summarizeProfiles(dir: string): ProfileSummary | undefined {
  let files: string[];
  try {
    files = readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'));
  } catch {
    return undefined;
  }
  if (files.length === 0) return undefined;
  const byFunction = new Map<string, number>();
  const byPlace = new Map<string, number>();
  let totalMs = 0;
  for (const file of files) {
    const profile = JSON.parse(readFileSync(join(dir, file), 'utf8')) as {
      nodes: ProfileNode[];
      samples: number[];
      timeDeltas: number[];
      startTime: number;
      endTime: number;
    };
    const sampleMs = (profile.endTime - profile.startTime) / 1000 / Math.max(1, profile.samples.length);
    totalMs += (profile.endTime - profile.startTime) / 1000;
    for (const node of profile.nodes) {
      const hits = node.hitCount ?? 0;
      if (hits === 0) continue;
      const { functionName, url, lineNumber } = node.callFrame;
      const where = placeOf(url);
      // Line numbers of our .ts files are those of tsx's output, not of the source: left out.
      const line = where === '' || where.endsWith('.ts') ? '' : `:${lineNumber + 1}`;
      const name = `${functionName || '(anonymous)'} ${where}${line}`.trim();
      byFunction.set(name, (byFunction.get(name) ?? 0) + hits * sampleMs);
      const place = where || functionName;
      byPlace.set(place, (byPlace.get(place) ?? 0) + hits * sampleMs);
    }
  }
  const top = (m: Map<string, number>, n: number) =>
    [...m]
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([name, value]) => ({ name, ms: value }));
  return { totalMs, functions: top(byFunction, 25), places: top(byPlace, 15) };
}

/** A package name for node_modules, a repository path for our files, node:… for Node's own. */
export function placeOf(url: string): string {
  if (url === '') return '';
  const path = url.startsWith('file://') ? fileURLToPath(url) : url;
  const modules = path.lastIndexOf('node_modules/');
  if (modules >= 0) {
    const parts = path.slice(modules + 'node_modules/'.length).split('/');
    return parts[0]!.startsWith('@') ? `${parts[0]}/${parts[1]}` : parts[0]!;
  }
  if (path.startsWith(REPO)) return relative(REPO, path);
  return path;
}
