import { join } from 'node:path';
import { SqliteStore } from '../../controller/store/sqlite.js';
import { tempDir } from '../helpers/controller.js';
import { runStoreContract } from './store-contract.js';

runStoreContract('SqliteStore', async () => {
  const dir = tempDir('metalcast-store-');
  const store = SqliteStore.open(join(dir.path, 'metalcast.db'));
  return {
    store,
    cleanup: async () => {
      await store.close();
      dir.remove();
    },
  };
});
