import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

/*
 * The layout is the architecture (shared/DESIGN.md): these checks keep it so.
 * Imports are read from the sources (static `import … from` and `export … from`,
 * and dynamic `import('…')` of a literal), relative ones only: packages cannot
 * form circles with our files.
 */

const REPO = fileURLToPath(new URL('..', import.meta.url));

function sourceFiles(): string[] {
  return execFileSync('git', ['ls-files', '--cached', '--others', '--exclude-standard', '*.ts'], { cwd: REPO, encoding: 'utf8' })
    .split('\n')
    .filter((f) => f !== '' && !f.startsWith('gen/') && !f.startsWith('node_modules/'));
}

const IMPORT = /(?:^|[\s;])(?:import|export)\s[^'"]*?from\s*['"](\.{1,2}\/[^'"]+)['"]|import\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/g;

/** Repository-relative .ts paths each file imports. */
function importGraph(files: string[]): Map<string, string[]> {
  const known = new Set(files);
  const graph = new Map<string, string[]>();
  for (const file of files) {
    const text = readFileSync(join(REPO, file), 'utf8');
    const targets: string[] = [];
    for (const match of text.matchAll(IMPORT)) {
      const spec = match[1] ?? match[2] ?? '';
      const target = relative(REPO, resolve(REPO, dirname(file), spec)).replace(/\.js$/, '.ts');
      if (known.has(target)) targets.push(target);
    }
    graph.set(file, targets);
  }
  return graph;
}

/** Every import circle, each as the list of files around it (Tarjan's strongly connected components). */
function circles(graph: Map<string, string[]>): string[][] {
  let index = 0;
  const indices = new Map<string, number>();
  const lowlink = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (v: string) => {
    indices.set(v, index);
    lowlink.set(v, index);
    index++;
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!indices.has(w)) {
        visit(w);
        lowlink.set(v, Math.min(lowlink.get(v) as number, lowlink.get(w) as number));
      } else if (onStack.has(w)) {
        lowlink.set(v, Math.min(lowlink.get(v) as number, indices.get(w) as number));
      }
    }
    if (lowlink.get(v) === indices.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop() as string;
        onStack.delete(w);
        component.push(w);
      } while (w !== v);
      if (component.length > 1 || (graph.get(v) ?? []).includes(v)) found.push(component.sort());
    }
  };
  for (const v of graph.keys()) if (!indices.has(v)) visit(v);
  return found;
}

describe('layout', () => {
  const files = sourceFiles();
  const graph = importGraph(files);

  it('finds the imports it checks (the parser is not blind)', () => {
    assert.ok(graph.get('controller/main.ts')?.includes('controller/controller.ts'), 'controller/main.ts imports controller/controller.ts');
    assert.deepEqual(
      circles(
        new Map([
          ['a', ['b']],
          ['b', ['a']],
          ['c', ['a']],
        ]),
      ),
      [['a', 'b']],
    );
  });

  it('has no import circles', () => {
    assert.deepEqual(circles(graph), []);
  });

  it('keeps the programs apart: controller/ and agent/ never import each other or cli/', () => {
    const wrong: string[] = [];
    for (const [file, targets] of graph) {
      for (const target of targets) {
        if (file.startsWith('controller/') && (target.startsWith('cli/') || target.startsWith('agent/')))
          wrong.push(`${file} -> ${target}`);
        if (file.startsWith('agent/') && (target.startsWith('cli/') || target.startsWith('controller/')))
          wrong.push(`${file} -> ${target}`);
        if (file.startsWith('common/') && !target.startsWith('common/') && !target.startsWith('gen/')) wrong.push(`${file} -> ${target}`);
      }
    }
    assert.deepEqual(wrong, []);
  });

  it("holds only the program's entry, its config and its wiring at the root of controller/ and agent/", () => {
    const rootFiles = (folder: string) => files.filter((f) => dirname(f) === folder).sort();
    assert.deepEqual(rootFiles('controller'), ['controller/config.ts', 'controller/controller.ts', 'controller/main.ts']);
    assert.deepEqual(rootFiles('agent'), ['agent/agent.ts', 'agent/main.ts']);
  });
});
