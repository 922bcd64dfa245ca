/**
 * A worker process of the herd benchmark (bench/herd.ts): runs many
 * simulated agents on the real agent code paths (lookupWithBackoff, then a
 * HeartbeatLoop, each agent with its own ControllerLink) and reports what
 * they do, with timestamps, to the parent over IPC.
 *
 * Agents spread over `groups` HTTP/2 connections: grpc-js shares one
 * connection between channels whose options are equal, so agent i gets the
 * extra channel option `metalcast.connection_group: i % groups`.
 *
 * The only instrumentation is a ControllerLink subclass whose gateway
 * wraps the two calls an agent makes: it records each lookup call and each
 * heartbeat stream opened, and the first ack on a stream ("established").
 * Nothing of the agent's own logic (delays, jitter, backoff) is replaced.
 */
import { ControllerLink } from '../agent/controller/controller-link.js';
import { HeartbeatLoop, type HeartbeatIdentity } from '../agent/controller/heartbeat.js';
import { lookupWithBackoff } from '../agent/controller/lookup.js';
import { createLogger, type Logger } from '../common/logging.js';
import { AgentStatus, type HeartbeatResponse } from '../gen/metalcast/v1/agent_gateway.js';
import { EVENT, type HerdEvent, type ParentMessage, type WorkerMessage, type WorkerSetup } from './herd-protocol.js';

const FLUSH_INTERVAL_MS = 200;
const AGENT_VERSION = 'metalcast-bench-herd/1';

type Gateway = ControllerLink['gateway'];

let pending: HerdEvent[] = [];
const emit = (code: number, agent: number) => pending.push([code, agent, Date.now()]);

function send(message: WorkerMessage): void {
  // With a callback, a parent that went away is not an 'error' event; 'disconnect' handles it.
  if (process.connected) process.send?.(message, undefined, {}, () => {});
}

function flush(): void {
  if (pending.length === 0) return;
  send({ type: 'events', events: pending });
  pending = [];
}

/** A ControllerLink whose gateway reports each lookup and heartbeat stream of agent `index`. */
class ObservedLink extends ControllerLink {
  private observed: { inner: Gateway; outer: Gateway } | undefined;

  constructor(
    private readonly agentIndex: number,
    ...rest: ConstructorParameters<typeof ControllerLink>
  ) {
    super(...rest);
  }

  override get gateway(): Gateway {
    const inner = super.gateway;
    if (this.observed?.inner !== inner) this.observed = { inner, outer: observe(inner, this.agentIndex) };
    return this.observed.outer;
  }
}

function observe(inner: Gateway, index: number): Gateway {
  const lookup: Gateway['lookup'] = async (request, options) => {
    emit(EVENT.lookupAttempt, index);
    try {
      const answer = await inner.lookup(request, options);
      emit(EVENT.lookupOk, index);
      return answer;
    } catch (error) {
      emit(EVENT.lookupFailed, index);
      throw error;
    }
  };
  const heartbeat: Gateway['heartbeat'] = (requests, options) => {
    emit(EVENT.streamAttempt, index);
    return watchStream(inner.heartbeat(requests, options), index);
  };
  return { ...inner, lookup, heartbeat };
}

async function* watchStream(source: AsyncIterable<HeartbeatResponse>, index: number): AsyncGenerator<HeartbeatResponse, void, undefined> {
  let established = false;
  try {
    for await (const ack of source) {
      if (!established) {
        established = true;
        emit(EVENT.streamEstablished, index);
      }
      yield ack;
    }
  } finally {
    emit(established ? EVENT.streamDropped : EVENT.streamFailed, index);
  }
}

interface Agent {
  index: number;
  link: ObservedLink;
  loop: HeartbeatLoop | undefined;
  done: Promise<void> | undefined;
}

function startAgent(agent: Agent, mac: string, setup: WorkerSetup, logger: Logger, signal: AbortSignal): Promise<void> {
  let identity: HeartbeatIdentity | undefined;
  const lookupOptions = {
    backoffStartMs: setup.lookupBackoffStartMs,
    backoffMaxMs: setup.lookupBackoffMaxMs,
    budgetMs: setup.lookupBudgetMs,
    callTimeoutMs: setup.callTimeoutMs,
    jitter: setup.jitter,
  };
  const lookup = async () => {
    const answer = await lookupWithBackoff(
      agent.link,
      { macAddresses: [mac], systemSerial: '', systemUuid: '', agentVersion: AGENT_VERSION },
      lookupOptions,
      logger,
      signal,
    );
    identity = { nodeUuid: answer.nodeUuid, token: answer.agentToken };
  };
  return (async () => {
    await lookup();
    if (signal.aborted) return;
    agent.loop = new HeartbeatLoop(
      agent.link,
      () => identity as HeartbeatIdentity,
      // No agent address: the controller could not call these agents even if it wanted to.
      () => ({ agentAddress: '', agentVersion: AGENT_VERSION, status: AgentStatus.AGENT_STATUS_IDLE, command: undefined }),
      lookup,
      {
        reconnectDelayMs: setup.reconnectDelayMs,
        minGapMs: setup.minHeartbeatGapMs,
        ackTimeoutMs: setup.callTimeoutMs,
        jitter: setup.jitter,
      },
      logger,
    );
    await agent.loop.start();
  })();
}

function main(): void {
  if (!process.send) {
    console.error('herd-worker runs under bench/herd.ts (it needs an IPC channel)');
    process.exit(2);
  }
  // Silent: the agents' own logs would cost more than what is measured.
  const logger = createLogger({ name: 'herd-agent', level: 'silent' });
  const stopping = new AbortController();
  let setup: WorkerSetup | undefined;
  let agents: { agent: Agent; mac: string }[] = [];
  const flushTimer = setInterval(flush, FLUSH_INTERVAL_MS);

  const stop = async () => {
    stopping.abort();
    await Promise.allSettled(agents.map(({ agent }) => agent.loop?.stop()));
    await Promise.allSettled(agents.map(({ agent }) => agent.done));
    for (const { agent } of agents) agent.link.close();
    clearInterval(flushTimer);
    flush();
    send({ type: 'stopped' });
    process.disconnect();
  };

  process.on('message', (message: ParentMessage) => {
    switch (message.type) {
      case 'setup': {
        const s = message;
        setup = s;
        setTimeout(() => {
          console.error(`herd-worker ${process.pid}: lifetime of ${s.maxLifetimeMs} ms exceeded; exiting`);
          process.exit(3);
        }, s.maxLifetimeMs).unref();
        const keepalive = { timeMs: s.keepaliveTimeMs, timeoutMs: s.keepaliveTimeoutMs };
        agents = s.agents.map(({ index, mac }) => ({
          mac,
          agent: {
            index,
            link: new ObservedLink(index, [s.controller], keepalive, logger, { 'metalcast.connection_group': index % s.groups }),
            loop: undefined,
            done: undefined,
          },
        }));
        send({ type: 'ready' });
        break;
      }
      case 'go': {
        if (!setup) throw new Error('go before setup');
        for (const { agent, mac } of agents) {
          agent.done = startAgent(agent, mac, setup, logger, stopping.signal).catch((error: unknown) => {
            if (!stopping.signal.aborted) send({ type: 'agent-failed', index: agent.index, message: String(error) });
          });
        }
        break;
      }
      case 'stop':
        void stop();
        break;
    }
  });
  // The parent went away: nothing left to report to.
  process.on('disconnect', () => {
    if (!stopping.signal.aborted) process.exit(1);
  });
}

main();
