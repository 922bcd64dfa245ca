// Prints the README's configuration reference from the option tables:
//   npm run docs:config   (paste over the "### `metalcast controller`" and "### `metalcast agent`" sections)
// test/readme.test.ts fails when an option is missing from the README.
import { AGENT_OPTIONS } from '../agent/config/config.js';
import { envName } from '../common/config.js';
import { CONTROLLER_OPTIONS } from '../controller/config.js';

for (const [title, specs] of [
  ['controller', CONTROLLER_OPTIONS],
  ['agent', AGENT_OPTIONS],
] as const) {
  console.log(`\n### \`metalcast ${title}\`\n\n| flag | environment | default | meaning |\n|---|---|---|---|`);
  for (const spec of Object.values(specs)) {
    const value = spec.flag === 'controller-id' ? 'host name' : spec.defaultValue || '';
    console.log(`| \`--${spec.flag}\` | \`${envName(spec.flag)}\` | ${value ? `\`${value}\`` : '—'} | ${spec.description} |`);
  }
}
