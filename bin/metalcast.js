#!/usr/bin/env node
// Entry point of the `metalcast` command. The sources are TypeScript, run
// through tsx so that a checkout works without a build step.
const [major] = process.versions.node.split('.').map(Number);
if (major < 22) {
  process.stderr.write(
    `metalcast needs Node.js 22 or newer, but this is ${process.version}.\n` +
      'Run it through npm (npm start, npm run metalcast -- ..., npx metalcast ...), which uses the Node.js pinned in this project.\n',
  );
  process.exit(1);
}
const { register } = await import('tsx/esm/api');
register();
await import('../cli/main.ts');
