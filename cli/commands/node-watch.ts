import type { CommandProgress } from '../../gen/metalcast/v1/command.js';
import type { Node, NodeServiceClient } from '../../gen/metalcast/v1/node.js';
import type { ProvisionState as StateName } from '../../controller/provisioning/states.js';
import { formatBytes, printTable } from '../output.js';
import { stateName } from '../node-format.js';

const BAR_WIDTH = 24;

/** write_image against a chunk manifest (docs/chunk-manifest.md): chunks on the disk already, fetched, fetched again. */
export function chunkCounts(progress: CommandProgress): string {
  if (progress.chunksTotal === 0) return '';
  const again = progress.chunksRefetched > 0 ? `, ${progress.chunksRefetched} again` : '';
  return ` chunks: ${progress.chunksSkipped} on disk, ${progress.chunksFetched} fetched${again} of ${progress.chunksTotal}`;
}

function bar(progress: CommandProgress | undefined): string {
  if (!progress || progress.totalBytes === 0) return progress?.phase ?? '';
  const fraction = Math.min(1, progress.doneBytes / progress.totalBytes);
  const filled = Math.round(fraction * BAR_WIDTH);
  const rate = progress.rateBytesPerSecond > 0 ? ` ${formatBytes(progress.rateBytesPerSecond)}/s` : '';
  const eta = progress.etaSeconds > 0 ? ` eta ${progress.etaSeconds}s` : '';
  const resumes = progress.resumes > 0 ? ` ${progress.resumes} resumes` : '';
  return `${'█'.repeat(filled)}${'░'.repeat(BAR_WIDTH - filled)} ${(fraction * 100).toFixed(0).padStart(3)}% ${progress.phase}${rate}${eta}${resumes}${chunkCounts(progress)}`;
}

/**
 * Follows WatchNodes: on a terminal, a table redrawn at most four times a
 * second; otherwise (or with --json) one line per change, for logs and scripts.
 */
export async function watchNodes(
  client: NodeServiceClient<{ deadline?: number }>,
  refs: string[],
  until: Set<StateName> | undefined,
  json: boolean,
  signal?: AbortSignal,
): Promise<Map<string, Node>> {
  const nodes = new Map<string, Node>();
  const live = process.stdout.isTTY && !json;
  let dirty = false;
  const draw = () => {
    if (!dirty) return;
    dirty = false;
    process.stdout.write('\x1b[H\x1b[2J');
    printTable(
      ['name', 'state', 'progress', 'last error'],
      [...nodes.values()]
        .sort((a, b) => a.name.localeCompare(b.name))
        .map((n) => [n.name, stateName(n.provisionState), n.progress && isBusy(n) ? bar(n.progress) : '', n.lastError.slice(0, 50)]),
    );
  };
  const timer = live ? setInterval(draw, 250) : undefined;
  /** The state last printed per node (uuid), without a terminal. */
  const printed = new Map<string, string>();
  const abort = new AbortController();
  const onSigint = () => abort.abort();
  process.once('SIGINT', onSigint);
  signal?.addEventListener('abort', onSigint, { once: true });
  try {
    for await (const change of client.watchNodes({ nodes: refs }, { deadline: undefined, signal: abort.signal })) {
      const node = change.node;
      if (!node) continue;
      if (change.deleted) nodes.delete(node.uuid);
      else nodes.set(node.uuid, node);
      if (json)
        process.stdout.write(`${JSON.stringify({ ...change, node: { ...node, provisionState: stateName(node.provisionState) } })}\n`);
      else if (!live) {
        // Without a terminal (logs, CI, pipes): a line per state change, never per progress update,
        // which printed some fifty lines of bars for one demo deploy.
        const state = stateName(node.provisionState);
        const detail = change.event ? change.event.message : printed.get(node.uuid) !== state ? state : undefined;
        printed.set(node.uuid, state);
        if (detail !== undefined) process.stdout.write(`${new Date().toISOString()} ${node.name} ${detail}\n`);
      }
      dirty = true;
      if (until && nodes.size > 0 && [...nodes.values()].every((n) => until.has(stateName(n.provisionState) as StateName))) break;
    }
  } catch (error) {
    if (!abort.signal.aborted) throw error;
  } finally {
    clearInterval(timer);
    process.off('SIGINT', onSigint);
    if (live) draw();
  }
  if (!live && !json && nodes.size > 1) process.stdout.write(`${summaryLine([...nodes.values()])}\n`);
  return nodes;
}

/** "5 nodes: 4 active, 1 deploy_failed": how a watch ended, for logs. */
export function summaryLine(nodes: Node[]): string {
  const counts = new Map<string, number>();
  for (const node of nodes) counts.set(stateName(node.provisionState), (counts.get(stateName(node.provisionState)) ?? 0) + 1);
  const parts = [...counts].sort(([a], [b]) => a.localeCompare(b)).map(([state, n]) => `${n} ${state}`);
  return `${nodes.length} node${nodes.length === 1 ? '' : 's'}: ${parts.join(', ')}`;
}

function isBusy(node: Node): boolean {
  const state = stateName(node.provisionState);
  return state.endsWith('wait') || state === 'deploying' || state === 'cleaning';
}
