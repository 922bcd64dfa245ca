import type { ChannelOptions } from '@grpc/grpc-js';
// Makes servers honour 'grpc-node.flow_control_window' too, and lets ReadImage chunks go out without copies.
import './grpc-wire.js';

/** Keepalive settings, in milliseconds. */
export interface KeepaliveOptions {
  /** Interval between pings on an otherwise quiet connection. */
  timeMs: number;
  /** How long a ping may go unanswered before the connection is dropped. */
  timeoutMs: number;
}

/** HTTP/2 receive window of every stream and connection, both directions. */
export const FLOW_CONTROL_WINDOW_BYTES = 16 * 1024 * 1024;

/**
 * What both ends of every connection set. Keepalive is off by default in
 * grpc-js: without it a controller never notices an agent whose link died
 * without FIN or RST, nor an agent a dead controller. The receive window
 * matters for every bulk stream, downloads and uploads alike: grpc-js stalls
 * on the default 64 KiB window (GRPC-NOTES.md; bench transfer). 16 MiB keeps
 * four 3.5 MiB chunks in flight, so a scheduling delay on a busy host does not
 * stop the sender (one chunk in flight made transfers latency-bound); it is
 * also what one connection can pin in the receiver's memory. Servers honour it
 * through common/grpc-wire.ts (grpc-js itself applies it to clients only).
 */
function sharedChannelOptions(keepalive: KeepaliveOptions, maxMessageBytes: number): ChannelOptions {
  return {
    'grpc.keepalive_time_ms': keepalive.timeMs,
    'grpc.keepalive_timeout_ms': keepalive.timeoutMs,
    'grpc.keepalive_permit_without_calls': 1,
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW_BYTES,
  };
}

/**
 * Server options (controller, agent). `maxReceiveBytes` (default: `maxMessageBytes`) caps every request
 * message at the transport, before it is buffered: a server that takes only small requests (the agent's)
 * sets it low, while its responses may still be large.
 */
export function serverChannelOptions(
  keepalive: KeepaliveOptions,
  maxMessageBytes = 8 * 1024 * 1024,
  maxReceiveBytes = maxMessageBytes,
): ChannelOptions {
  return { ...sharedChannelOptions(keepalive, maxMessageBytes), 'grpc.max_receive_message_length': maxReceiveBytes };
}

/** Client options for long-lived channels (agent to controller, controller to agent, CLI to controller). */
export function clientChannelOptions(keepalive: KeepaliveOptions, maxMessageBytes = 8 * 1024 * 1024): ChannelOptions {
  return {
    ...sharedChannelOptions(keepalive, maxMessageBytes),
    // Reconnect promptly after a controller restart; our own code adds the jitter.
    'grpc.initial_reconnect_backoff_ms': 1000,
    'grpc.max_reconnect_backoff_ms': 10_000,
  };
}
