import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { freePort } from '../helpers/controller-process.js';
import { startTestController, type TestController, tempDir } from '../helpers/controller.js';

/*
 * What a new user sees when something is wrong, through the real `metalcast`
 * command against a real controller: one sentence with what to do (asserted
 * verbatim), grpc-js's raw text only with --debug, every numeric and size
 * flag refused before anything is sent, and the exit codes of
 * docs/exit-codes.md (2 usage, 3 not found, 4 access, 5 unreachable).
 */

const BIN = fileURLToPath(new URL('../../bin/metalcast.js', import.meta.url));

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

describe('metalcast errors and exit codes', () => {
  const dir = tempDir('metalcast-cli-errors-');
  let t: TestController;
  let env: NodeJS.ProcessEnv;

  const cli = (args: string[], extraEnv: NodeJS.ProcessEnv = {}): Promise<Run> =>
    new Promise((resolve) => {
      execFile(
        process.execPath,
        [BIN, ...args],
        { env: { ...env, ...extraEnv }, cwd: dir.path, timeout: 60_000 },
        (error, stdout, stderr) => resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });

  before(async () => {
    t = await startTestController();
    // As on a fresh shell, plus what this controller needs: plaintext and a token.
    env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('METALCAST_')));
    Object.assign(env, { METALCAST_CONTROLLER: t.controller.grpcAddress, METALCAST_TOKEN: t.adminToken, METALCAST_INSECURE: 'true' });
  });
  after(async () => {
    await t?.destroy();
    dir.remove();
  });

  it('says in one sentence that nothing listens at --controller; the raw grpc-js error only with --debug (exit 5)', async () => {
    const port = await freePort();
    const down = await cli(['node', 'list', '--controller', `127.0.0.1:${port}`]);
    assert.equal(down.code, 5);
    assert.equal(
      down.stderr,
      `error: cannot reach the controller at 127.0.0.1:${port} (connection refused: nothing listens there): is the controller running, and is --controller (METALCAST_CONTROLLER) its gRPC address?\n`,
    );
    const debug = await cli(['node', 'list', '--controller', `127.0.0.1:${port}`, '--debug']);
    assert.equal(debug.code, 5);
    const [line, raw] = debug.stderr.trimEnd().split('\n');
    assert.equal(line, down.stderr.trimEnd());
    assert.match(raw ?? '', /^debug: \/metalcast\.v1\.NodeService\/ListNodes UNAVAILABLE \(14\): .*ECONNREFUSED/);
  });

  it('says the metrics port is an HTTP endpoint, with and without TLS, instead of blaming TLS (exit 5)', async () => {
    const metrics = t.controller.httpAddress;
    const expected = `error: the controller at ${metrics} is an HTTP endpoint, not the gRPC API (it is the controller's --metrics-listen port, which serves /metrics and network boot?): give --controller the gRPC address, the --listen one (port 7350 by default)\n`;
    const plaintext = await cli(['node', 'list', '--controller', metrics]);
    assert.equal(plaintext.code, 5);
    assert.equal(plaintext.stderr, expected);

    const pki = join(dir.path, 'pki');
    assert.equal((await cli(['tls', 'init', '--dir', pki, '--host', '127.0.0.1'])).code, 0);
    const overTls = await cli(['node', 'list', '--controller', metrics, '--ca', join(pki, 'ca.pem')], { METALCAST_INSECURE: 'false' });
    assert.equal(overTls.code, 5);
    assert.equal(overTls.stderr, expected);
  });

  it('refuses every bad numeric and size flag with a sentence naming it, before calling anything (exit 2)', async () => {
    const cases: [string[], string][] = [
      [
        ['node', 'deploy', 'n1', '--image', 'x', '--disk-size', 'lots'],
        "error: option '--disk-size <size>' argument 'lots' is invalid. 'lots' is not a size such as 65536, 512K, 1M or 4G\n",
      ],
      [
        ['node', 'deploy', 'n1', '--image', 'x', '--disk-min-size', '-5'],
        "error: option '--disk-min-size <size>' argument '-5' is invalid. '-5' is not a size such as 65536, 512K, 1M or 4G\n",
      ],
      [['node', 'list', '--limit', 'abc'], "error: option '--limit <n>' argument 'abc' is invalid. 'abc' is not a whole number\n"],
      [['node', 'list', '--limit', '0'], "error: option '--limit <n>' argument '0' is invalid. 0 is not between 1 and 1000000\n"],
      [
        ['node', 'list', '--timeout', 'soon'],
        "error: option '--timeout <duration>' argument 'soon' is invalid. 'soon' is not a duration such as 500ms, 30s, 2m or 1h\n",
      ],
      [
        ['node', 'create', 'b1', '--mac', '52:54:00:00:00:01', '--power', 'ipmi', '--bmc-port', '70000'],
        "error: option '--bmc-port <port>' argument '70000' is invalid. 70000 is not between 1 and 65535\n",
      ],
      [
        ['node', 'create', 'b1', '--mac', '52:54:00:00:00:01', '--power', 'ipmi', '--bmc-cipher-suite', 'x'],
        "error: option '--bmc-cipher-suite <n>' argument 'x' is invalid. 'x' is not a whole number\n",
      ],
      [
        ['node', 'inspect', 'n1', '--wait', '--wait-timeout', 'never'],
        "error: option '--wait-timeout <duration>' argument 'never' is invalid. 'never' is not a duration such as 500ms, 30s, 2m or 1h\n",
      ],
      [
        ['node', 'power', 'on', 'n1', '--wait', 'forever'],
        "error: option '--wait <duration>' argument 'forever' is invalid. 'forever' is not a duration such as 500ms, 30s, 2m or 1h\n",
      ],
      [
        ['tls', 'init', '--dir', 'x', '--host', 'h', '--days', '0'],
        "error: option '--days <n>' argument '0' is invalid. 0 is not between 1 and 3650\n",
      ],
      [
        ['image', 'make-test', 'x.img', '--size', '1K'],
        "error: option '--size <size>' argument '1K' is invalid. 1K is not between 1048576 and 4294967296 bytes\n",
      ],
      [['demo', '--nodes', 'many'], "error: option '--nodes <n>' argument 'many' is invalid. 'many' is not a whole number\n"],
      [
        ['boot', 'dnsmasq-config', '--lease-time', 'soon'],
        "error: option '--lease-time <time>' argument 'soon' is invalid. 'soon' is not a lease time such as 1h, 45m, 3600 or infinite\n",
      ],
    ];
    for (const [args, message] of cases) {
      const run = await cli(args);
      assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
      assert.equal(run.stderr, `${message}(run with --help for usage)\n`, args.join(' '));
    }
    const typo = await cli(['node', 'lst']);
    assert.equal(typo.code, 2);
    assert.equal(typo.stderr, "error: unknown command 'lst'\n(Did you mean list?)\n(run with --help for usage)\n");
    assert.equal((await cli(['node', 'list'])).code, 0, 'nothing was created by the refused commands');
  });

  it('exits 3 for an unknown node and for an unknown image, in any command', async () => {
    const node = await cli(['node', 'show', 'nope']);
    assert.equal(node.code, 3);
    assert.equal(node.stderr, "error: NOT_FOUND: node 'nope' not found; metalcast node list shows the enrolled nodes\n");
    const image = await cli(['image', 'show', 'nope']);
    assert.equal(image.code, 3);
    assert.equal(image.stderr, "error: NOT_FOUND: image 'nope' not found; metalcast image list shows the images\n");

    // A deploy naming a missing image was FAILED_PRECONDITION (exit 1); it is NOT_FOUND like every other unknown name.
    const created = await t.nodes.createNode({ name: 'avail-1', macAddresses: ['52:54:00:00:00:31'] });
    const moved = await t.controller.store.transition(created.node?.uuid as string, {
      from: ['enroll'],
      to: 'available',
      target: null,
      keepAgentToken: false,
      event: { kind: 'transition', message: 'test set-up', actor: 'test', fromState: 'enroll', toState: 'available' },
    });
    assert.ok(moved);
    const deploy = await cli(['node', 'deploy', 'avail-1', '--image', 'no-such-image']);
    assert.equal(deploy.code, 3);
    assert.equal(deploy.stderr, "error: NOT_FOUND: image 'no-such-image' does not exist; metalcast image list shows the images\n");
  });

  it('exits 4 without a usable token, and 1 when the operation itself fails', async () => {
    const noToken = await cli(['node', 'list'], { METALCAST_TOKEN: 'mco_wrong' });
    assert.equal(noToken.code, 4);
    assert.match(noToken.stderr, /^error: UNAUTHENTICATED: /);
    assert.equal((await cli(['node', 'create', 'dup', '--mac', '52:54:00:00:00:41'])).code, 0);
    const duplicate = await cli(['node', 'create', 'dup', '--mac', '52:54:00:00:00:42']);
    assert.equal(duplicate.code, 1);
    assert.match(duplicate.stderr, /^error: ALREADY_EXISTS: /);
    const wrongState = await cli(['node', 'provide', 'dup']);
    assert.equal(wrongState.code, 1);
    assert.match(wrongState.stderr, /^error: FAILED_PRECONDITION: /);
  });

  it('marks required options as required in --help, and says where --ca is found by default', async () => {
    const deploy = await cli(['node', 'deploy', '--help']);
    assert.match(deploy.stdout, /--image <name> +image to deploy \(metalcast image list\) \(required\)/);
    const node = await cli(['node', '--help']);
    assert.match(
      node.stdout.replace(/\s+/g, ' '),
      /--ca <file> PEM CA bundle .* \(default: \.\/metalcast-data\/tls\/ca\.pem when it exists/,
    );
    assert.doesNotMatch(
      node.stdout.replace(/\s+/g, ' '),
      /--ca <file> PEM CA bundle to verify the controller's certificate with \(default: Node's bundled CAs\)/,
    );
  });

  it('makes a small test image for the quickstart, without a controller', async () => {
    const made = await cli(['image', 'make-test', 'os.img', '--size', '3M'], { METALCAST_CONTROLLER: '127.0.0.1:1' });
    assert.equal(made.code, 0, made.stderr);
    assert.equal(
      made.stdout,
      'wrote os.img: a 3.0 MiB test image (random data and zeros; nothing boots from it)\nupload it with: metalcast image upload os.img --name test-os\n',
    );
    assert.equal(statSync(join(dir.path, 'os.img')).size, 3 * 1024 * 1024);
    const again = await cli(['image', 'make-test', 'os.img']);
    assert.equal(again.code, 1);
    assert.equal(again.stderr, 'error: os.img exists; give --force to replace it\n');
    const upload = await cli(['image', 'upload', 'os.img', '--name', 'test-os']);
    assert.equal(upload.code, 0, upload.stderr);
    assert.ok(existsSync(join(dir.path, 'os.img')));
  });
});
