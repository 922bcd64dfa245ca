import { spawn } from 'node:child_process';
import { PowerError } from '../power-driver.js';

/**
 * Runs Debian's `ipmitool` against one BMC over IPMI v2.0 (`-I lanplus`).
 *
 * - The password goes through the environment (`-E` reads IPMI_PASSWORD),
 *   never onto a command line that `ps` shows, and never into an error.
 * - `-C` names the cipher suite (default 3: HMAC-SHA1, HMAC-SHA1-96,
 *   AES-CBC-128); without it ipmitool first asks the BMC which suites it has,
 *   which costs about 10 s per call on some BMCs.
 * - Commands to one BMC run one at a time, with a minimum interval between
 *   them: BMCs are small computers, and many drop sessions when hurried.
 * - Every call has a timeout (the process is killed when it runs out), and
 *   calls that failed on the way to the BMC (no answer, timeout) are retried
 *   a bounded number of times with backoff; what the BMC refused (wrong
 *   password, unknown user, an unsupported request) is not.
 * - A failure is a PowerError naming the BMC and saying what it answered.
 */
export interface IpmitoolTarget {
  /** Host name or IP address of the BMC. */
  address: string;
  /** UDP port; default 623. */
  port: number;
  username: string;
  password: string;
  /** IPMI v2.0 cipher suite id; default 3. */
  cipherSuite: number;
}

export interface IpmitoolOptions {
  /** Program to run; default `ipmitool` on the PATH. */
  binary?: string;
  /** Longest one ipmitool call may run before it is killed; default 20 s. */
  callTimeoutMs?: number;
  /** Tries per command when the BMC did not answer; default 3. */
  attempts?: number;
  /** Wait before the second try, doubled for each further one; default 1 s. */
  backoffMs?: number;
  /** Least time between the end of one command to a BMC and the start of the next; default 250 ms. */
  minIntervalMs?: number;
}

/** What kind of failure a call met: only `unreachable` and `timeout` are worth another try. */
export type IpmiFailureKind = 'auth' | 'unreachable' | 'timeout' | 'refused' | 'tool';

export class IpmiError extends PowerError {
  override name = 'IpmiError';
  constructor(
    message: string,
    readonly kind: IpmiFailureKind,
  ) {
    super(message);
  }
}

/** ipmitool's per-try wait for an answer (-N, seconds) and its own retries (-R): ours do the rest. */
const IPMITOOL_TRY_SECONDS = 5;
const IPMITOOL_RETRIES = 1;

/** One queue per BMC (address:port), shared by every driver instance in this process. */
const gates = new Map<string, { tail: Promise<void>; lastEndedAt: number; users: number }>();

async function throughGate<T>(key: string, minIntervalMs: number, run: () => Promise<T>): Promise<T> {
  let gate = gates.get(key);
  if (!gate) {
    gate = { tail: Promise.resolve(), lastEndedAt: 0, users: 0 };
    gates.set(key, gate);
  }
  const current = gate;
  current.users++;
  const previous = current.tail;
  let release: () => void = () => {};
  current.tail = new Promise<void>((resolve) => {
    release = resolve;
  });
  try {
    await previous;
    const wait = current.lastEndedAt + minIntervalMs - Date.now();
    if (wait > 0) await sleep(wait);
    return await run();
  } finally {
    current.lastEndedAt = Date.now();
    current.users--;
    release();
    if (current.users === 0) gates.delete(key);
  }
}

export class Ipmitool {
  private readonly binary: string;
  private readonly callTimeoutMs: number;
  private readonly attempts: number;
  private readonly backoffMs: number;
  private readonly minIntervalMs: number;

  constructor(
    private readonly target: IpmitoolTarget,
    options: IpmitoolOptions = {},
  ) {
    this.binary = options.binary ?? 'ipmitool';
    this.callTimeoutMs = options.callTimeoutMs ?? 20_000;
    this.attempts = Math.max(1, options.attempts ?? 3);
    this.backoffMs = options.backoffMs ?? 1000;
    this.minIntervalMs = options.minIntervalMs ?? 250;
  }

  /** How errors name this BMC: "IPMI BMC 10.0.0.5:623 (user admin)". */
  get label(): string {
    return `IPMI BMC ${this.target.address}:${this.target.port} (user ${this.target.username || 'anonymous'})`;
  }

  /** The arguments before the command; no password among them. */
  private baseArgs(): string[] {
    const t = this.target;
    return [
      '-I',
      'lanplus',
      '-H',
      t.address,
      '-p',
      String(t.port),
      '-U',
      t.username,
      '-E',
      '-C',
      String(t.cipherSuite),
      '-N',
      String(IPMITOOL_TRY_SECONDS),
      '-R',
      String(IPMITOOL_RETRIES),
      // One -v: the RAKP and session errors that say why a session failed go to stderr.
      '-v',
    ];
  }

