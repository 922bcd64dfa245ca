/**
 * What a BMC said when it refused a request, and the one place that turns a
 * Redfish error body into an Error (as sushy's exceptions.HTTPError does).
 * The body, per DSP0266 §9.6 "Error responses":
 *
 *   { "error": { "code": "Base.1.8.GeneralError", "message": "…",
 *                "@Message.ExtendedInfo": [ { "MessageId": "…", "Message": "…",
 *                                             "Resolution": "…", "Severity": "Warning" } ] } }
 *
 * The message of the error says which BMC, which request, the status, and
 * the BMC's own words (every ExtendedInfo message with its resolution), so
 * that an operator reading a node's last_error knows what the BMC wanted.
 */

/** One @Message.ExtendedInfo entry. */
export interface RedfishMessage {
  messageId: string;
  message: string;
  resolution: string;
  severity: string;
}

/** A request the BMC answered with an error status (4xx or 5xx). */
export class RedfishError extends Error {
  override name = 'RedfishError';

  constructor(
    readonly bmc: string,
    readonly method: string,
    readonly path: string,
    readonly status: number,
    /** error.code of the body, e.g. Base.1.8.PropertyValueNotInList; '' when none. */
    readonly code: string,
    /** error.message of the body; '' when none. */
    readonly detail: string,
    readonly messages: readonly RedfishMessage[],
  ) {
    super(`${method} ${path} answered ${status}${describeBody(code, detail, messages)}`);
  }

  /** True for 401: the credentials, or the session, were refused. */
  get unauthorized(): boolean {
    return this.status === 401;
  }
}

/** The part of a message that quotes the BMC: ": code: message (ExtendedInfo: …; resolution: …)". */
function describeBody(code: string, detail: string, messages: readonly RedfishMessage[]): string {
  const head = [code, detail].filter((part) => part !== '').join(': ');
  const extended = messages
    .map((m) => [m.message || m.messageId, m.resolution ? `resolution: ${m.resolution}` : ''].filter((part) => part !== '').join('; '))
    .filter((text) => text !== '' && text !== detail);
  const parts = [head, ...extended].filter((part) => part !== '');
  return parts.length ? `: ${parts.join(' — ')}` : '';
}

/** Longest text taken from a BMC's error body, per field: a hostile or broken BMC must not flood last_error. */
const MAX_FIELD = 300;
const MAX_MESSAGES = 5;

function text(value: unknown): string {
  if (typeof value !== 'string') return '';
  // No control characters reach a terminal or a log viewer.
  const clean = value.replace(/\p{Cc}/gu, ' ').trim();
  return clean.length > MAX_FIELD ? `${clean.slice(0, MAX_FIELD)}…` : clean;
}

/** The RedfishError for an error response; `body` is the raw text (JSON or not). */
export function redfishErrorFrom(bmc: string, method: string, path: string, status: number, body: string): RedfishError {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    parsed = undefined;
  }
  const error = (parsed as { error?: Record<string, unknown> } | undefined)?.error;
  if (!error || typeof error !== 'object') {
    // Not a Redfish error body (a proxy's HTML page, or nothing): quote a little of it.
    const snippet = text(body.replace(/<[^>]*>/g, ' ').replace(/\s+/g, ' '));
    return new RedfishError(bmc, method, path, status, '', snippet, []);
  }
  const info = error['@Message.ExtendedInfo'];
  const list = Array.isArray(info) ? info : info && typeof info === 'object' ? [info] : [];
  const messages = list.slice(0, MAX_MESSAGES).map((entry: Record<string, unknown>) => ({
    messageId: text(entry?.MessageId),
    message: text(entry?.Message),
    resolution: text(entry?.Resolution),
    severity: text(entry?.Severity),
  }));
  return new RedfishError(bmc, method, path, status, text(error.code), text(error.message), messages);
}

/** The request never got an answer: refused, reset, timed out, TLS refused. Retried with backoff. */
export class RedfishConnectionError extends Error {
  override name = 'RedfishConnectionError';

  constructor(
    readonly method: string,
    readonly path: string,
    message: string,
    /** Retrying cannot help (a certificate the controller does not trust). */
    readonly permanent = false,
  ) {
    super(`${method} ${path}: ${message}`);
  }
}
