/**
 * A worker process of the heartbeats benchmark (bench/heartbeats/heartbeats.ts): runs
 * many simulated agents, each with one Heartbeat stream to the controller,
 * spread over a few HTTP/2 connections, and measures each heartbeat from
 * the write to its ack.
 *
 * The agents are thin on purpose: plain grpc-js calls with the generated
 * codec, one timer per agent, no agent code (HeartbeatLoop, ControllerLink),
 * so that as much of the machine as possible is left to the controller.
 * Like a real agent, each sends its first heartbeat when the stream opens
 * and the next one after the interval the controller's ack asks for; unlike
 * one, the wait after the first ack is U(0, 1) x that interval, so that a
 * fleet that connected together is at once in the steady state of a fleet
 * that has been running for hours (beats spread evenly over the interval).
 * 'speed' divides every interval by a factor (phase 2 of the benchmark).
 */
import { Client, type ClientDuplexStream, credentials, Metadata, type StatusObject, status } from '@grpc/grpc-js';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { NODE_UUID_KEY } from '../../common/agent-metadata.js';
import { clientChannelOptions } from '../../common/grpc-options.js';
import { AgentStatus, HeartbeatRequest, HeartbeatResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import {
  type HeartbeatsParentMessage,
  type HeartbeatsWorkerMessage,
  type HeartbeatsWorkerSetup,
  LATENCY_BUCKETS,
  latencyBucket,
} from './protocol.js';

const METHOD = '/metalcast.v1.AgentGatewayService/Heartbeat';
const AGENT_VERSION = 'metalcast-bench-heartbeats/1';
const PROGRESS_INTERVAL_MS = 250;
const ACK_CHECK_INTERVAL_MS = 1000;
/** An unanswered heartbeat older than this at the end of a window is reported as late. */
const LATE_ACK_MS = 1000;
/** The shortest wait between heartbeats, whatever the speedup. */
const MIN_INTERVAL_MS = 5;
/** The event-loop monitor's sampling interval; it records whole intervals, so this is subtracted. */
const LOOP_RESOLUTION_MS = 1;

type Call = ClientDuplexStream<HeartbeatRequest, HeartbeatResponse>;

/**
 * What every agent reports (fromPartial: fields the proto gains later stay at their defaults).
 * No agent address, so the controller could not call these agents; no certificate, so no pinning
 * write on a stream's first heartbeat (a real agent sends its certificate there).
 */
const HEARTBEAT = HeartbeatRequest.fromPartial({ agentAddress: '', agentVersion: AGENT_VERSION, status: AgentStatus.AGENT_STATUS_IDLE });

interface Agent {
  uuid: string;
  token: string;
  client: Client;
  call: Call | undefined;
  sequence: number;
  /** performance.now() when the unanswered heartbeat was written; 0 when none is outstanding. */
  sentAt: number;
  established: boolean;
  everConnected: boolean;
  timer: NodeJS.Timeout | undefined;
  /** performance.now() when the next heartbeat is due (while a timer runs). */
  nextAt: number;
}

const serialize = (request: HeartbeatRequest): Buffer => {
  const bytes = HeartbeatRequest.encode(request).finish();
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
};
const deserialize = (bytes: Buffer): HeartbeatResponse => HeartbeatResponse.decode(bytes);

function send(message: HeartbeatsWorkerMessage): void {
  // With a callback, a parent that went away is not an 'error' event; 'disconnect' handles it.
  if (process.connected) process.send?.(message, undefined, {}, () => {});
}

class Fleet {
  private readonly agents: Agent[];
  private readonly clients: Client[];
  private speedup = 1;
  private stopping = false;
  private goAt = 0;
  private connected = 0;
  private everConnected = 0;
  private lastFirstAckAt = 0;
  private readonly connectHistogram = new Array<number>(LATENCY_BUCKETS).fill(0);
  private readonly totalErrors: Record<string, number> = {};
  private progressDirty = false;
  // The current window.
  private recording = false;
  private histogram = new Array<number>(LATENCY_BUCKETS).fill(0);
  private acks = 0;
  private maxMs = 0;
  private windowErrors: Record<string, number> = {};
  private readonly loop = monitorEventLoopDelay({ resolution: LOOP_RESOLUTION_MS });
  private readonly timers: NodeJS.Timeout[] = [];

  constructor(private readonly setup: HeartbeatsWorkerSetup) {
    const keepalive = { timeMs: setup.keepaliveTimeMs, timeoutMs: setup.keepaliveTimeoutMs };
    // grpc-js shares one connection between channels whose options are equal: a distinct option per channel keeps them apart.
    this.clients = Array.from(
      { length: setup.channels },
      (_, group) =>
        new Client(setup.controller, credentials.createInsecure(), {
          ...clientChannelOptions(keepalive),
          'metalcast.connection_group': group,
        }),
    );
    this.agents = setup.agents.map(([uuid, token], i) => ({
      uuid,
      token,
      client: this.clients[i % setup.channels]!,
      call: undefined,
      sequence: 0,
      sentAt: 0,
      established: false,
      everConnected: false,
      timer: undefined,
      nextAt: 0,
    }));
    this.loop.enable();
  }

  go(speedup: number): void {
    this.speedup = speedup;
    this.goAt = Date.now();
    for (const agent of this.agents) this.open(agent);
    this.timers.push(setInterval(() => this.checkAcks(), ACK_CHECK_INTERVAL_MS));
    this.timers.push(setInterval(() => this.reportProgress(), PROGRESS_INTERVAL_MS));
  }

  /** Every interval from now on is divided by `speedup`; waits already running shrink or grow to match. */
  setSpeed(speedup: number): void {
    const ratio = this.speedup / speedup;
    this.speedup = speedup;
    const now = performance.now();
    for (const agent of this.agents) {
      if (!agent.timer) continue;
      this.schedule(agent, Math.max(0, agent.nextAt - now) * ratio);
    }
  }

  startWindow(): void {
    this.histogram = new Array<number>(LATENCY_BUCKETS).fill(0);
    this.acks = 0;
    this.maxMs = 0;
    this.windowErrors = {};
    this.loop.reset();
    this.recording = true;
  }

  endWindow(id: number): void {
    this.recording = false;
    const now = performance.now();
    let lateAcks = 0;
    for (const agent of this.agents) if (agent.sentAt > 0 && now - agent.sentAt > LATE_ACK_MS) lateAcks++;
    send({
      type: 'window',
      id,
      acks: this.acks,
      histogram: this.histogram,
      maxMs: this.maxMs,
      errors: this.windowErrors,
      lateAcks,
      connected: this.connected,
      loopP99Ms: Math.max(0, this.loop.percentile(99) / 1e6 - LOOP_RESOLUTION_MS),
      loopMaxMs: Math.max(0, this.loop.max / 1e6 - LOOP_RESOLUTION_MS),
    });
  }

  async stop(): Promise<void> {
    this.stopping = true;
    for (const timer of this.timers) clearInterval(timer);
    for (const agent of this.agents) {
      clearTimeout(agent.timer);
      const call = agent.call;
      agent.call = undefined;
      call?.cancel();
    }
    for (const client of this.clients) client.close();
    this.reportProgress();
  }

  private open(agent: Agent): void {
    if (this.stopping) return;
    const metadata = new Metadata();
    metadata.set(NODE_UUID_KEY, agent.uuid);
    metadata.set('authorization', `Bearer ${agent.token}`);
    const call = agent.client.makeBidiStreamRequest(METHOD, serialize, deserialize, metadata, {});
    agent.call = call;
    agent.sequence = 0;
    agent.established = false;
    call.on('data', (ack: HeartbeatResponse) => {
      if (agent.call === call) this.onAck(agent, ack);
    });
    // Every call ends with exactly one status; errors are counted there.
    call.on('error', () => {});
    call.on('status', (s: StatusObject) => {
      if (agent.call === call) this.onEnd(agent, s.code === status.OK ? 'ended-ok' : (status[s.code] ?? String(s.code)));
    });
    this.write(agent);
  }

  private write(agent: Agent): void {
    agent.timer = undefined;
    if (!agent.call) return;
    agent.sequence += 1;
    agent.sentAt = performance.now();
    agent.call.write({ ...HEARTBEAT, sequence: agent.sequence });
  }

  private onAck(agent: Agent, ack: HeartbeatResponse): void {
    if (agent.sentAt === 0 || ack.sequence !== agent.sequence) return;
    const latencyMs = performance.now() - agent.sentAt;
    agent.sentAt = 0;
    if (this.recording) {
      this.acks++;
      this.histogram[latencyBucket(latencyMs)]!++;
      if (latencyMs > this.maxMs) this.maxMs = latencyMs;
    }
    let waitMs = ack.nextIntervalMs;
    if (!agent.established) {
      agent.established = true;
      this.connected++;
      this.progressDirty = true;
      if (!agent.everConnected) {
        agent.everConnected = true;
        this.everConnected++;
        this.lastFirstAckAt = Date.now();
        this.connectHistogram[latencyBucket(this.lastFirstAckAt - this.goAt)]!++;
      }
      // A random phase, so that the fleet beats evenly spread from the start (see the header).
      waitMs *= Math.random();
    }
    this.schedule(agent, waitMs / this.speedup);
  }

  private schedule(agent: Agent, waitMs: number): void {
    clearTimeout(agent.timer);
    const wait = Math.max(MIN_INTERVAL_MS, waitMs);
    agent.nextAt = performance.now() + wait;
    agent.timer = setTimeout(() => this.write(agent), wait);
  }

  private onEnd(agent: Agent, reason: string): void {
    clearTimeout(agent.timer);
    agent.timer = undefined;
    agent.call = undefined;
    agent.sentAt = 0;
    if (agent.established) {
      agent.established = false;
      this.connected--;
    }
    this.countError(reason);
    if (this.stopping) return;
    const delay = this.setup.reconnectDelayMs * (1 + Math.random());
    agent.timer = setTimeout(() => this.open(agent), delay);
  }

  private countError(reason: string): void {
    this.totalErrors[reason] = (this.totalErrors[reason] ?? 0) + 1;
    if (this.recording) this.windowErrors[reason] = (this.windowErrors[reason] ?? 0) + 1;
    this.progressDirty = true;
  }

  /** A controller that is alive but does not answer: counted, and the stream reopened, as an agent would. */
  private checkAcks(): void {
    const now = performance.now();
    for (const agent of this.agents) {
      if (agent.sentAt === 0 || now - agent.sentAt < this.setup.ackTimeoutMs) continue;
      const call = agent.call;
      this.onEnd(agent, 'ack-timeout');
      call?.cancel();
    }
  }

  private reportProgress(): void {
    if (!this.progressDirty) return;
    this.progressDirty = false;
    send({
      type: 'progress',
      connected: this.connected,
      everConnected: this.everConnected,
      lastFirstAckAt: this.lastFirstAckAt,
      connectHistogram: this.connectHistogram,
      errors: this.totalErrors,
    });
  }
}

function main(): void {
  if (!process.send) {
    console.error('heartbeats-worker runs under bench/heartbeats/heartbeats.ts (it needs an IPC channel)');
    process.exit(2);
  }
  let fleet: Fleet | undefined;
  let stopping = false;
  process.on('message', (message: HeartbeatsParentMessage) => {
    switch (message.type) {
      case 'setup': {
        const lifetime = message.maxLifetimeMs;
        setTimeout(() => {
          console.error(`heartbeats-worker ${process.pid}: lifetime of ${lifetime} ms exceeded; exiting`);
          process.exit(3);
        }, lifetime).unref();
        fleet = new Fleet(message);
        send({ type: 'ready' });
        break;
      }
      case 'go':
        fleet?.go(message.speedup);
        break;
      case 'speed':
        fleet?.setSpeed(message.speedup);
        break;
      case 'window-start':
        fleet?.startWindow();
        break;
      case 'window-end':
        fleet?.endWindow(message.id);
        break;
      case 'stop':
        stopping = true;
        void fleet?.stop().finally(() => {
          send({ type: 'stopped' });
          process.disconnect();
          // Cancelled calls and closed channels let the loop empty; this is the bound if they do not.
          setTimeout(() => process.exit(0), 5000).unref();
        });
        break;
    }
  });
  // The parent went away: nothing left to report to.
  process.on('disconnect', () => {
    if (!stopping) process.exit(1);
  });
}

main();
