import assert from 'node:assert/strict';
import { chmodSync, cpSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { duration, envName } from '../../common/config.js';
import { CONTROLLER_OPTIONS, loadControllerConfig } from '../../controller/config.js';
import { tempDir } from '../helpers/controller.js';
import { findTool, run } from './tools.js';

const UNITS_DIR = fileURLToPath(new URL('../../packaging/systemd/', import.meta.url));
const UNITS = ['metalcast-agent.service', 'metalcast-controller.service'] as const;
const SYSTEM_UNITS = '/usr/lib/systemd/system';

/** A unit file as section -> key -> values in order (a key may repeat). */
type UnitFile = Map<string, Map<string, string[]>>;

function parseUnit(text: string): UnitFile {
  const unit: UnitFile = new Map();
  let section: Map<string, string[]> | undefined;
  for (const [index, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = new Map();
      unit.set(header[1] as string, section);
      continue;
    }
    const eq = line.indexOf('=');
    assert.ok(section && eq > 0, `line ${index + 1} is neither a [section] nor Key=value: ${line}`);
    const key = line.slice(0, eq).trim();
    section.set(key, [...(section.get(key) ?? []), line.slice(eq + 1).trim()]);
  }
  return unit;
}

function values(unit: UnitFile, section: string, key: string): string[] {
  return unit.get(section)?.get(key) ?? [];
}

/** The one value of a key (the last one wins in systemd, but we write each once). */
function value(unit: UnitFile, section: string, key: string): string | undefined {
  const all = values(unit, section, key);
  assert.ok(all.length <= 1, `[${section}] ${key} is set ${all.length} times`);
  return all[0];
}

/** The executables of Exec*= lines, without the prefixes systemd allows (-, @, :, +, !). */
function executables(unit: UnitFile): string[] {
  const service = unit.get('Service') ?? new Map<string, string[]>();
  return [...service.entries()]
    .filter(([key]) => key.startsWith('Exec'))
    .flatMap(([, lines]) => lines.map((line) => (line.replace(/^[-@:+!]+/, '').split(/\s+/)[0] ?? '') as string));
}

const units = Object.fromEntries(UNITS.map((name) => [name, parseUnit(readFileSync(join(UNITS_DIR, name), 'utf8'))])) as Record<
  (typeof UNITS)[number],
  UnitFile
>;
const agent = units['metalcast-agent.service'];
const controller = units['metalcast-controller.service'];

describe('systemd units, as written', () => {
  it('start the agent after the network is online and restart it forever, after a pause', () => {
    assert.equal(value(agent, 'Unit', 'After'), 'network-online.target');
    assert.equal(value(agent, 'Unit', 'Wants'), 'network-online.target');
    assert.equal(value(agent, 'Service', 'Restart'), 'always', 'exit 3 (lookup budget exhausted) must lead to a restart');
    assert.ok(duration({ min: 1000 })(value(agent, 'Service', 'RestartSec') ?? '') >= 1000, 'RestartSec of at least 1s');
    assert.equal(value(agent, 'Unit', 'StartLimitIntervalSec'), '0', 'systemd must never stop restarting the agent');
    assert.ok(['root', undefined].includes(value(agent, 'Service', 'User')), 'the agent writes disks: it runs as root');
    assert.deepEqual(executables(agent), ['/usr/bin/node']);
    assert.match(value(agent, 'Service', 'ExecStart') ?? '', / \/usr\/lib\/metalcast\/metalcast-agent\.mjs\b/);
  });

  it('run the controller as its own user on its state directory, sandboxed', () => {
    assert.equal(value(controller, 'Service', 'User'), 'metalcast');
    assert.equal(value(controller, 'Service', 'DynamicUser'), 'yes');
    assert.equal(value(controller, 'Service', 'StateDirectory'), 'metalcast');
    assert.ok(values(controller, 'Service', 'Environment').includes('METALCAST_DATA_DIR=/var/lib/metalcast'));
    assert.equal(value(controller, 'Service', 'EnvironmentFile'), '-/etc/metalcast/controller.env', 'the env file is optional');
    assert.equal(value(controller, 'Service', 'Restart'), 'on-failure');
    assert.match(value(controller, 'Service', 'ExecStart') ?? '', / controller$/);
    const sandbox: Record<string, string> = {
      ProtectSystem: 'strict',
      ProtectHome: 'yes',
      PrivateTmp: 'yes',
      PrivateDevices: 'yes',
      NoNewPrivileges: 'yes',
      CapabilityBoundingSet: '',
      RestrictAddressFamilies: 'AF_INET AF_INET6 AF_UNIX',
      SystemCallFilter: '@system-service',
    };
    for (const [key, expected] of Object.entries(sandbox)) assert.equal(value(controller, 'Service', key), expected, key);
    assert.equal(value(controller, 'Service', 'MemoryDenyWriteExecute'), undefined, "V8's JIT needs writable executable memory");
  });

  it('give the controller longer to stop than its default --shutdown-timeout', () => {
    assert.equal(value(controller, 'Service', 'KillSignal'), 'SIGTERM');
    const stopMs = duration({ min: 1 })(value(controller, 'Service', 'TimeoutStopSec') ?? '');
    const shutdownMs = loadControllerConfig({}, {}).shutdownTimeout;
    assert.ok(stopMs >= shutdownMs + 10_000, `TimeoutStopSec (${stopMs}ms) should exceed --shutdown-timeout (${shutdownMs}ms) by 10s`);
  });

  it('set only METALCAST_* variables that are controller options', () => {
    const known = new Set(Object.values(CONTROLLER_OPTIONS).map((spec) => envName(spec.flag)));
    for (const assignment of values(controller, 'Service', 'Environment')) {
      const name = assignment.split('=')[0] as string;
      assert.ok(known.has(name), `${name} is not an option of metalcast controller`);
    }
  });
});

describe('systemd-analyze', () => {
  const analyze = findTool('systemd-analyze', 'apt-get install -y systemd');
  let root: ReturnType<typeof tempDir>;
  const unitPath = (name: string) => join(root.path, 'etc/systemd/system', name);

  // `verify` checks every Exec*= binary exists and resolves dependencies like
  // sysinit.target. With --root it does both inside the root: a temporary one
  // holding the system's own units, stub executables at the paths the units
  // name (they are not installed on a build machine), and our units as shipped.
  before(() => {
    root = tempDir('metalcast-systemd-');
    if (!existsSync(SYSTEM_UNITS)) return;
    cpSync(SYSTEM_UNITS, join(root.path, SYSTEM_UNITS), { recursive: true, verbatimSymlinks: true });
    mkdirSync(join(root.path, 'etc/systemd/system'), { recursive: true });
    for (const name of UNITS) {
      cpSync(join(UNITS_DIR, name), unitPath(name));
      for (const executable of executables(units[name])) {
        assert.ok(executable.startsWith('/'), `${name}: ${executable} is not an absolute path`);
        mkdirSync(join(root.path, dirname(executable)), { recursive: true });
        writeFileSync(join(root.path, executable), '#!/bin/sh\nexit 0\n');
        chmodSync(join(root.path, executable), 0o755);
      }
    }
  });
  after(() => root.remove());

  /** verify exits 0 on unknown keys and bad values ("..., ignoring."): any output at all is a finding. */
  async function verify(...names: string[]): Promise<string> {
    assert.ok(existsSync(SYSTEM_UNITS), `${SYSTEM_UNITS} is missing: systemd-analyze verify needs the system's units`);
    const result = await run(analyze.require(), ['verify', `--root=${root.path}`, ...names.map(unitPath)], { timeoutMs: 30_000 });
    const output = (result.stdout + result.stderr).trim();
    if (result.code !== 0 && output === '') return `exit code ${result.code}`;
    return output;
  }

  it('verify finds nothing to say about either unit', { skip: analyze.skip }, async () => {
    assert.equal(await verify(...UNITS), '');
  });

  it('verify reports a broken unit (the check can fail)', { skip: analyze.skip }, async () => {
    const broken = readFileSync(join(UNITS_DIR, 'metalcast-agent.service'), 'utf8')
      .replace('Restart=always', 'Restart=sometimes')
      .replace('[Service]', '[Service]\nNoSuchSetting=5');
    writeFileSync(unitPath('metalcast-broken.service'), broken);
    const output = await verify('metalcast-broken.service');
    assert.match(output, /NoSuchSetting/);
    assert.match(output, /sometimes/);
  });

  it('security: the controller sandbox stays at exposure 2.0 or lower', { skip: analyze.skip }, async () => {
    const result = await run(
      analyze.require(),
      ['security', '--offline=yes', '--threshold=20', `--root=${root.path}`, unitPath('metalcast-controller.service')],
      { timeoutMs: 30_000 },
    );
    const overall = /Overall exposure level for \S+: (\d+(?:\.\d+)?)/.exec(result.stdout + result.stderr);
    assert.ok(overall, `no overall exposure level in: ${result.stdout}${result.stderr}`);
    assert.ok(Number(overall[1]) <= 2, `exposure ${overall[1]} > 2.0:\n${result.stdout}`);
  });
});
