import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Status } from 'nice-grpc-common';
import { ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { scrapeMetrics, startTestController, type TestController, tempDir } from '../helpers/controller.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';
import { exposedNames, findTool, metricNamesIn, PROMETHEUS_APT, run } from './tools.js';

const PROMETHEUS_DIR = fileURLToPath(new URL('../../observability/prometheus/', import.meta.url));
const DASHBOARD = fileURLToPath(new URL('../../observability/grafana/metalcast-controller.json', import.meta.url));

/** Findings of `promtool check metrics` we accept: names we do not choose (prom-client's default metrics). */
const FOREIGN_PREFIXES = ['nodejs_', 'process_', 'grpc_server_'];

/** Series Prometheus makes itself for every target, so they are in no scrape. */
const SYNTHETIC = new Set(['up']);

/** What Grafana substitutes in the dashboard's queries, with values that make them valid PromQL. */
const GRAFANA_VARIABLES: Record<string, string> = {
  $__rate_interval: '1m',
  $__interval: '1m',
  $__range: '1h',
  $job: 'metalcast-controller',
  $instance: '.*',
};

interface Target {
  expr?: string;
  refId?: string;
  datasource?: { type?: string; uid?: string };
}
interface Panel {
  id?: number;
  type?: string;
  title?: string;
  datasource?: { type?: string; uid?: string };
  gridPos?: { h: number; w: number; x: number; y: number };
  targets?: Target[];
  panels?: Panel[];
}

function substitute(expr: string): string {
  return expr.replace(/\$\{?(__rate_interval|__interval|__range|job|instance)\}?/g, (_, name: string) => {
    const value = GRAFANA_VARIABLES[`$${name}`];
    assert.ok(value !== undefined, `unknown variable $${name}`);
    return value;
  });
}

describe('metric names in PromQL', () => {
  it('are found past functions, matchers, ranges, grouping and numbers', () => {
    assert.deepEqual(
      [
        ...metricNamesIn(
          'histogram_quantile(0.99, sum by (le, job) (rate(a_seconds_bucket{job="x", le!="1e3"}[5m]))) > 1e3 and on (job) b_total offset 15m or absent(up{job="j"}) unless c:rule / 2',
        ),
      ].sort(),
      ['a_seconds_bucket', 'b_total', 'c:rule', 'up'],
    );
  });
});

describe('promtool on the alert rules', () => {
  const promtool = findTool('promtool', PROMETHEUS_APT);

  it('check rules accepts alerts.yml', { skip: promtool.skip }, async () => {
    const result = await run(promtool.require(), ['check', 'rules', join(PROMETHEUS_DIR, 'alerts.yml')]);
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.match(result.stdout, /SUCCESS: \d+ rules found/);
  });

  it('test rules: each alert fires on its fault, says what to check, and stays quiet when healthy', { skip: promtool.skip }, async () => {
    const result = await run(promtool.require(), ['test', 'rules', 'alerts.test.yml'], { cwd: PROMETHEUS_DIR });
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.match(result.stdout, /SUCCESS/);
  });
});

describe('a live /metrics scrape', () => {
  const promtool = findTool('promtool', PROMETHEUS_APT);
  let t: TestController;
  let metrics: string;
  let exposed: Set<string>;

  before(async () => {
    t = await startTestController();
    // Some traffic, so that labelled series (gRPC calls by method and code) are in the scrape too.
    const { node } = await t.nodes.createNode({ name: 'ops-1', macAddresses: ['02:00:00:00:71:01'] });
    await t.nodes.setProvisionState({ node: node!.uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await assertRejectsWith(t.nodes.createNode({ name: 'ops-1', macAddresses: ['02:00:00:00:71:02'] }), Status.ALREADY_EXISTS);
    metrics = await scrapeMetrics(t.controller);
    exposed = exposedNames(metrics);
  });
  after(() => t.destroy());

  it('promtool check metrics has no findings about metalcast metrics', { skip: promtool.skip }, async () => {
    assert.match(metrics, /^metalcast_nodes\{provision_state="manageable"\} 1$/m);
    const result = await run(promtool.require(), ['check', 'metrics'], { input: metrics });
    // 0: clean; 3: lint findings, which we sort below; anything else (1: unparsable) fails.
    assert.ok(result.code === 0 || result.code === 3, `promtool exited ${result.code}: ${result.stdout}${result.stderr}`);
    const findings = (result.stdout + result.stderr).split('\n').filter((line) => line.trim() !== '');
    const ours = findings.filter((line) => !FOREIGN_PREFIXES.some((prefix) => line.startsWith(prefix)));
    assert.deepEqual(ours, [], 'promtool check metrics findings about metrics we name');
  });

  it('the dashboard is a Grafana dashboard whose queries select only series the controller exports', async () => {
    const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as {
      uid?: string;
      title?: string;
      schemaVersion?: number;
      panels?: Panel[];
      templating?: { list?: { name: string; type: string; query?: string | { query?: string } }[] };
    };
    assert.equal(dashboard.uid, 'metalcast-controller');
    assert.ok(dashboard.title);
    assert.ok((dashboard.schemaVersion ?? 0) >= 36, `schemaVersion ${dashboard.schemaVersion}`);
    const variables = dashboard.templating?.list ?? [];
    assert.ok(
      variables.some((v) => v.name === 'datasource' && v.type === 'datasource'),
      'a datasource variable, so the dashboard imports into any Grafana',
    );

    const panels = (dashboard.panels ?? []).flatMap((panel) => [panel, ...(panel.panels ?? [])]);
    const ids = panels.map((panel) => panel.id);
    assert.equal(new Set(ids).size, ids.length, 'panel ids are unique');
    const exprs: { where: string; expr: string }[] = [];
    for (const panel of panels) {
      assert.ok(panel.gridPos && panel.title, `panel ${panel.id} has a title and a position`);
      if (panel.type === 'row') continue;
      // biome-ignore lint/suspicious/noTemplateCurlyInString: Grafana's variable syntax
      assert.equal(panel.datasource?.uid, '${datasource}', `panel '${panel.title}' uses the datasource variable`);
      assert.ok((panel.targets ?? []).length > 0, `panel '${panel.title}' has queries`);
      for (const target of panel.targets ?? []) {
        assert.ok(target.expr && target.refId, `panel '${panel.title}' target has expr and refId`);
        exprs.push({ where: `panel '${panel.title}' ${target.refId}`, expr: target.expr });
      }
    }
    for (const variable of variables) {
      const query = typeof variable.query === 'string' ? variable.query : variable.query?.query;
      const labelValues = /^label_values\((.+),\s*\w+\)$/.exec(query ?? '');
      if (labelValues) exprs.push({ where: `variable $${variable.name}`, expr: labelValues[1] as string });
    }

    const used = new Set<string>();
    for (const { where, expr } of exprs) {
      for (const name of metricNamesIn(substitute(expr))) {
        used.add(name);
        assert.ok(exposed.has(name) || SYNTHETIC.has(name), `${where} selects ${name}, which the controller does not export`);
      }
    }
    for (const needed of [
      'up',
      'metalcast_nodes',
      'metalcast_heartbeats_total',
      'metalcast_heartbeat_timeouts_total',
      'metalcast_image_transfers_active',
      'metalcast_image_bytes_served_total',
      'metalcast_image_transfer_resumes_total',
      'metalcast_lock_wait_seconds_bucket',
      'metalcast_sweep_duration_seconds_bucket',
      'grpc_server_handled_total',
    ]) {
      assert.ok(used.has(needed), `the dashboard shows ${needed}`);
    }
  });

  it("the dashboard's queries are valid PromQL (promtool parses them as recording rules)", { skip: promtool.skip }, async () => {
    const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as { panels: Panel[] };
    const rules = dashboard.panels
      .flatMap((panel) => [panel, ...(panel.panels ?? [])])
      .flatMap((panel) =>
        (panel.targets ?? []).map((target) => ({
          record: `dashboard:panel${panel.id}_${target.refId}`,
          expr: substitute(target.expr ?? ''),
        })),
      );
    const dir = tempDir('metalcast-dashboard-');
    try {
      // JSON is YAML, so promtool reads this as a rules file.
      const file = join(dir.path, 'dashboard-rules.json');
      writeFileSync(file, JSON.stringify({ groups: [{ name: 'dashboard', rules }] }));
      const result = await run(promtool.require(), ['check', 'rules', file]);
      assert.equal(result.code, 0, result.stdout + result.stderr);
      assert.match(result.stdout, new RegExp(`SUCCESS: ${rules.length} rules found`));
    } finally {
      dir.remove();
    }
  });
});
