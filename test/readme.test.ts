import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';
import { AGENT_OPTIONS } from '../agent/config/config.js';
import { envName } from '../common/config.js';
import { CONTROLLER_OPTIONS } from '../controller/config.js';

describe('README configuration reference', () => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  for (const [program, specs] of [
    ['controller', CONTROLLER_OPTIONS],
    ['agent', AGENT_OPTIONS],
  ] as const) {
    it(`documents every ${program} option with its environment variable`, () => {
      const section = readme.slice(readme.indexOf(`### \`metalcast ${program}\``));
      for (const spec of Object.values(specs)) {
        assert.match(
          section,
          new RegExp(`\\| \`--${spec.flag}\` +\\| \`${envName(spec.flag)}\` +\\|`),
          `--${spec.flag} is missing from the README`,
        );
      }
    });
  }
});
