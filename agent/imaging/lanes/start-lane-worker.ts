import { Worker } from 'node:worker_threads';
import type { LaneSetup } from './lane-protocol.js';
import { laneWorkerScript } from './lane-worker-bundle.js';

/** Starts lane-worker.ts as a worker thread, however the agent runs (lane-worker-bundle.ts). */
export function startLaneWorker(setup: LaneSetup): Worker {
  const name = `image-lane-${setup.lane}`;
  const script = laneWorkerScript();
  if ('source' in script) return new Worker(script.source, { eval: true, workerData: setup, name });
  return new Worker(script.url, { workerData: setup, name, execArgv: script.execArgv });
}
