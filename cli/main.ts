import { tuneHeapForBulkTransfers } from '../common/v8-heap-tuning.js';
import { buildProgram } from './program.js';

tuneHeapForBulkTransfers();
await buildProgram().parseAsync(process.argv);
