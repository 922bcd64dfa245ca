import { Status } from 'nice-grpc-common';

/**
 * The exit codes of every `metalcast` command, one mapping for the whole CLI
 * (docs/exit-codes.md): a script can tell "fix your command" from "it is not
 * there" from "try again later" without reading the message.
 */
export const EXIT = {
  /** Done. */
  OK: 0,
  /** The operation failed: wrong state, locked, already exists, a check that failed, a bug (INTERNAL). */
  FAILED: 1,
  /** The command line is wrong: an unknown command or flag, a bad value, a bad file (INVALID_ARGUMENT, OUT_OF_RANGE). */
  USAGE: 2,
  /** What the command names does not exist: a node, an image, a token (NOT_FOUND). */
  NOT_FOUND: 3,
  /** Not allowed: no or a wrong operator token, or a role that may not do this (UNAUTHENTICATED, PERMISSION_DENIED). */
  ACCESS: 4,
  /** The controller could not be reached or did not answer in time, or a wait ran out (UNAVAILABLE, DEADLINE_EXCEEDED). */
  UNAVAILABLE: 5,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** The exit code for a gRPC status (the server's answer, or the client's own UNAVAILABLE/DEADLINE_EXCEEDED). */
export function exitCodeFor(status: Status): ExitCode {
  switch (status) {
    case Status.OK:
      return EXIT.OK;
    case Status.INVALID_ARGUMENT:
    case Status.OUT_OF_RANGE:
      return EXIT.USAGE;
    case Status.NOT_FOUND:
      return EXIT.NOT_FOUND;
    case Status.UNAUTHENTICATED:
    case Status.PERMISSION_DENIED:
      return EXIT.ACCESS;
    case Status.UNAVAILABLE:
    case Status.DEADLINE_EXCEEDED:
      return EXIT.UNAVAILABLE;
    default:
      return EXIT.FAILED;
  }
}
