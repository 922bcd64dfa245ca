import { type Command, Option } from 'commander';
import { EXIT, exitCodeFor } from '../../common/exit-codes.js';
import { Status } from 'nice-grpc-common';
import { ConfigError } from '../../common/config.js';
import { MetalcastError } from '../../common/errors.js';
import { createLogger } from '../../common/logging.js';
import { CONTROLLER_OPTIONS, loadDatabaseConfig } from '../../controller/config.js';
import { openStore } from '../../controller/controller.js';
import { hashOperatorToken, newOperatorToken, OPERATOR_TOKEN_PREFIX } from '../../controller/auth/operator-auth.js';
import type { OperatorRole, OperatorTokenRecord, Store } from '../../controller/store/store.js';
import { addOptionTable } from '../options.js';
import { formatTime, printJson, printTable } from '../output.js';

/** The controller's database options, with the same defaults and environment variables. */
const DATABASE_OPTIONS = { dataDir: CONTROLLER_OPTIONS.dataDir, database: CONTROLLER_OPTIONS.database };

interface DatabaseFlags {
  dataDir?: string;
  database?: string;
  json?: boolean;
}

const tokenJson = (record: OperatorTokenRecord) => ({
  id: record.id,
  role: record.role,
  description: record.description,
  createdAt: new Date(record.createdAt).toISOString(),
  lastUsedAt: record.lastUsedAt === null ? null : new Date(record.lastUsedAt).toISOString(),
});

/**
 * Opens the controller's database as `metalcast controller` would with the
 * same --database / --data-dir (flags, then METALCAST_DATABASE and
 * METALCAST_DATA_DIR, then the defaults), runs `fn`, closes it; reports a
 * failure as one line with the exit code of docs/exit-codes.md.
 */
async function withStore(flags: DatabaseFlags, fn: (store: Store) => Promise<void>): Promise<void> {
  let store: Store | undefined;
  try {
    const config = loadDatabaseConfig({ dataDir: flags.dataDir, database: flags.database }, process.env);
    store = await openStore(config, createLogger({ name: 'metalcast-token', level: 'silent' }));
    await fn(store);
  } catch (error) {
    process.stderr.write(`error: ${(error as Error).message}\n`);
    process.exitCode =
      error instanceof ConfigError ? EXIT.USAGE : error instanceof MetalcastError ? exitCodeFor(error.status) : EXIT.FAILED;
  } finally {
    await store?.close();
  }
}

/** `metalcast token create|list|delete`: operator tokens, straight in the controller's database. */
export function registerTokenCommands(program: Command): void {
  const token = program
    .command('token')
    .description("manage operator API tokens; talks to the controller's database directly (run it where that is reachable)")
    .addHelpText(
      'after',
      `
Roles: a reader may get, list and watch nodes and images and download images; an admin may also
create, change and delete them (provision actions, maintenance, ports, uploads, imports).
Tokens are shown once, when created; the database keeps only their sha256. A deleted token stops
working on every controller within 5 seconds (controllers remember verified tokens that long).
Use a token with 'metalcast node|image ... --token TOKEN' or METALCAST_TOKEN=TOKEN.`,
    );
  addOptionTable(token, DATABASE_OPTIONS);
  token.option('--json', 'print machine-readable JSON');

  token
    .command('create')
    .description('create a token and print it (once: it is not stored, only its hash)')
    .addOption(
      new Option('--role <role>', 'admin (may change state) or reader (may only read)').choices(['admin', 'reader']).makeOptionMandatory(),
    )
    .option('--description <text>', 'what or who the token is for, shown by token list', '')
    .action(async (opts: { role: OperatorRole; description: string }, command: Command) => {
      const flags = command.optsWithGlobals<DatabaseFlags>();
      if (opts.description.length > 200 || /[\p{Cc}]/u.test(opts.description)) {
        process.stderr.write('error: --description must be at most 200 characters, without control characters\n');
        process.exitCode = 2;
        return;
      }
      await withStore(flags, async (store) => {
        const created = newOperatorToken(opts.role, opts.description);
        await store.createOperatorToken(created.record);
        if (flags.json) return printJson({ ...tokenJson(created.record), token: created.token });
        // The token alone on stdout, so that TOKEN=$(metalcast token create ...) works; the rest on stderr.
        process.stderr.write(`created ${opts.role} token ${created.record.id}:\n`);
        process.stdout.write(`${created.token}\n`);
        process.stderr.write(
          'Copy it now: it will not be shown again (only its hash is stored). Use it with --token or METALCAST_TOKEN.\n',
        );
      });
    });

  token
    .command('list')
    .description('list tokens: id, role, description, created, last used (never the tokens themselves)')
    .action(async (_opts: unknown, command: Command) => {
      const flags = command.optsWithGlobals<DatabaseFlags>();
      await withStore(flags, async (store) => {
        const all = await store.listOperatorTokens();
        if (flags.json) return printJson(all.map(tokenJson));
        printTable(
          ['id', 'role', 'description', 'created', 'last used'],
          all.map((t) => [
            t.id,
            t.role,
            t.description || '-',
            formatTime(new Date(t.createdAt)),
            t.lastUsedAt === null ? 'never' : formatTime(new Date(t.lastUsedAt)),
          ]),
        );
      });
    });

  token
    .command('delete')
    .description('delete a token by its id (tok_…) or by the token itself; controllers refuse it within 5 s')
    .argument('<id>', 'token id as token list shows it, or the token')
    .action(async (id: string, _opts: unknown, command: Command) => {
      const flags = command.optsWithGlobals<DatabaseFlags>();
      await withStore(flags, async (store) => {
        let target = id;
        if (id.startsWith(OPERATOR_TOKEN_PREFIX)) {
          const found = await store.findOperatorTokenByHash(hashOperatorToken(id));
          if (!found) throw notFound('that token is not known (already deleted?)');
          target = found.id;
        } else if (!/^tok_[0-9a-f]{8}$/.test(id)) {
          throw new Error(`'${id}' is not a token id; ids look like tok_1a2b3c4d ('metalcast token list' shows them)`);
        }
        if (!(await store.deleteOperatorToken(target)))
          throw notFound(`no operator token has the id ${target} ('metalcast token list' shows them)`);
        if (flags.json) return printJson({ deleted: target });
        process.stdout.write(`deleted token ${target}; controllers refuse it within 5 seconds\n`);
      });
    });
}

const notFound = (message: string) => new MetalcastError(Status.NOT_FOUND, message);
