import type { PowerDriver } from './os-power.js';
import type { CommandHandler } from './command.js';

/*
 * Power commands wait for the driver, so that a refusal becomes the
 * command's error. With a real OS the machine may go away before the result
 * is reported; the controller expects that after a final power action.
 */

export function powerOffCommand(driver: PowerDriver): CommandHandler<'powerOff'> {
  return {
    name: 'powerOff',
    whileBusy: true,
    async run(_parameters, { logger }) {
      logger.info('powering off');
      await driver.powerOff();
      return undefined;
    },
  };
}

export function rebootCommand(driver: PowerDriver): CommandHandler<'reboot'> {
  return {
    name: 'reboot',
    whileBusy: true,
    async run(_parameters, { logger }) {
      logger.info('rebooting');
      await driver.reboot();
      return undefined;
    },
  };
}
