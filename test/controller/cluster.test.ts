import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { HashRing } from '../../controller/cluster/hash-ring.js';
import { PostgresStore } from '../../controller/store/postgres.js';
import { type Node, type NodeEvent, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { type AgentProcess, spawnAgent } from '../helpers/agent-process.js';
import { eventually, tempDir } from '../helpers/controller.js';
import { type ControllerProcess, freePort, spawnController } from '../helpers/controller-process.js';
import { type FakeMachine, uniqueFakeMachine } from '../helpers/fake-machine.js';
import { makeImageContent, readDiskStart, seedImage, seedImageBlob, sha256 } from '../helpers/images.js';
import { postgresSchema, postgresSkipReason } from '../helpers/postgres.js';

const MIB = 1024 * 1024;
const NODES = 30;
const IDS = ['c0', 'c1', 'c2'];
const TOUCH_MS = 500;
const DEAD_AFTER_MS = 3000;
/** A survivor notices the death at its first refresh after dead-after; the slack covers a loaded CI machine. */
const TAKEOVER_WINDOW_MS = DEAD_AFTER_MS + TOUCH_MS + 2500;
const TERMINAL = new Set([ProvisionState.PROVISION_STATE_ACTIVE, ProvisionState.PROVISION_STATE_DEPLOY_FAILED]);

/**
 * Checks that no two controllers drove a node at once: a step opens with
 * 'step_started' by a controller and closes with its 'step_ended', or when
 * a survivor released the dead controller's lock ('lock_released'). A step
 * started while another is open is an overlap.
 */
function overlaps(events: NodeEvent[]): string[] {
  const problems: string[] = [];
  let open: { actor: string; id: number } | undefined;
  for (const event of events) {
    if (event.kind === 'step_started') {
      if (open) problems.push(`event ${event.id}: ${event.actor} started a step while ${open.actor}'s (event ${open.id}) was open`);
      open = { actor: event.actor, id: event.id };
    } else if (event.kind === 'step_ended' && open?.actor === event.actor) {
      open = undefined;
    } else if (event.kind === 'lock_released' && open && event.message.includes(`lock of ${open.actor} `)) {
      open = undefined;
    }
  }
  return problems;
}

describe('three controllers sharing one PostgreSQL database', { skip: await postgresSkipReason() }, () => {
  const dirs = tempDir('metalcast-cluster-');
  const agents: AgentProcess[] = [];
  const controllers: (ControllerProcess | undefined)[] = [];
  let schema: Awaited<ReturnType<typeof postgresSchema>>;
  let store: PostgresStore;
  const flagsOf: Record<string, string>[] = [];

  before(async () => {
    schema = await postgresSchema();
    store = await PostgresStore.open(schema.url);
  });
  after(async () => {
    await Promise.all(agents.map((a) => a.kill('SIGKILL')));
    await Promise.all(controllers.map((c) => c?.kill('SIGKILL')));
    await store?.close();
    await schema?.drop();
    dirs.remove();
  });

  const alive = () => controllers.filter((c): c is ControllerProcess => c !== undefined);
  const nodeState = async (name: string): Promise<Node | undefined> => (await alive()[0]?.nodes.getNode({ node: name }))?.node;
  const eventsOf = async (name: string) => (await (alive()[0] as ControllerProcess).nodes.listNodeEvents({ node: name })).events;

  async function waitForAll(states: Set<ProvisionState>, what: string, timeoutMs: number): Promise<Node[]> {
    let last: (Node | undefined)[] = [];
    try {
      return await eventually(
        async () => {
          last = await Promise.all(Array.from({ length: NODES }, (_, i) => nodeState(`n${i}`)));
          return last.every((n) => n && states.has(n.provisionState)) ? (last as Node[]) : undefined;
        },
        { timeoutMs, intervalMs: 250, what },
      );
    } catch (error) {
      // Say which nodes are stuck and what their agents and the controllers logged about them:
      // a failure here is otherwise one line with nothing to go on.
      const stuck = last.flatMap((n, i) => (n && states.has(n.provisionState) ? [] : [i]));
      const report = stuck.map((i) => {
        const node = last[i];
        const agentTail = (agents[i]?.logs ?? []).slice(-12).map((l) => JSON.stringify(l));
        const controllerLines = alive()
          .flatMap((c) => c.logs)
          .filter((l) => l.nodeName === `n${i}` || (node && (l.node === node.uuid || l.nodeUuid === node.uuid)))
          .slice(-12)
          .map((l) => JSON.stringify(l));
        return [
          `n${i}: ${node ? `${ProvisionState[node.provisionState]} (${node.lastError || 'no error'})` : 'not found'}`,
          '  agent:',
          ...agentTail.map((l) => `    ${l}`),
          '  controllers:',
          ...controllerLines.map((l) => `    ${l}`),
        ].join('\n');
      });
      throw new Error(`${(error as Error).message}; stuck: ${stuck.map((i) => `n${i}`).join(', ')}\n${report.join('\n')}`);
    }
  }

  it('deploys 30 nodes, survives a kill -9 of one controller mid-deploy without overlaps, and takes the restarted one back into the ring', {
    timeout: 300_000,
  }, async (ctx) => {
    const started = Date.now();
    const mark = (what: string) => ctx.diagnostic(`${((Date.now() - started) / 1000).toFixed(1)}s: ${what}`);
    // One image, its content on every controller (replication has its own test), its row in the shared database.
    const content = makeImageContent(16 * MIB, 7);
    const image = await seedImage(join(dirs.path, 'c0'), 'os', [content], store);
    for (const id of IDS.slice(1)) await seedImageBlob(join(dirs.path, id), [content]);

    const ports = await Promise.all(IDS.map(() => freePort()));
    for (const [i, id] of IDS.entries()) {
      flagsOf[i] = {
        database: schema.url,
        'data-dir': join(dirs.path, id),
        'controller-id': id,
        listen: `127.0.0.1:${ports[i]}`,
        'controller-touch-interval': `${TOUCH_MS}ms`,
        'controller-dead-after': `${DEAD_AFTER_MS}ms`,
        'heartbeat-timeout': '20s',
        'heartbeat-interval-min': '300ms',
        'heartbeat-interval-max': '600ms',
        'sweep-interval': '500ms',
        'heartbeat-flush-interval': '50ms',
        'image-chunk-size': '256K',
        'max-image-transfers': '4',
        'transfer-stall-timeout': '2s',
        // Keepalive stays at its default: a kill -9 closes the sockets, and 1 s pings would drop the
        // test's own connections while it is busy starting 30 agents.
      };
      controllers[i] = await spawnController(flagsOf[i] as Record<string, string>);
    }
    const addresses = ports.map((p) => `127.0.0.1:${p}`).join(',');
    const machines: FakeMachine[] = await Promise.all(
      Array.from({ length: NODES }, (_, i) => uniqueFakeMachine(join(dirs.path, `m${i}`), 700 + i)),
    );
    for (const machine of machines) agents.push(spawnAgent({ controller: addresses, root: machine.root, 'log-level': 'info' }));
    // Thirty agent processes take many seconds to start on a small CI machine. A node enrolled before its
    // agent runs would count that start-up against its 20 s heartbeat timeout and fail its cleaning: wait
    // until every agent is up and looking, as a booted ramdisk would be.
    await Promise.all(agents.map((agent) => agent.waitForLog((l) => l.msg === 'agent API listening', 120_000)));
    mark('every agent started');

    // Enrol through every controller in turn, then make them available through real cleaning.
    for (const [i, machine] of machines.entries()) {
      const nodes = (controllers[i % 3] as ControllerProcess).nodes;
      await nodes.createNode({ name: `n${i}`, macAddresses: [machine.macs[0] as string] });
      await nodes.setProvisionState({ node: `n${i}`, action: ProvisionAction.PROVISION_ACTION_MANAGE });
      await nodes.setProvisionState({ node: `n${i}`, action: ProvisionAction.PROVISION_ACTION_PROVIDE });
    }
    await waitForAll(new Set([ProvisionState.PROVISION_STATE_AVAILABLE]), 'every node available', 90_000);
    mark('every node available');
    for (const [i, controller] of controllers.entries()) {
      const streams = (controller as ControllerProcess).logs.filter((l) => l.msg === 'heartbeat stream opened').length;
      assert.ok(streams > 0, `agents reached controller ${IDS[i]} too (the fleet spreads over the list)`);
    }

    for (let i = 0; i < NODES; i++) {
      await (controllers[i % 3] as ControllerProcess).nodes.setProvisionState({
        node: `n${i}`,
        action: ProvisionAction.PROVISION_ACTION_DEPLOY,
        deploy: { image: 'os', target: undefined },
      });
    }
    // The victim: the controller driving the most deploys right now.
    const victimId = await eventually(
      async () => {
        const waiting = await store.listNodes({ provisionState: 'deploy_wait', limit: 100 });
        const counts = new Map<string, number>();
        for (const node of waiting) if (node.reservation) counts.set(node.reservation, (counts.get(node.reservation) ?? 0) + 1);
        const [best] = [...counts.entries()].sort((a, b) => b[1] - a[1]);
        return best && best[1] >= 2 ? best[0] : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 100, what: 'a controller driving at least two deploys' },
    );
    const victim = IDS.indexOf(victimId);
    mark(`killing ${victimId} mid-deploy`);
    const killedAt = Date.now();
    await (controllers[victim] as ControllerProcess).kill('SIGKILL');
    controllers[victim] = undefined;

    // A survivor takes the dead controller's nodes over within the window.
    const takeover = await eventually(
      () =>
        alive()
          .flatMap((c) => c.logs)
          .find((l) => l.msg === 'took over a dead controller' && l.deadController === victimId),
      { timeoutMs: TAKEOVER_WINDOW_MS + 5000, intervalMs: 100, what: `a survivor to take over ${victimId}` },
    );
    const tookMs = Date.parse(takeover.time as string) - killedAt;
    assert.ok(tookMs <= TAKEOVER_WINDOW_MS, `taken over after ${tookMs} ms; the window is ${TAKEOVER_WINDOW_MS} ms`);
    mark(
      `${takeover.controllerId ?? 'a survivor'} took ${victimId} over after ${tookMs} ms: ${JSON.stringify(takeover.failedNodes)} failed`,
    );

    const finals = await waitForAll(TERMINAL, 'every node active or deploy failed', 120_000);
    mark('every node active or deploy failed');
    for (const [i, node] of finals.entries()) {
      if (node.provisionState === ProvisionState.PROVISION_STATE_ACTIVE) {
        const disk = await readDiskStart((machines[i] as FakeMachine).disks[0]?.path as string, image.size);
        assert.equal(sha256(disk), image.sha256, `n${i} is active and its disk holds the image`);
      } else {
        assert.notEqual(node.lastError, '', `n${i} failed with a reason`);
      }
    }
    // The owner lets go of the lock just after the last transition.
    await eventually(async () => (await store.listNodes({ limit: 1000 })).every((n) => n.reservation === null), {
      what: 'every lock released after the deploys',
    });
    // Deploys the dead controller was following resume under their new owner; only a node it left
    // between two steps (deploying, the instant after the write) is failed, naming the dead controller.
    const failed = finals.filter((n) => n.provisionState !== ProvisionState.PROVISION_STATE_ACTIVE);
    for (const node of failed) assert.match(node.lastError, new RegExp(`controller ${victimId} stopped .* taken over by`), node.name);
    assert.ok(failed.length <= 2, `at most the nodes caught between two steps fail: ${failed.map((n) => `${n.name}: ${n.lastError}`)}`);
    mark(`${NODES - failed.length} active, ${failed.length} failed by the takeover`);
    for (let i = 0; i < NODES; i++) assert.deepEqual(overlaps(await eventsOf(`n${i}`)), [], `n${i}'s history`);

    // The victim comes back under its id and rejoins the ring.
    controllers[victim] = await spawnController(flagsOf[victim] as Record<string, string>);
    await eventually(
      () =>
        alive().every((c) => {
          const rings = c.logs.filter((l) => l.msg === 'controller ring changed' || l.msg === 'controller started');
          const members = (rings.at(-1)?.members ?? rings.at(-1)?.controllers) as string[] | undefined;
          return members?.length === 3;
        }),
      { timeoutMs: 10_000, what: 'every controller to see three members' },
    );
    mark(`${victimId} rejoined`);

    // It takes its share back: each node's cleaning is driven by its owner on the ring of three.
    for (let i = 0; i < NODES; i++) {
      await (controllers[i % 3] as ControllerProcess).nodes.setProvisionState({
        node: `n${i}`,
        action: ProvisionAction.PROVISION_ACTION_UNDEPLOY,
      });
    }
    await waitForAll(new Set([ProvisionState.PROVISION_STATE_AVAILABLE]), 'every node cleaned and available', 90_000);
    mark('every node cleaned');
    const ring = new HashRing(IDS);
    const drivers = new Map<string, number>();
    for (const node of finals) {
      const events = await eventsOf(node.name);
      const lastClean = events.filter((e) => e.kind === 'step_started' && e.message.startsWith('clean ')).at(-1);
      assert.ok(lastClean, `${node.name} was cleaned by a controller`);
      assert.equal(lastClean.actor, ring.ownerOf(node.uuid), `${node.name}'s cleaning was driven by its owner`);
      drivers.set(lastClean.actor, (drivers.get(lastClean.actor) ?? 0) + 1);
      assert.deepEqual(overlaps(events), [], `${node.name}'s history`);
    }
    assert.ok((drivers.get(victimId) ?? 0) > 0, `the restarted ${victimId} drove its share (${JSON.stringify([...drivers])})`);
    const leftovers = await store.listNodes({ limit: 1000 });
    assert.deepEqual(
      leftovers.filter((n) => n.reservation !== null).map((n) => n.name),
      [],
      'no lock is left',
    );
  });
});
