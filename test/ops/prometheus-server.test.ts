import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode } from '../helpers/agent-client.js';
import { eventually, FAST_FLAGS, scrapeMetrics, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { freePort } from '../helpers/controller-process.js';
import { exposedNames, findTool, metricNamesIn, PROMETHEUS_APT } from './tools.js';

const ALERTS = fileURLToPath(new URL('../../observability/prometheus/alerts.yml', import.meta.url));
const JOB = 'metalcast-controller';

interface VectorSample {
  metric: Record<string, string>;
  value: [number, string];
}
interface AlertingRule {
  name: string;
  query: string;
  health: string;
  lastError?: string;
}
interface Alert {
  labels: Record<string, string>;
  state: string;
}

/**
 * A real Prometheus (Debian's `prometheus` package) on loopback, with a
 * temporary config and data directory, scraping a controller every second
 * and evaluating alerts.yml against it every second.
 */
describe('Prometheus scraping a running controller', () => {
  const prometheus = findTool('prometheus', PROMETHEUS_APT);
  let t: TestController | undefined;
  let dir: ReturnType<typeof tempDir> | undefined;
  let child: ChildProcess | undefined;
  let exited: Promise<unknown> | undefined;
  let output = '';
  let api = '';

  async function get<T>(path: string): Promise<T> {
    const response = await fetch(`${api}${path}`, { signal: AbortSignal.timeout(5000) });
    const body = (await response.json()) as { status: string; data: T; error?: string };
    assert.equal(body.status, 'success', `${path}: ${body.error}`);
    return body.data;
  }

  async function query(promql: string): Promise<VectorSample[]> {
    const data = await get<{ result: VectorSample[] }>(`/api/v1/query?query=${encodeURIComponent(promql)}`);
    return data.result;
  }

  /** The value of a query that selects one series, or undefined while it selects none. */
  async function single(promql: string): Promise<number | undefined> {
    const result = await query(promql);
    assert.ok(result.length <= 1, `${promql} selects ${result.length} series`);
    return result[0] === undefined ? undefined : Number(result[0].value[1]);
  }

  before(async () => {
    if (prometheus.skip) return;
    const binary = prometheus.require();
    t = await startTestController(FAST_FLAGS);
    dir = tempDir('metalcast-prometheus-');
    const port = await freePort();
    api = `http://127.0.0.1:${port}`;
    const config = join(dir.path, 'prometheus.yml');
    mkdirSync(join(dir.path, 'data'));
    // JSON is YAML: no YAML library needed to write Prometheus's config.
    writeFileSync(
      config,
      JSON.stringify({
        global: { scrape_interval: '1s', scrape_timeout: '1s', evaluation_interval: '1s' },
        rule_files: [ALERTS],
        scrape_configs: [{ job_name: JOB, static_configs: [{ targets: [t.controller.httpAddress] }] }],
      }),
    );
    child = spawn(
      binary,
      [
        `--config.file=${config}`,
        `--storage.tsdb.path=${join(dir.path, 'data')}`,
        `--web.listen-address=127.0.0.1:${port}`,
        '--log.level=warn',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const keep = (chunk: string) => {
      output = (output + chunk).slice(-4000);
    };
    child.stdout?.setEncoding('utf8').on('data', keep);
    child.stderr?.setEncoding('utf8').on('data', keep);
    exited = once(child, 'exit');
    await eventually(
      async () => {
        assert.equal(child?.exitCode, null, `prometheus exited: ${output}`);
        return (await fetch(`${api}/-/ready`, { signal: AbortSignal.timeout(1000) })).ok;
      },
      { timeoutMs: 20_000, intervalMs: 200, what: 'Prometheus to be ready' },
    ).catch((error: Error) => {
      throw new Error(`${error.message}\nprometheus output: ${output}`);
    });
  });

  after(async () => {
    if (child && child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child?.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
    await t?.destroy();
    dir?.remove();
  });

  it('scrapes the controller: up is 1', { skip: prometheus.skip }, async () => {
    await eventually(async () => (await single(`up{job="${JOB}"}`)) === 1, { timeoutMs: 15_000, intervalMs: 250, what: 'up == 1' });
  });

  it('finds the nodes the test enrolled, by provision state', { skip: prometheus.skip }, async () => {
    assert.ok(t);
    const uuids: string[] = [];
    for (let i = 1; i <= 3; i++) {
      const { node } = await t.nodes.createNode({ name: `prom-${i}`, macAddresses: [`02:00:00:00:72:0${i}`] });
      uuids.push(node!.uuid);
    }
    await t.nodes.setProvisionState({ node: uuids[0]!, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await eventually(
      async () =>
        (await single(`metalcast_nodes{job="${JOB}", provision_state="enroll"}`)) === 2 &&
        (await single(`metalcast_nodes{job="${JOB}", provision_state="manageable"}`)) === 1,
      { timeoutMs: 30_000, intervalMs: 250, what: 'Prometheus to see 2 nodes in enroll and 1 in manageable' },
    );
    assert.equal(await single(`sum(metalcast_nodes{job="${JOB}"})`), 3);
    assert.ok(((await single(`grpc_server_handled_total{job="${JOB}", grpc_method="CreateNode", grpc_code="OK"}`)) ?? 0) >= 3);
  });

  it('loads alerts.yml, evaluates every rule without error, on series the controller exports', { skip: prometheus.skip }, async () => {
    assert.ok(t);
    const exposed = exposedNames(await scrapeMetrics(t.controller));
    const rules = await eventually(
      async () => {
        const data = await get<{ groups: { rules: AlertingRule[] }[] }>('/api/v1/rules?type=alert');
        const all = data.groups.flatMap((group) => group.rules);
        return all.length > 0 && all.every((rule) => rule.health !== 'unknown') && all;
      },
      { timeoutMs: 15_000, intervalMs: 250, what: 'every alerting rule to be evaluated' },
    );
    assert.ok(rules.length >= 5, `${rules.length} alerting rules`);
    for (const rule of rules) {
      assert.equal(rule.health, 'ok', `${rule.name}: ${rule.lastError}`);
      for (const name of metricNamesIn(rule.query)) {
        assert.ok(exposed.has(name) || name === 'up', `${rule.name} selects ${name}, which the controller does not export`);
      }
    }
  });

  it('fires MetalcastAgentsTimingOut on the first timeout after a start, and nothing else', { skip: prometheus.skip }, async () => {
    assert.ok(t);
    const timeouts = `metalcast_heartbeat_timeouts_total{job="${JOB}", provision_state="inspect_wait"}`;
    // The counter is exported at 0 from the start, so that its first increase is one Prometheus can see.
    await eventually(async () => (await single(timeouts)) === 0, { timeoutMs: 10_000, intervalMs: 250, what: `${timeouts} == 0` });
    // A node waits for an agent that never comes: the sweep fails it after the 2 s heartbeat timeout.
    await createWaitingNode(t.nodes, 'prom-silent', ['02:00:00:00:72:99']);
    const alerts = await eventually(
      async () => {
        const { alerts } = await get<{ alerts: Alert[] }>('/api/v1/alerts');
        return alerts.some((alert) => alert.labels.alertname === 'MetalcastAgentsTimingOut' && alert.state === 'firing') && alerts;
      },
      { timeoutMs: 30_000, intervalMs: 250, what: 'MetalcastAgentsTimingOut to fire' },
    );
    assert.deepEqual(
      alerts.map((alert) => [alert.labels.alertname, alert.labels.provision_state, alert.labels.severity]),
      [['MetalcastAgentsTimingOut', 'inspect_wait', 'warning']],
    );
    assert.equal(await single(timeouts), 1);
  });
});
