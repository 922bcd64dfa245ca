import pino, { type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export const LOG_LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/**
 * Paths that may carry secrets. Redaction is the safety net; the code also
 * never puts a token into a log binding on purpose.
 */
const REDACT_PATHS = [
  'token',
  'agentToken',
  'authorization',
  'password',
  'secrets',
  'setSecrets',
  '*.token',
  '*.agentToken',
  '*.authorization',
  '*.password',
  '*.secrets',
  '*.setSecrets',
  'metadata.authorization',
];

/**
 * Creates the one root logger of a process. Everything else gets a child of
 * it, so that bindings such as the node uuid follow every line.
 */
export function createLogger(options: { name: string; level: LevelWithSilent; destination?: pino.DestinationStream }): Logger {
  return pino(
    {
      name: options.name,
      level: options.level,
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    options.destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
