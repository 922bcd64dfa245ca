import type { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { CommandHandler } from './command.js';

/** Rediscovers the hardware and returns it as the command's result. */
export function getInventoryCommand(discover: () => Promise<Inventory>): CommandHandler<'getInventory'> {
  return {
    name: 'getInventory',
    async run() {
      return { result: { $case: 'inventory', value: await discover() } };
    },
  };
}
