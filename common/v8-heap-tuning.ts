import { setFlagsFromString } from 'node:v8';

/**
 * Makes V8 count memory outside its heap (ArrayBuffers) towards its global
 * heap limit, instead of starting a full collection each time a few dozen
 * MiB of it have been allocated since the last one.
 *
 * Node's HTTP/2 hands every TLS record it decrypts (16 KiB) to JavaScript
 * as a new ArrayBuffer, so a GiB received over gRPC is 65,536 short-lived
 * buffers that V8 only sees as outside memory. With V8's default, that set
 * off a full mark-compact every ~25 MiB on the controller during an upload
 * (37 per GiB, 1.6–1.8 CPU-s of marking threads); with this flag 14–15, and
 * 0.7 CPU-s (bench/transfer.ts, docs/transfer.md). The buffers still die
 * young and are still freed; the limit is still a limit.
 *
 * Set at start-up, before any transfer: V8 reads the flag whenever it
 * recomputes its limits. Called by every entry point (cli/main.ts,
 * cli/agent-entry.ts).
 */
export function tuneHeapForBulkTransfers(): void {
  setFlagsFromString('--external-memory-accounted-in-global-limit');
}
