import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));

/*
 * `metalcast demo` as CI and a log file see it, without a terminal: every
 * check passes, and the deploy prints a line per state change and a summary
 * instead of a line per progress update (some fifty lines of bars for five
 * nodes before); the last line says how long it took.
 */
describe('metalcast demo without a terminal', () => {
  it('passes every check and prints a line per state change, no progress bars', async () => {
    const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(
        process.execPath,
        [BIN, 'demo', '--nodes', '2', '--image-size', '8M'],
        { timeout: 280_000, maxBuffer: 4 * 1024 * 1024 },
        (error, out, err) => resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout: out, stderr: err }),
      );
    });
    assert.equal(code, 0, `${stdout}\n${stderr}`);
    const lines = stdout.split('\n');
    assert.deepEqual(
      lines.filter((line) => /█|░|\d+% (writing|erasing|flushing|verifying)/.test(line)),
      [],
      'no progress lines without a terminal',
    );
    assert.ok(lines.includes('== providing (cleaning) and deploying, with a line per state change'));
    const deployLines = lines.filter((line) => /^\d{4}-\d\d-\d\dT.* node-[12] /.test(line));
    assert.ok(
      deployLines.length >= 2 && deployLines.length <= 12,
      `a few lines per node, got ${deployLines.length}:\n${deployLines.join('\n')}`,
    );
    assert.ok(lines.includes('2 nodes: 2 active'), 'a summary of the deploy');
    assert.match(lines.filter((line) => line !== '').at(-1) ?? '', /^\d+ passed, 0 failed, in \d+\.\d s$/);
  });
});