  /**
   * Runs `ipmitool … <command>` (e.g. ['chassis', 'power', 'status']) and
   * returns its standard output; retries only failures on the way to the BMC.
   */
  async run(command: string[]): Promise<string> {
    const key = `${this.target.address}:${this.target.port}`;
    let lastError: IpmiError | undefined;
    for (let attempt = 1; attempt <= this.attempts; attempt++) {
      try {
        return await throughGate(key, this.minIntervalMs, () => this.once(command));
      } catch (error) {
        if (!(error instanceof IpmiError)) throw error;
        lastError = error;
        if (error.kind !== 'unreachable' && error.kind !== 'timeout') throw error;
        if (attempt < this.attempts) await sleep(this.backoffMs * 2 ** (attempt - 1));
      }
    }
    const tries = this.attempts === 1 ? '1 try' : `${this.attempts} tries`;
    throw new IpmiError(`${(lastError as IpmiError).message} (gave up after ${tries})`, (lastError as IpmiError).kind);
  }

  private once(command: string[]): Promise<string> {
    const what = command.join(' ');
    return new Promise((resolve, reject) => {
      const child = spawn(this.binary, [...this.baseArgs(), ...command], {
        stdio: ['ignore', 'pipe', 'pipe'],
        // Only what ipmitool needs: the password never reaches an argument list.
        env: { PATH: process.env.PATH ?? '/usr/bin:/bin', IPMI_PASSWORD: this.target.password },
      });
      let stdout = '';
      let stderr = '';
      let timedOut = false;
      child.stdout.setEncoding('utf8').on('data', (text: string) => {
        stdout = (stdout + text).slice(-65_536);
      });
      child.stderr.setEncoding('utf8').on('data', (text: string) => {
        stderr = (stderr + text).slice(-65_536);
      });
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, this.callTimeoutMs);
      child.once('error', (error: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        const hint = error.code === 'ENOENT' ? ': ipmitool is not installed (apt-get install ipmitool)' : `: ${error.message}`;
        reject(new IpmiError(`${this.label}: cannot run ${this.binary}${hint}`, 'tool'));
      });
      child.once('close', (code) => {
        clearTimeout(timer);
        if (timedOut) {
          reject(new IpmiError(`${this.label}: '${what}' got no answer within ${this.callTimeoutMs / 1000} s`, 'timeout'));
        } else if (code === 0 && !refusedQuietly(stderr)) {
          resolve(stdout);
        } else {
          const { kind, text } = explain(stderr, stdout, this.target);
          reject(new IpmiError(`${this.label}: '${what}' failed: ${text}`, kind));
        }
      });
    });
  }
}

/**
 * ipmitool exits 0 from `chassis bootdev` even when the BMC refused the boot
 * flags: the refusal is only on stderr. (Parameter 0, "set in progress", is
 * optional in the IPMI spec and ipmitool carries on without it.)
 */
function refusedQuietly(stderr: string): boolean {
  return /^Set Chassis Boot Parameter (?!0 )\d+ failed/m.test(stderr);
}

/** Lines of ipmitool's stderr that are progress, not the reason. */
const NOISE = [
  /^Loading IANA PEN Registry/,
  /^Set Chassis Boot Parameter 0 failed/,
  /^Running Get VSO Capabilities/,
  /^Invalid completion code received: Invalid command$/,
  /^Discovered IPMB address/,
];

/** Turns ipmitool's stderr into a kind and a sentence that says what the BMC answered and what to check. */
export function explain(
  stderr: string,
  stdout: string,
  target: Pick<IpmitoolTarget, 'username' | 'cipherSuite'>,
): { kind: IpmiFailureKind; text: string } {
  const lines = `${stderr}\n${stdout}`
    .split('\n')
    .map((line) => line.replace(/^>\s*/, '').trim())
    .filter((line) => line !== '' && !NOISE.some((noise) => noise.test(line)));
  const said = lines.join('; ') || 'ipmitool failed without a message';
  const all = lines.join('\n');
  if (/RAKP 2 HMAC is invalid/i.test(all))
    return {
      kind: 'auth',
      text: `the BMC rejected the password of user '${target.username}' (${said}); check the node secret power.ipmi.password`,
    };
  if (/unauthorized name/i.test(all))
    return { kind: 'auth', text: `the BMC has no user '${target.username}' (${said}); check power.ipmi.username` };
  if (/invalid authentication algorithm|invalid integrity algorithm|invalid confidentiality algorithm|cipher suite/i.test(all))
    return {
      kind: 'auth',
      text: `the BMC does not offer cipher suite ${target.cipherSuite} (${said}); set power.ipmi.cipher_suite to one it has (ipmitool lan print shows them; 3 and 17 are common)`,
    };
  // A slow BMC: ipmitool gave up waiting for the answer, or matched a late one to no request. Worth another try.
  if (/Request Match NOT FOUND|No response|Insufficient resources|timed? ?out/i.test(all))
    return { kind: 'timeout', text: `the BMC answered too late or not at all (${said})` };
  if (/insufficient privilege|privilege level/i.test(all))
    return { kind: 'auth', text: `user '${target.username}' may not do this (${said}); it needs the operator or administrator privilege` };
  if (/Get Auth Capabilities error|Get Channel Authentication Capabilities|Unable to establish|Connection refused/i.test(all))
    return {
      kind: 'unreachable',
      text: `no answer from the BMC (${said}); check power.ipmi.address, power.ipmi.port and that IPMI over LAN is enabled`,
    };
  return { kind: 'refused', text: said };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
