/**
 * Where the lane worker's code comes from. From the sources and from
 * `npm run build`'s dist/: the lane-worker file beside this module (through
 * tsx from the sources: bin/metalcast.js registers tsx in its own thread
 * only). In the packaged agent, the bundle's esbuild plugin
 * (scripts/package-agent.ts) replaces this module with one that returns the
 * bundled lane-worker.ts as a string, because a one-file agent (or its
 * single executable) has no file beside it to start.
 */
export function laneWorkerScript(): { source: string } | { url: URL; execArgv: string[] | undefined } {
  const fromSources = import.meta.url.endsWith('.ts');
  return {
    url: new URL('./lane-worker.js', import.meta.url),
    execArgv: fromSources ? ['--import', import.meta.resolve('tsx')] : undefined,
  };
}
