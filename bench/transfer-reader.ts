/**
 * The flow-control-window probe of bench/transfer-chunks.ts, run as a child process:
 *
 *   node --import tsx bench/transfer-reader.ts '<json setup>'
 *
 * It is the agent's image path without the rest of the agent: the production
 * ControllerLink (with one extra channel option, 'grpc-node.flow_control_window',
 * through the constructor parameter meant for that), lookupWithBackoff, the
 * production controllerImageSource and writeImage, on a node the bench left
 * in deploy_wait with no agent running (so the controller's conductor never
 * acts on it and ReadImage lets this process read the deploy image).
 *
 * Logs JSON lines on stdout like the agent ('writing image; ...' and 'image
 * written and verified', whose timestamps the bench reads), then one
 * { type: 'result', ... } line.
 */
import pino from 'pino';
import { ControllerLink } from '../agent/controller/controller-link.js';
import type { HeartbeatIdentity } from '../agent/controller/heartbeat.js';
import { controllerImageSource } from '../agent/imaging/image-source.js';
import { DEFAULT_WRITE_OPTIONS } from '../agent/imaging/image-writer.js';
import { writeImage } from '../agent/imaging/write-image.js';
import { lookupWithBackoff } from '../agent/controller/lookup.js';
import { createLogger } from '../common/logging.js';

export interface ReaderSetup {
  controller: string;
  macs: string[];
  image: string;
  sha256: string;
  sizeBytes: number;
  devicePath: string;
  deviceSizeBytes: number;
  /** Bytes, or 0 to leave the production channel options as they are. */
  flowControlWindow: number;
}

const setup = JSON.parse(process.argv[2] ?? '{}') as ReaderSetup;
const logger = createLogger({ name: 'transfer-reader', level: 'info', destination: pino.destination({ fd: 1, sync: true }) });
const keepalive = { timeMs: 10_000, timeoutMs: 10_000 };
const extra: Record<string, number> = setup.flowControlWindow > 0 ? { 'grpc-node.flow_control_window': setup.flowControlWindow } : {};
const link = new ControllerLink([setup.controller], keepalive, logger.child({ component: 'controller-link' }), extra);
const stop = new AbortController();
try {
  const answer = await lookupWithBackoff(
    link,
    { macAddresses: setup.macs, systemSerial: '', systemUuid: '', agentVersion: 'bench-transfer-reader' },
    { backoffStartMs: 100, backoffMaxMs: 500, budgetMs: 30_000, callTimeoutMs: 10_000 },
    logger,
    stop.signal,
  );
  const identity: HeartbeatIdentity = { nodeUuid: answer.nodeUuid, token: answer.agentToken };
  const source = controllerImageSource(link, () => identity, 30_000);
  const result = await writeImage(
    source,
    {
      image: setup.image,
      devicePath: setup.devicePath,
      deviceSizeBytes: setup.deviceSizeBytes,
      expectedSha256: setup.sha256,
      expectedSizeBytes: setup.sizeBytes,
    },
    { ...DEFAULT_WRITE_OPTIONS, maxAttempts: 1 },
    () => {},
    stop.signal,
    logger,
  );
  process.stdout.write(`${JSON.stringify({ type: 'result', ok: true, sha256: result.sha256, resumes: result.resumes })}\n`);
} catch (error) {
  process.stdout.write(`${JSON.stringify({ type: 'result', ok: false, error: (error as Error).message })}\n`);
  process.exitCode = 1;
} finally {
  link.close();
}
