#!/usr/bin/env node
// Entry point of the `metalcast` command. The sources are TypeScript, run
// through tsx so that a checkout works without a build step.
// package.json has no "engines" field on purpose: npm printed its EBADENGINE block on every
// `npx metalcast` under a system Node 20 although npx runs this with the project's pinned Node 24.
// The version is checked here instead (node:sqlite without a flag needs 22.13).
const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 22 || (major === 22 && minor < 13)) {
  process.stderr.write(
    `metalcast needs Node.js 22.13 or newer, but this is ${process.version}.\n` +
      'Run it through npm (npm start, npm run metalcast -- ..., npx metalcast ...), which uses the Node.js pinned in this project.\n',
  );
  process.exit(1);
}
const { register } = await import('tsx/esm/api');
register();
await import('../cli/main.ts');
