import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { loadAgentConfig } from '../../agent/config/config.js';
import { ConfigError } from '../../common/config.js';
import { normaliseMac } from '../../common/mac.js';
import { loadControllerConfig } from '../../controller/config.js';

describe('configuration', () => {
  it('takes flags over the environment over defaults, and parses durations once', () => {
    const defaults = loadControllerConfig({}, {});
    assert.equal(defaults.heartbeatTimeout, 120_000);
    assert.equal(defaults.heartbeatIntervalMin, 36_000);
    assert.equal(defaults.heartbeatIntervalMax, 72_000);
    assert.equal(defaults.startupGrace, 120_000);
    assert.match(defaults.database, /^sqlite:.*metalcast-data\/metalcast\.db$/);

    const fromEnv = loadControllerConfig({}, { METALCAST_HEARTBEAT_TIMEOUT: '1m', METALCAST_SWEEP_INTERVAL: '2s' });
    assert.equal(fromEnv.heartbeatTimeout, 60_000);
    assert.equal(fromEnv.sweepInterval, 2000);

    const flagsWin = loadControllerConfig({ heartbeatTimeout: '30s' }, { METALCAST_HEARTBEAT_TIMEOUT: '1m' });
    assert.equal(flagsWin.heartbeatTimeout, 30_000);
  });

  it('reports every bad value at once, naming the flag or variable', () => {
    assert.throws(
      () => loadControllerConfig({ heartbeatTimeout: 'soon', listen: 'nowhere' }, { METALCAST_LOG_LEVEL: 'loud' }),
      (error: unknown) => {
        assert.ok(error instanceof ConfigError);
        assert.equal(error.problems.length, 3);
        assert.match(error.message, /--heartbeat-timeout: 'soon' is not a duration/);
        assert.match(error.message, /--listen: 'nowhere' is not of the form host:port/);
        assert.match(error.message, /METALCAST_LOG_LEVEL \(environment\): 'loud' is not one of/);
        return true;
      },
    );
  });

  it('refuses heartbeat intervals that would time every agent out', () => {
    assert.throws(
      () => loadControllerConfig({ heartbeatTimeout: '10s', heartbeatIntervalMax: '20s' }, {}),
      /--heartbeat-interval-max \(20000ms\) must be shorter than --heartbeat-timeout/,
    );
  });

  it('needs a record file for the recording power driver, and takes several controllers', () => {
    assert.throws(() => loadAgentConfig({ powerDriver: 'recording' }, {}), /needs --power-record-file/);
    assert.throws(() => loadAgentConfig({ powerDriver: 'ipmi' }, {}), /--power-driver: 'ipmi' is not one of os, recording/);
    const config = loadAgentConfig({}, { METALCAST_CONTROLLER: '10.0.0.1:7350, 10.0.0.2:7350' });
    assert.deepEqual(config.controller, ['10.0.0.1:7350', '10.0.0.2:7350']);
  });
});

describe('MAC addresses', () => {
  it('normalises case and separators, and names the bad value', () => {
    assert.equal(normaliseMac('AA-BB-CC-DD-EE-0F'), 'aa:bb:cc:dd:ee:0f');
    assert.throws(() => normaliseMac('zz:11'), /MAC address 'zz:11' is not of the form aa:bb:cc:dd:ee:ff/);
    assert.throws(() => normaliseMac('aa:bb-cc:dd:ee:ff'), /is not of the form/);
  });
});
