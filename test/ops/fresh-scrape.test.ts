import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { scrapeMetrics, startTestController, type TestController } from '../helpers/controller.js';
import { findTool, metricNamesIn, PROMETHEUS_APT, run } from './tools.js';

/*
 * The scrape of a controller that has done nothing yet, as a new user's
 * Prometheus and Grafana first see it: `promtool check metrics` passes
 * outright (exit 0, no findings, prom-client's metrics included), and every
 * metalcast series the dashboard queries is already there, at 0, so that no
 * panel says "No data" before the first lookup or transfer.
 */

const DASHBOARD = fileURLToPath(new URL('../../observability/grafana/metalcast-controller.json', import.meta.url));

/** The series names with at least one sample in a scrape (not only # HELP and # TYPE). */
function sampledNames(text: string): Set<string> {
  const names = new Set<string>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    names.add(line.slice(0, line.search(/[{ ]/)));
  }
  return names;
}

interface Panel {
  title?: string;
  targets?: { expr?: string }[];
  panels?: Panel[];
}

describe("a fresh controller's scrape", () => {
  const promtool = findTool('promtool', PROMETHEUS_APT);
  let t: TestController;
  let metrics: string;

  before(async () => {
    t = await startTestController();
    metrics = await scrapeMetrics(t.controller);
  });
  after(() => t?.destroy());

  it('passes promtool check metrics with exit code 0 and no findings', { skip: promtool.skip }, async () => {
    const result = await run(promtool.require(), ['check', 'metrics'], { input: metrics });
    assert.equal(`${result.stdout}${result.stderr}`, '');
    assert.equal(result.code, 0);
    assert.match(metrics, /^nodejs_active_handles\{type="\w+"\} \d+$/m, "prom-client's handle count is still there, as a gauge");
  });

  it('has every labelled metalcast series the dashboard shows, at 0, before the first event', () => {
    const sampled = sampledNames(metrics);
    const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as { panels?: Panel[] };
    const panels = (dashboard.panels ?? []).flatMap((panel) => [panel, ...(panel.panels ?? [])]);
    const missing: string[] = [];
    for (const panel of panels) {
      for (const target of panel.targets ?? []) {
        const expr = (target.expr ?? '').replaceAll('$__rate_interval', '1m').replaceAll('$job', 'j').replaceAll('$instance', 'i');
        for (const name of metricNamesIn(expr)) {
          if (name.startsWith('metalcast_') && !sampled.has(name)) missing.push(`${name} (panel '${panel.title}')`);
        }
      }
    }
    assert.deepEqual(missing, []);
    assert.match(metrics, /^metalcast_lookups_total\{result="found"\} 0$/m);
    assert.match(metrics, /^metalcast_lookups_total\{result="not_found"\} 0$/m);
    assert.match(metrics, /^metalcast_image_transfer_duration_seconds_count\{result="ok"\} 0$/m);
    assert.match(metrics, /^metalcast_sweep_runs_total\{result="ok"\} 0$/m);
  });
});
