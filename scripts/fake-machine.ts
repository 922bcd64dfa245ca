// A fake machine to run one agent on, outside the demo and the tests:
//   npm run fake-machine -- DIR [--index N]
// DIR gets a sysfs/procfs/dev tree the agent reads with --root DIR, and a sparse 1 GiB disk file.
// Prints the MACs to enrol the node with and the agent command line (docs/development.md).
import { existsSync, readdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { integer } from '../common/config.js';
import { uniqueFakeMachine } from '../demo/fake-machine.js';

const { values, positionals } = parseArgs({ options: { index: { type: 'string', default: '0' } }, allowPositionals: true });
const [dirArg] = positionals;
if (!dirArg || positionals.length > 1) {
  process.stderr.write('usage: npm run fake-machine -- DIR [--index N]   (N picks distinct MACs and serials, 0 by default)\n');
  process.exit(2);
}
let index: number;
try {
  index = integer({ min: 0, max: 4_194_303 })(values.index ?? '0');
} catch (error) {
  process.stderr.write(`error: --index: ${(error as Error).message}\n`);
  process.exit(2);
}
const dir = resolve(dirArg);
if (existsSync(dir) && readdirSync(dir).length > 0) {
  process.stderr.write(`error: ${dir} is not empty; give a new folder\n`);
  process.exit(1);
}
const machine = await uniqueFakeMachine(dir, index);
process.stdout.write(
  `fake machine in ${dir}: MACs ${machine.macs.join(', ')}, disk ${machine.disks[0]?.path} (${(machine.disks[0]?.sizeBytes ?? 0) / 1024 ** 3} GiB, sparse)\n` +
    `enrol it:  npx metalcast node create fake-${index} --mac ${machine.macs[0]}\n` +
    `its agent: npx metalcast agent --controller 127.0.0.1:7350 --ca metalcast-data/tls/ca.pem --root ${dir} --listen 127.0.0.1:0 --power-driver recording --power-record-file ${dir}/power.log\n`,
);
