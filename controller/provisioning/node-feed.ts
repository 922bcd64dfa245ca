import { EventEmitter, on } from 'node:events';
import type { CommandProgress } from '../../gen/metalcast/v1/command.js';
import type { NodeEventRecord, NodeRecord } from '../store/store.js';

/** One change to a node, as WatchNodes streams it. */
export interface NodeChange {
  node: NodeRecord;
  event?: NodeEventRecord | undefined;
  /** Progress of the agent's command, for progress-only updates. */
  progress?: CommandProgress | undefined;
  deleted?: boolean;
}

/**
 * In-process feed of node changes: transitions, timeouts, progress and
 * deletions. WatchNodes subscribes to it; publishers never wait for
 * watchers (a slow watcher's buffer is bounded by the stream, see WatchNodes).
 */
export class NodeFeed {
  private readonly emitter = new EventEmitter();
  private relay: ((change: NodeChange) => void) | undefined;

  constructor() {
    this.emitter.setMaxListeners(0);
  }

  /** A change made by this controller: to local watchers, and on to the other controllers. */
  publish(change: NodeChange): void {
    this.emitter.emit('change', change);
    if (change.progress === undefined) this.relay?.(change);
  }

  /** A change another controller made (see controller/cluster/feed-relay.ts): local watchers only. */
  publishRelayed(change: NodeChange): void {
    this.emitter.emit('change', change);
  }

  /** Where changes made here go besides local watchers. */
  relayTo(relay: (change: NodeChange) => void): void {
    this.relay = relay;
  }

  /** Changes from now on until the signal aborts. */
  subscribe(signal: AbortSignal): AsyncIterable<NodeChange> {
    const iterator = on(this.emitter, 'change', { signal }) as AsyncIterableIterator<[NodeChange]>;
    return {
      async *[Symbol.asyncIterator]() {
        for await (const [change] of iterator) yield change;
      },
    };
  }

  get watchers(): number {
    return this.emitter.listenerCount('change');
  }
}
