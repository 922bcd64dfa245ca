/**
 * ipmi_sim's chassis control program for a lab guest (lan.conf
 * `chassis_control "node chassis-control.mjs QMP_SOCKET NIC_ID"`): ipmi_sim
 * runs it for every chassis request it gets over IPMI, as
 *
 *   … get power boot          → prints "power:1" and "boot:pxe", one a line
 *   … set power "1"           → power on (set power "0": off)
 *   … set reset "1"           → hard reset
 *   … set boot "pxe"          → boot device (pxe, default = disk; others refused)
 *
 * and acts on the QEMU guest through its QMP socket, the way the qemu power
 * driver does (controller/power/qemu.ts): off is "CPUs stopped" (QEMU runs
 * with -no-shutdown and -S), on is system_reset + cont, the boot device is
 * the NIC's bootindex (1 before the disk's 2, 3 after it). A non-zero exit
 * makes ipmi_sim answer the IPMI request with an error.
 *
 * Plain JavaScript, node built-ins only, outside the project's module graph:
 * ipmi_sim waits for it on every request, and Node's type stripping would
 * add about half a second to each start on a busy machine.
 */
import { createConnection } from 'node:net';

const [socketPath, nicId, op, ...rest] = process.argv.slice(2);

/**
 * @param {string} path
 * @returns {Promise<(command: string, args?: Record<string, unknown>) => Promise<unknown>>}
 */
function qmpSession(path) {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    socket.setEncoding('utf8');
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer on the QMP socket ${path} within 5 s`));
    }, 5000);
    let buffer = '';
    /** @type {((message: Record<string, unknown>) => void) | undefined} */
    let waiting;
    /** @type {Record<string, unknown>[]} */
    const queue = [];
    socket.on('data', (text) => {
      buffer += text;
      for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (line === '') continue;
        const message = JSON.parse(line);
        if ('event' in message) continue;
        if (waiting) {
          const deliver = waiting;
          waiting = undefined;
          deliver(message);
        } else queue.push(message);
      }
    });
    socket.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    const next = () =>
      /** @type {Promise<Record<string, unknown>>} */ (
        new Promise((deliver) => {
          const queued = queue.shift();
          if (queued) deliver(queued);
          else waiting = deliver;
        })
      );
    /** @param {string} command @param {Record<string, unknown>} [args] */
    const execute = async (command, args) => {
      socket.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) })}\n`);
      const reply = await next();
      if (reply.error) throw new Error(`QMP ${command}: ${JSON.stringify(reply.error)}`);
      return reply.return;
    };
    next()
      .then(() => execute('qmp_capabilities'))
      .then(() => {
        clearTimeout(timer);
        resolve(execute);
      })
      .catch(reject);
  });
}

async function main() {
  if (!socketPath || !nicId || (op !== 'get' && op !== 'set' && op !== 'check')) {
    throw new Error('usage: chassis-control.mjs QMP_SOCKET NIC_ID get NAME… | set NAME VALUE…');
  }
  if (op === 'check') return;
  const qmp = await qmpSession(socketPath);
  const status = async () => /** @type {{ status: string }} */ (await qmp('query-status')).status;
  const nic = `/machine/peripheral/${nicId}`;
  if (op === 'get') {
    for (const name of rest) {
      if (name === 'power') process.stdout.write(`power:${(await status()) === 'running' ? 1 : 0}\n`);
      else if (name === 'boot') {
        const index = await qmp('qom-get', { path: nic, property: 'bootindex' });
        process.stdout.write(`boot:${index === 1 ? 'pxe' : 'default'}\n`);
      } else throw new Error(`cannot get '${name}'`);
    }
    return;
  }
  for (let i = 0; i + 1 < rest.length; i += 2) {
    const name = rest[i];
    const value = String(rest[i + 1]).replace(/^"|"$/g, '');
    if (name === 'power') {
      const now = await status();
      if (value === '0') {
        if (now === 'running') await qmp('stop');
      } else if (now !== 'running') {
        // Fresh from -S the machine has never run; otherwise it starts over from a reset, as a power on does.
        if (now !== 'prelaunch') await qmp('system_reset');
        await qmp('cont');
      }
    } else if (name === 'reset') {
      const now = await status();
      if (now !== 'prelaunch') await qmp('system_reset');
      if (now !== 'running') await qmp('cont');
    } else if (name === 'boot') {
      if (value !== 'pxe' && value !== 'default' && value !== 'none') {
        throw new Error(`this lab machine boots from pxe or its disk (default), not '${value}'`);
      }
      const wanted = value === 'pxe' ? 1 : 3;
      // QEMU refuses to set an index the device already has.
      if ((await qmp('qom-get', { path: nic, property: 'bootindex' })) !== wanted) {
        await qmp('qom-set', { path: nic, property: 'bootindex', value: wanted });
      }
    } else if (name === 'shutdown') {
      if ((await status()) === 'running') await qmp('stop');
    } else {
      throw new Error(`cannot set '${name}'`);
    }
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stderr.write(`chassis-control: ${error.message}\n`);
    process.exit(1);
  },
);
