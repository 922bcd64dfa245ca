import { ConfigError } from '../common/config.js';
import { createLogger } from '../common/logging.js';
import { loadControllerConfig } from './config.js';
import { startController } from './controller.js';
import { withGeneratedTls } from './tls/generate.js';

/** Past --shutdown-deadline, the stop's own bound; this is the last resort after it. */
const FINAL_EXIT_GRACE_MS = 2000;

/** `metalcast controller`: parse config, build the logger, run until SIGTERM or SIGINT. */
export async function controllerMain(flags: Record<string, unknown>): Promise<void> {
  let config: ReturnType<typeof loadControllerConfig>;
  try {
    config = loadControllerConfig(flags, process.env);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`metalcast controller: ${error.message}\n`);
      process.exit(2);
    }
    throw error;
  }
  const logger = createLogger({ name: 'metalcast-controller', level: config.logLevel });
  let controller: Awaited<ReturnType<typeof startController>>;
  try {
    config = await withGeneratedTls(config, logger);
    controller = await startController(config, logger);
  } catch (error) {
    if (error instanceof ConfigError) {
      logger.flush();
      process.stderr.write(`metalcast controller: ${error.message}\n`);
      process.exit(2);
    }
    logger.fatal({ err: error }, 'controller failed to start');
    process.stderr.write(`metalcast controller: ${(error as Error).message}\n`);
    logger.flush();
    process.exit(1);
  }
  // On stderr, so that stdout stays pure JSON logs for log shippers.
  process.stderr.write(
    `\nmetalcast controller is running\n  gRPC API:  ${controller.grpcAddress}\n  metrics:   http://${controller.httpAddress}/metrics\n  database:  ${config.database}\n\nnext: npx metalcast node create NAME --mac aa:bb:cc:dd:ee:ff --controller ${controller.grpcAddress}\n\n`,
  );
  let signalled = false;
  const onSignal = (signal: string) => {
    if (signalled) {
      // The operator asked twice: do not make them reach for kill -9.
      logger.warn({ signal }, 'second signal: exiting now without finishing the stop');
      logger.flush();
      process.exit(1);
    }
    signalled = true;
    logger.info({ signal }, 'signal received');
    // stop() gives up on each phase by --shutdown-deadline; this covers a stop that itself never settles.
    setTimeout(() => {
      logger.error({ deadlineMs: config.shutdownDeadline }, 'the stop did not finish by --shutdown-deadline; exiting');
      logger.flush();
      process.exit(1);
    }, config.shutdownDeadline + FINAL_EXIT_GRACE_MS).unref();
    controller.stop().then(
      () => {
        logger.flush();
        process.exit(0);
      },
      (error: unknown) => {
        logger.error({ err: error }, 'unclean stop');
        logger.flush();
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}
