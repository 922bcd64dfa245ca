import { readFileSync } from 'node:fs';

/** The metalcast version, from package.json, reported by agents and the CLI. */
export const METALCAST_VERSION: string = (() => {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    // A bundled agent has no package.json beside it; the bundler injects the version instead.
    return process.env.METALCAST_BUILD_VERSION ?? 'unknown';
  }
})();
