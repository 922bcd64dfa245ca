import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { fromBinary } from '@bufbuild/protobuf';
import { FileDescriptorSetSchema } from '@bufbuild/protobuf/wkt';
import type { Command } from 'commander';
import { buildProgram } from '../cli/program.js';
import { REFERENCE_FILES } from '../scripts/docs/reference.js';

/*
 * The docs test: the README stays one page, the generated references match the
 * code, and every `metalcast …` command, flag and `npm run` script the docs
 * mention exists, so that docs and `--help` cannot drift apart.
 */

const REPO = fileURLToPath(new URL('..', import.meta.url));
const read = (file: string) => readFileSync(join(REPO, file), 'utf8');

function markdownFiles(dir: string): string[] {
  return readdirSync(join(REPO, dir), { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    return entry.isDirectory() ? markdownFiles(path) : entry.name.endsWith('.md') ? [path] : [];
  });
}

/** README.md and docs/**.md, without the generated references (they are compared whole). */
const HAND_WRITTEN = ['README.md', ...markdownFiles('docs').filter((f) => !(f in REFERENCE_FILES))];

/** The shell-like snippets of a markdown file: lines of code blocks (without `# comments`), and inline code spans. */
export function snippets(markdown: string): string[] {
  const out: string[] = [];
  let inBlock = false;
  for (const line of markdown.split('\n')) {
    if (line.startsWith('```')) {
      inBlock = !inBlock;
      continue;
    }
    if (inBlock) out.push(line.replace(/(^|\s)#.*$/, ''));
    else for (const match of line.matchAll(/`([^`]+)`/g)) out.push(match[1] as string);
  }
  return out;
}

/**
 * Problems with the `metalcast …` invocations in `text`: an unknown
 * subcommand after a command group, or a flag the command does not take.
 */
export function invocationProblems(program: Command, text: string): string[] {
  const problems: string[] = [];
  for (const match of text.matchAll(/(?:^|[\s(=])(?:npx |node \S+ )?metalcast((?: +[a-z][\w-]*)+)([^|;&]*)/g)) {
    const words = (match[1] as string).trim().split(/ +/);
    let command = program;
    const path: string[] = [];
    for (const word of words) {
      const sub = command.commands.find((c) => c.name() === word || c.aliases().includes(word));
      if (!sub) break;
      command = sub;
      path.push(word);
    }
    if (path.length === 0) continue; // prose: "metalcast provisions …"
    if (command.commands.length > 0 && path.length < words.length && !/^[A-Z]/.test(words[path.length] as string)) {
      // `metalcast node frobnicate`: a group followed by a word that is none of its commands
      const next = words[path.length] as string;
      if (!command.registeredArguments.length) problems.push(`metalcast ${path.join(' ')} has no command '${next}' (in: ${text.trim()})`);
    }
    const known = new Set(['--help']);
    for (let c: Command | null = command; c; c = c.parent) for (const option of c.options) if (option.long) known.add(option.long);
    for (const flag of `${match[1]}${match[2]}`.matchAll(/(?:^|\s|\[)(--[a-z][\w-]*)/g)) {
      if (!known.has(flag[1] as string)) problems.push(`metalcast ${path.join(' ')} takes no ${flag[1]} (in: ${text.trim()})`);
    }
  }
  return problems;
}

describe('README and docs', () => {
  const readme = read('README.md');

  it('keeps the README to one page: at most 10 KB, the quickstart in the first screen', () => {
    assert.ok(Buffer.byteLength(readme) <= 10 * 1024, `README.md is ${Buffer.byteLength(readme)} bytes; move detail into docs/`);
    const firstScreen = readme.split('\n').slice(0, 40).join('\n');
    assert.match(firstScreen, /## Quickstart\n/);
    assert.match(firstScreen, /npx metalcast node deploy/);
  });

  for (const [file, make] of Object.entries(REFERENCE_FILES)) {
    it(`${file} is what \`npm run docs:config\` generates from the code`, () => {
      assert.equal(read(file), make(), `${file} is out of date: run npm run docs:config and commit the result`);
    });
  }

  it('mentions only commands and flags that `--help` knows', () => {
    const program = buildProgram();
    const problems = HAND_WRITTEN.flatMap((file) =>
      snippets(read(file)).flatMap((s) => invocationProblems(program, s).map((p) => `${file}: ${p}`)),
    );
    assert.deepEqual(problems, []);
  });

  it('the invocation check can fail', () => {
    const program = buildProgram();
    assert.deepEqual(invocationProblems(program, 'npx metalcast node deploy n1 --image x --disk-size 1G'), []);
    assert.equal(invocationProblems(program, 'npx metalcast node deploy n1 --imagee x').length, 1);
    assert.equal(invocationProblems(program, 'metalcast node frobnicate n1').length, 1);
    assert.deepEqual(invocationProblems(program, 'metalcast provisions bare-metal machines --fast'), []);
  });

  it('mentions only npm scripts that package.json defines', () => {
    const scripts = Object.keys((JSON.parse(read('package.json')) as { scripts: Record<string, string> }).scripts);
    const missing = HAND_WRITTEN.flatMap((file) =>
      [...read(file).matchAll(/npm run ([a-z][\w:-]*)/g)]
        .map((m) => m[1] as string)
        .filter((s) => !scripts.includes(s))
        .map((s) => `${file}: npm run ${s}`),
    );
    assert.deepEqual(missing, []);
  });

  it('links every page of docs/ from the README (the runbooks through their folder)', () => {
    const linked = new Set([...readme.matchAll(/\]\((docs\/[^)#\s]*)/g)].map((m) => m[1] as string));
    const unlinked = readdirSync(join(REPO, 'docs'))
      .filter((name) => name.endsWith('.md'))
      .map((name) => `docs/${name}`)
      .filter((page) => !linked.has(page));
    assert.deepEqual(unlinked, [], "add a line for each to the README's documentation table");
    assert.ok(linked.has('docs/runbooks/'));
  });

  it('links only to files that exist', () => {
    const broken: string[] = [];
    for (const file of HAND_WRITTEN) {
      for (const match of read(file).matchAll(/\]\(([^)#\s]+)(?:#[^)]*)?\)/g)) {
        const target = match[1] as string;
        if (/^[a-z]+:/.test(target)) continue;
        if (!existsSync(join(REPO, dirname(file), target))) broken.push(`${file} -> ${target}`);
      }
    }
    assert.deepEqual(broken, []);
  });

  it('tells third-party clients about protoc 3.15 and the descriptor set, which holds every proto file', () => {
    const page = read('docs/grpc-api.md');
    assert.match(page, /protoc 3\.15 or newer/);
    assert.match(page, /gen\/metalcast\.binpb/);
    const set = fromBinary(FileDescriptorSetSchema, readFileSync(join(REPO, 'gen', 'metalcast.binpb')));
    const protos = execFileSync('git', ['ls-files', 'proto/*.proto'], { cwd: REPO, encoding: 'utf8' })
      .split('\n')
      .filter(Boolean)
      .map((file) => file.slice('proto/'.length));
    assert.ok(protos.length > 0);
    const inSet = new Set(set.file.map((file) => file.name));
    assert.deepEqual(
      protos.filter((file) => !inSet.has(file)),
      [],
      'gen/metalcast.binpb is out of date: npm run generate',
    );
  });

  it('names every top-level folder of controller/ and agent/ in the README or docs/architecture.md', () => {
    const text = readme + read('docs/architecture.md');
    const folders = ['controller', 'agent'].flatMap((program) =>
      readdirSync(join(REPO, program))
        .filter((name) => statSync(join(REPO, program, name)).isDirectory())
        .map((name) => relative(REPO, join(REPO, program, name))),
    );
    const unnamed = folders.filter((folder) => !text.includes(`${folder.split('/')[1]}/`));
    assert.deepEqual(unnamed, []);
  });
});
