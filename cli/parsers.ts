import { InvalidArgumentError } from 'commander';
import { byteSize, integer } from '../common/config.js';

/*
 * Flag value parsers for the CLI: every numeric and size flag goes through
 * one of these, so that `--disk-size lots` is refused with a sentence naming
 * the flag (exit code 2) instead of reaching the wire as NaN.
 */

/** Wraps a config parser (which throws Error) for commander, which wants InvalidArgumentError. */
export const asCli =
  <T>(parse: (raw: string) => T) =>
  (raw: string): T => {
    try {
      return parse(raw);
    } catch (error) {
      throw new InvalidArgumentError((error as Error).message);
    }
  };

/** A whole number between min and max. */
export const cliInteger = (min: number, max: number) => asCli(integer({ min, max }));

/** The same, kept as the string a node property stores (BMC port, cipher suite). */
export const cliIntegerString = (min: number, max: number) => (raw: string) => String(cliInteger(min, max)(raw));

/** Bytes, with K, M, G, T suffixes (powers of 1024): 500G, 1.5T, 1048576. */
export const cliSize = (min: number, max: number) => asCli(byteSize({ min, max }));

/** The largest disk size a flag accepts: 1 PiB. */
export const MAX_DISK_BYTES = 1024 ** 5;
