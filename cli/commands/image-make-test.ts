import { randomFillSync } from 'node:crypto';
import { open } from 'node:fs/promises';
import { type Command, Option } from 'commander';
import { EXIT } from '../../common/exit-codes.js';
import { formatBytes } from '../output.js';
import { cliSize } from '../parsers.js';

const MIB = 1024 * 1024;

/**
 * `metalcast image make-test FILE`: a small image to try the quickstart
 * with, made without any tools. Random data with a zero MiB in every four,
 * like the unused space of a real disk image, so that the zero-chunk path of
 * transfers is exercised too. It holds no operating system: an agent writes
 * it and checks its sha256, but nothing boots from it (for a bootable one see
 * `npm run build:test-image` and `npm run build:os-image`).
 */
export function registerImageMakeTestCommand(image: Command): void {
  image
    .command('make-test')
    .description('write a small test image (random data and zeros, no OS) to FILE, for trying metalcast out; no controller needed')
    .argument('<file>', 'file to write')
    .addOption(
      new Option('--size <size>', 'image size: bytes, or with a K, M or G suffix (1M to 4G)')
        .default(64 * MIB, '64M')
        .argParser(cliSize(MIB, 4 * 1024 * MIB)),
    )
    .option('--force', 'replace FILE if it exists')
    .action(async (file: string, opts: { size: number; force?: boolean }) => {
      let handle: Awaited<ReturnType<typeof open>>;
      try {
        handle = await open(file, opts.force ? 'w' : 'wx');
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        process.stderr.write(
          code === 'EEXIST'
            ? `error: ${file} exists; give --force to replace it\n`
            : `error: cannot write ${file}: ${(error as Error).message}\n`,
        );
        process.exitCode = code === 'EEXIST' ? EXIT.FAILED : EXIT.USAGE;
        return;
      }
      try {
        // One MiB at a time: memory stays bounded whatever --size says.
        const block = Buffer.alloc(MIB);
        for (let at = 0, n = 0; at < opts.size; at += MIB, n++) {
          const length = Math.min(MIB, opts.size - at);
          if (n % 4 === 2) block.fill(0);
          else randomFillSync(block);
          await handle.write(block, 0, length, at);
        }
      } finally {
        await handle.close();
      }
      process.stdout.write(
        `wrote ${file}: a ${formatBytes(opts.size)} test image (random data and zeros; nothing boots from it)\n` +
          `upload it with: metalcast image upload ${file} --name test-os\n`,
      );
    });
}
