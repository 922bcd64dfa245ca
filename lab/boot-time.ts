/**
 * Measures how long a QEMU guest (-accel tcg) takes from the start of QEMU
 * to the agent's first connection to its controller, booting the ramdisk of
 * `npm run build:ramdisk` directly (-kernel/-initrd) and through iPXE over
 * HTTP, a few times each, one guest at a time; prints each phase's median.
 *
 *   node --import tsx lab/boot-time.ts [--runs 3] [--memory 1024] [--no-network]
 *
 * The "controller" is a TCP listener that records the first connection: the
 * agent's first lookup opens it. Phases come from the console lines of the
 * ramdisk's /init, as the host sees them appear.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildRamdisk } from '../scripts/ramdisk/build-ramdisk.js';
import { startBootServer } from './boot-server.js';
import { labUnavailable } from './prerequisites.js';
import { type BootSource, labMac, startGuest } from './qemu.js';

const PHASES = [
  ['init', /metalcast-ramdisk: init started/],
  ['network up', /metalcast-ramdisk: network up/],
  ['agent start', /metalcast-ramdisk: starting the agent/],
] as const;

interface Sample {
  phases: Record<string, number>;
  connectMs: number;
}

async function measureOnce(run: number, mode: 'kernel' | 'network', work: string, memoryMiB: number): Promise<Sample> {
  let connected: (at: number) => void = () => {};
  const firstConnection = new Promise<number>((resolve) => {
    connected = resolve;
  });
  const controller = createServer((socket) => {
    connected(Date.now());
    socket.destroy();
  });
  await new Promise<void>((resolve) => controller.listen(0, '127.0.0.1', resolve));
  const port = (controller.address() as { port: number }).port;
  const ramdisk = await buildRamdisk();
  const cmdline = `console=ttyS0 quiet panic=-1 no_timer_check metalcast.insecure metalcast.controller=10.0.2.2:${port}`;
  const bootServer = await startBootServer({ kernel: ramdisk.kernel.path, initramfs: ramdisk.initramfs.path });
  const mac = labMac(0x4c1000 + run);
  bootServer.plans.set(mac, { boot: 'ramdisk', cmdline });
  const boot: BootSource = mode === 'kernel' ? { kernel: ramdisk.kernel.path, initrd: ramdisk.initramfs.path, append: cmdline } : 'network';
  const name = `boot-time-${mode}-${run}`;
  const started = Date.now();
  const guest = await startGuest({
    name,
    mac,
    diskPath: join(work, `${name}.img`),
    diskSizeBytes: 64 * 1024 * 1024,
    boot,
    netBootUrl: bootServer.entryUrl,
    consolePath: join(work, `${name}.console.log`),
    qmpSocketPath: join(work, `${name}.qmp`),
    memoryMiB,
  });
  try {
    const phases: Record<string, number> = {};
    for (const [label, pattern] of PHASES) {
      await guest.waitForConsole(pattern, 120_000);
      phases[label] = Date.now() - started;
    }
    const at = await Promise.race([
      firstConnection,
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error('no connection within 120 s')), 120_000)),
    ]);
    return { phases, connectMs: at - started };
  } finally {
    await guest.stop();
    await bootServer.close();
    controller.close();
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] as number;
}

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '3' }, memory: { type: 'string', default: '1024' }, 'no-network': { type: 'boolean' } },
});
const why = labUnavailable();
if (why) {
  console.error(`boot-time: ${why}`);
  process.exit(1);
}
const work = mkdtempSync(join(tmpdir(), 'metalcast-boot-time-'));
try {
  const modes: ('kernel' | 'network')[] = values['no-network'] ? ['kernel'] : ['kernel', 'network'];
  for (const mode of modes) {
    const samples: Sample[] = [];
    for (let run = 0; run < Number(values.runs); run++) {
      const sample = await measureOnce(run, mode, work, Number(values.memory));
      samples.push(sample);
      console.log(
        `${mode} run ${run + 1}: ${PHASES.map(([label]) => `${label} ${sample.phases[label]} ms`).join(', ')}, first lookup ${sample.connectMs} ms`,
      );
    }
    console.log(
      `${mode} boot, median of ${samples.length}: ${PHASES.map(([label]) => `${label} ${median(samples.map((s) => s.phases[label] as number))} ms`).join(', ')}, first lookup ${median(samples.map((s) => s.connectMs))} ms`,
    );
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
