import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, beforeEach, describe, it } from 'node:test';
import { Registry } from 'prom-client';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { createControllerMetrics } from '../../controller/observability/metrics.js';
import { PowerDrivers } from '../../controller/power/drivers.js';
import { FakePowerDriver } from '../../controller/power/fake.js';
import type { PowerDriver } from '../../controller/power/power-driver.js';
import { BMC_UNREACHABLE, PowerSync } from '../../controller/power/sync.js';
import { ringHash } from '../../controller/cluster/hash-ring.js';
import { metricValue, scrapeMetrics, tempDir, testLogger } from '../helpers/controller.js';

/*
 * The power sync with fake drivers on a real controller and store: it
 * records each node's power state, raises an event and a metric when the
 * state differs from what the controller last knew, puts a node whose BMC
 * failed N reads in a row into maintenance as "BMC unreachable" and reads it
 * less often, takes it out when the BMC answers, reads only the nodes of its
 * share that nobody holds, spreads the reads over the interval with bounded
 * concurrency, and never waits on a hung BMC past its read timeout.
 */
describe('power state sync', () => {
  const dirs = tempDir('metalcast-power-sync-');
  const fakes = new Map<string, PowerDriver>();
  const fake = (id: string) => {
    let driver = fakes.get(id);
    if (!driver) {
      driver = new FakePowerDriver();
      fakes.set(id, driver);
    }
    return driver;
  };
  const drivers = new PowerDrivers().register('fake', (properties) => fake(properties['power.fake_id'] ?? 'default'));
  let controller: RunningController;
  let counter = 0;

  before(async () => {
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dirs.path, 'data'),
        controllerId: 'sync-test',
        insecure: 'true',
        operatorAuth: 'none',
        // Rounds are run by the tests: the first automatic one would come after an hour.
        powerSyncInterval: '1h',
        powerSyncMaxFailures: '3',
      },
      {},
    );
    controller = await startController(config, testLogger(), drivers);
  });
  after(async () => {
    await controller?.stop();
    dirs.remove();
  });
  beforeEach(() => {
    fakes.clear();
  });

  /** A node with the fake driver, its machine `id`. */
  const node = async (id: string, properties: Record<string, string> = {}) => {
    counter++;
    const mac = `aa:00:00:10:00:${counter.toString(16).padStart(2, '0')}`;
    return controller.store.createNode(
      { name: `sync-${id}`, macAddresses: [mac], properties: { 'power.driver': 'fake', 'power.fake_id': id, ...properties } },
      { kind: 'created', message: 'created', actor: 'test', fromState: null, toState: null },
    );
  };
  const events = async (uuid: string, kind: string) => (await controller.store.listEvents(uuid, 0, 100)).filter((e) => e.kind === kind);
  /** One round over every node now (other tests' nodes stay in the store, their fake machines answering). */
  const syncOnly = (..._uuids: string[]) => controller.powerSync.runRound({});

  it('records the state, and raises an event and a metric when it changed outside metalcast', async () => {
    const n = await node('drift');
    const machine = fake('drift') as FakePowerDriver;
    machine.power = 'on';
    const first = await syncOnly(n.uuid);
    assert.ok(first.checked >= 1);
    assert.deepEqual((await controller.store.getPowerStatuses([n.uuid])).get(n.uuid)?.powerState, 'on');
    assert.equal((await events(n.uuid, 'power_state_changed')).length, 0, 'the first reading is no change');

    machine.power = 'off'; // someone pressed the button
    const metricsBefore = metricValue(await scrapeMetrics(controller), 'metalcast_power_state_changes_total{power_state="off"}') ?? 0;
    const second = await syncOnly(n.uuid);
    assert.ok(second.changed.includes(n.name));
    const [changed] = await events(n.uuid, 'power_state_changed');
    assert.match(changed?.message ?? '', /power is off, but metalcast last knew it on: it was switched outside metalcast/);
    assert.equal(metricValue(await scrapeMetrics(controller), 'metalcast_power_state_changes_total{power_state="off"}'), metricsBefore + 1);

    // Quiet when nothing changed.
    await syncOnly(n.uuid);
    assert.equal((await events(n.uuid, 'power_state_changed')).length, 1);
  });

  it('after N failed reads in a row marks the node BMC unreachable, backs off, and clears it when the BMC answers', async () => {
    const n = await node('down');
    const machine = fake('down') as FakePowerDriver;
    machine.power = 'on';
    await syncOnly(n.uuid);
    machine.failWith = "IPMI BMC 10.9.9.9:623 (user admin): 'chassis power status' failed: no answer from the BMC";

    for (let i = 1; i <= 2; i++) {
      const round = await syncOnly(n.uuid);
      assert.ok(round.failed.includes(n.name));
      assert.equal((await controller.store.getNode(n.uuid))?.maintenance, false, `not marked after ${i} failures`);
    }
    const third = await syncOnly(n.uuid);
    assert.ok(third.marked.includes(n.name));
    const marked = await controller.store.getNode(n.uuid);
    assert.equal(marked?.maintenance, true);
    assert.ok(marked?.maintenanceReason.startsWith(BMC_UNREACHABLE));
    assert.match(
      marked?.maintenanceReason ?? '',
      /IPMI BMC 10\.9\.9\.9:623 .*no answer from the BMC \(3 power state reads in a row failed/,
    );
    assert.equal(metricValue(await scrapeMetrics(controller), 'metalcast_bmc_unreachable_nodes'), 1);
    const status = (await controller.store.getPowerStatuses([n.uuid])).get(n.uuid);
    assert.equal(status?.failures, 3);
    assert.equal(status?.powerState, 'on', 'the last state known is kept');

    // Backs off: the next round right away leaves it alone, and so it is not hammered forever.
    const actionsBefore = machine.actions.length;
    let calls = 0;
    const original = machine.state.bind(machine);
    machine.state = async () => {
      calls++;
      return original();
    };
    const skipped = await syncOnly(n.uuid);
    assert.ok(!skipped.failed.includes(n.name));
    assert.equal(calls, 0);
    // Two intervals (2 h) later it is read again.
    const later = Date.now() + 2 * 3_600_000;
    const retried = await controller.powerSync.runRound({ now: () => later });
    assert.ok(retried.failed.includes(n.name));
    assert.equal(calls, 1);
    assert.equal(machine.actions.length, actionsBefore, 'the sync never switches anything');

    // The BMC answers again: maintenance off, failures cleared.
    machine.failWith = undefined;
    const back = await controller.powerSync.runRound({ now: () => later + 8 * 3_600_000 });
    assert.ok(back.cleared.includes(n.name));
    const cleared = await controller.store.getNode(n.uuid);
    assert.equal(cleared?.maintenance, false);
    assert.equal((await controller.store.getPowerStatuses([n.uuid])).get(n.uuid)?.failures, 0);
    assert.match((await events(n.uuid, 'maintenance')).at(-1)?.message ?? '', /maintenance off: the BMC answers again/);
  });

  it("leaves an operator's maintenance alone, and nodes someone holds, and nodes without a driver", async () => {
    const held = await node('held');
    const operator = await node('operator');
    const bare = await controller.store.createNode(
      { name: 'sync-bare', macAddresses: ['aa:00:00:10:01:01'], properties: {} },
      { kind: 'created', message: 'created', actor: 'test', fromState: null, toState: null },
    );
    (fake('held') as FakePowerDriver).power = 'on';
    const down = fake('operator') as FakePowerDriver;
    down.failWith = 'BMC says no';
    await controller.store.setMaintenance(operator.uuid, true, 'replacing a DIMM', {
      kind: 'maintenance',
      message: 'maintenance on',
      actor: 'operator',
      fromState: null,
      toState: null,
    });
    assert.ok(await controller.store.tryLock(held.uuid, 'someone', 'deploy'));
    for (let i = 0; i < 3; i++) await syncOnly();
    assert.equal((await controller.store.getNode(operator.uuid))?.maintenanceReason, 'replacing a DIMM');
    assert.match((await events(operator.uuid, 'bmc_unreachable'))[0]?.message ?? '', /^BMC unreachable: BMC says no/);
    assert.equal((await controller.store.getPowerStatuses([held.uuid])).size, 0, 'a held node is not read');
    assert.equal((await controller.store.getPowerStatuses([bare.uuid])).size, 0);
    await controller.store.releaseHolder('someone', 'test over', Date.now());
  });

  it('reads only its share of the ring, spreads reads over the interval with bounded concurrency, and never waits on a hung BMC', async () => {
    const registry = new Registry();
    const metrics = createControllerMetrics(registry, controller.store, () => 0);
    const mine: string[] = [];
    const calls: { id: string; at: number }[] = [];
    let inFlight = 0;
    let maxInFlight = 0;
    const timed = new PowerDrivers().register('fake', (properties) => {
      const id = properties['power.fake_id'] as string;
      return {
        ...new FakePowerDriver(),
        name: 'fake',
        async state() {
          calls.push({ id, at: Date.now() });
          inFlight++;
          maxInFlight = Math.max(maxInFlight, inFlight);
          try {
            if (id === 'spread-hung') await new Promise(() => {});
            await new Promise((resolve) => setTimeout(resolve, 50));
            return 'on' as const;
          } finally {
            inFlight--;
          }
        },
        close() {},
      } as unknown as PowerDriver;
    });
    const created = [];
    for (let i = 0; i < 6; i++) created.push(await node(i === 0 ? 'spread-hung' : `spread-${i}`));
    for (const n of created) mine.push(n.uuid);
    // The share: exactly the ring hash of each of these nodes, so that nodes of the other tests are not ours.
    const share = mine.map((uuid) => ({ from: ringHash(uuid), to: ringHash(uuid) + 1 }));
    const sync = new PowerSync(controller.store, timed, metrics, testLogger(), {
      intervalMs: 1200,
      concurrency: 2,
      maxFailures: 3,
      holder: 'sync-test',
      share: () => share,
      readTimeoutMs: 400,
    });
    const started = Date.now();
    const round = await sync.runRound({ spread: true });
    const took = Date.now() - started;
    assert.equal(calls.length, 6, 'every node of the share, and only those');
    assert.deepEqual(round.failed, ['sync-spread-hung']);
    assert.ok(maxInFlight <= 2, `at most 2 reads at once, saw ${maxInFlight}`);
    const offsets = calls.map((call) => call.at - started).sort((a, b) => a - b);
    // 6 reads over 1.2 s: one every 200 ms, so the last starts after about 1 s, not at once.
    assert.ok((offsets.at(-1) as number) >= 900, `reads at ${offsets.join(', ')} ms`);
    assert.ok(took < 3000, `the round took ${took} ms`);
    const empty = new PowerSync(controller.store, timed, metrics, testLogger(), {
      intervalMs: 1000,
      concurrency: 2,
      maxFailures: 3,
      holder: 'sync-test',
      share: () => [],
    });
    assert.equal((await empty.runRound({})).checked, 0);
  });

  it('power actions set what the sync expects: an inspect powers on, so a machine found off is a change', async () => {
    const n = await node('expect');
    const machine = fake('expect') as FakePowerDriver;
    await controller.store.transition(n.uuid, {
      from: ['enroll'],
      to: 'manageable',
      target: null,
      keepAgentToken: false,
      event: { kind: 'transition', message: 'enroll -> manageable', actor: 'test', fromState: 'enroll', toState: 'manageable' },
    });
    // Through the operator API's own path: manage is done, inspect powers the node on through the driver.
    const { createChannel, createClient } = await import('nice-grpc');
    const { NodeServiceDefinition, ProvisionAction } = await import('../../gen/metalcast/v1/node.js');
    const channel = createChannel(controller.grpcAddress);
    try {
      const nodes = createClient(NodeServiceDefinition, channel);
      await nodes.setProvisionState({ node: n.name, action: ProvisionAction.PROVISION_ACTION_INSPECT });
    } finally {
      channel.close();
    }
    assert.equal((await controller.store.getPowerStatuses([n.uuid])).get(n.uuid)?.powerState, 'on');
    assert.equal(machine.power, 'on');
    // The node's lock is released after the action; the machine dies meanwhile.
    machine.power = 'off';
    await controller.store.setMaintenance(n.uuid, true, 'hold the inspection', {
      kind: 'maintenance',
      message: 'hold',
      actor: 'test',
      fromState: null,
      toState: null,
    });
    const round = await syncOnly(n.uuid);
    assert.ok(round.changed.includes(n.name));
  });
});
