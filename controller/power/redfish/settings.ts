import { readFileSync } from 'node:fs';
import { boolean, duration, integer, oneOf } from '../../../common/config.js';
import type { BootMode } from '../power-driver.js';

/** Node properties the redfish driver reads (secret: power.redfish.password). */
export const REDFISH_PROPERTIES = {
  address: 'power.redfish.address',
  systemId: 'power.redfish.system_id',
  username: 'power.redfish.username',
  verifyTls: 'power.redfish.verify_tls',
  caFile: 'power.redfish.ca_file',
  auth: 'power.redfish.auth',
  requestTimeout: 'power.redfish.request_timeout',
  attempts: 'power.redfish.attempts',
  maxInFlight: 'power.redfish.max_in_flight',
  powerTimeout: 'power.redfish.power_timeout',
  softOffTimeout: 'power.redfish.soft_off_timeout',
} as const;
export const REDFISH_PASSWORD_SECRET = 'power.redfish.password';
/** The firmware mode of boot overrides, shared with the other drivers. */
export const BOOT_MODE_PROPERTY = 'boot.mode';

export type RedfishAuthMode = 'auto' | 'session' | 'basic';

/** A node's Redfish settings, validated; durations in milliseconds. */
export interface RedfishSettings {
  /** scheme://host[:port] of the BMC, no path: names the BMC in every error. */
  origin: string;
  /** The system's Id or @odata.id; undefined: the BMC's only system. */
  systemId: string | undefined;
  username: string;
  password: string;
  /** Verify the BMC's certificate (default true). */
  verifyTls: boolean;
  /** PEM CA bundle to verify it with (default: Node's bundled CAs). */
  caPem: string | undefined;
  caFile: string | undefined;
  /** auto: a session (X-Auth-Token), Basic when the BMC has no session service. */
  auth: RedfishAuthMode;
  /** Each HTTP request, from connect to the last byte. */
  requestTimeoutMs: number;
  /** Tries per request on connection errors and 5xx (never 4xx), with backoff. */
  attempts: number;
  /** Most requests in flight to this BMC at once. */
  maxInFlight: number;
  /** How long PowerState may take to reach On or Off after a Reset. */
  powerTimeoutMs: number;
  /** How long a GracefulShutdown may take before ForceOff. */
  softOffTimeoutMs: number;
  bootMode: BootMode;
}

export const REDFISH_DEFAULTS = {
  requestTimeoutMs: 20_000,
  attempts: 4,
  maxInFlight: 2,
  powerTimeoutMs: 120_000,
  softOffTimeoutMs: 60_000,
} as const;

/** Each setting's parse error names the property. */
function parsed<T>(property: string, raw: string | undefined, parse: (raw: string) => T, fallback: T): T {
  if (raw === undefined || raw === '') return fallback;
  try {
    return parse(raw);
  } catch (error) {
    throw new Error(`${property}: ${(error as Error).message}`);
  }
}

/** The BMC's origin from power.redfish.address: a URL (https by default) with no path beyond /redfish/v1. */
export function bmcOrigin(raw: string): string {
  const text = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `https://${raw}`;
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new Error(`${REDFISH_PROPERTIES.address}: '${raw}' is not a BMC address such as https://10.0.0.5 or 10.0.0.5:8443`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:')
    throw new Error(`${REDFISH_PROPERTIES.address}: '${raw}' must be an https:// (or http://) URL`);
  if (url.username || url.password)
    throw new Error(
      `${REDFISH_PROPERTIES.address}: put no credentials in the address; use ${REDFISH_PROPERTIES.username} and the secret ${REDFISH_PASSWORD_SECRET}`,
    );
  if (!['/', '/redfish/v1', '/redfish/v1/'].includes(url.pathname) || url.search)
    throw new Error(
      `${REDFISH_PROPERTIES.address}: '${raw}' should be just the BMC's scheme, host and port (the service root is /redfish/v1/)`,
    );
  return url.origin;
}

/** The settings of a node for the redfish driver; an Error naming the property to fix. No I/O but reading ca_file. */
export function redfishSettings(properties: Record<string, string>, secrets: Record<string, string>): RedfishSettings {
  const address = properties[REDFISH_PROPERTIES.address];
  if (!address) throw new Error(`the redfish power driver needs the property ${REDFISH_PROPERTIES.address} (for example https://10.0.0.5)`);
  const username = properties[REDFISH_PROPERTIES.username];
  if (!username) throw new Error(`the redfish power driver needs the property ${REDFISH_PROPERTIES.username}`);
  const password = secrets[REDFISH_PASSWORD_SECRET];
  if (!password)
    throw new Error(
      `the redfish power driver needs the secret ${REDFISH_PASSWORD_SECRET} (metalcast node set NODE --bmc-password-file FILE)`,
    );
  const caFile = properties[REDFISH_PROPERTIES.caFile] || undefined;
  let caPem: string | undefined;
  if (caFile) {
    try {
      caPem = readFileSync(caFile, 'utf8');
    } catch (error) {
      throw new Error(`${REDFISH_PROPERTIES.caFile}: cannot read ${caFile} on this controller: ${(error as Error).message}`);
    }
    if (!caPem.includes('-----BEGIN CERTIFICATE-----')) throw new Error(`${REDFISH_PROPERTIES.caFile}: ${caFile} holds no PEM certificate`);
  }
  const p = properties;
  const bootMode = parsed(BOOT_MODE_PROPERTY, p[BOOT_MODE_PROPERTY], oneOf(['uefi', 'bios'] as const), 'uefi');
  return {
    origin: bmcOrigin(address),
    systemId: p[REDFISH_PROPERTIES.systemId] || undefined,
    username,
    password,
    verifyTls: parsed(REDFISH_PROPERTIES.verifyTls, p[REDFISH_PROPERTIES.verifyTls], boolean, true),
    caPem,
    caFile,
    auth: parsed(REDFISH_PROPERTIES.auth, p[REDFISH_PROPERTIES.auth], oneOf(['auto', 'session', 'basic'] as const), 'auto'),
    requestTimeoutMs: parsed(
      REDFISH_PROPERTIES.requestTimeout,
      p[REDFISH_PROPERTIES.requestTimeout],
      duration({ min: 100, max: 600_000 }),
      REDFISH_DEFAULTS.requestTimeoutMs,
    ),
    attempts: parsed(REDFISH_PROPERTIES.attempts, p[REDFISH_PROPERTIES.attempts], integer({ min: 1, max: 10 }), REDFISH_DEFAULTS.attempts),
    maxInFlight: parsed(
      REDFISH_PROPERTIES.maxInFlight,
      p[REDFISH_PROPERTIES.maxInFlight],
      integer({ min: 1, max: 16 }),
      REDFISH_DEFAULTS.maxInFlight,
    ),
    powerTimeoutMs: parsed(
      REDFISH_PROPERTIES.powerTimeout,
      p[REDFISH_PROPERTIES.powerTimeout],
      duration({ min: 100, max: 3_600_000 }),
      REDFISH_DEFAULTS.powerTimeoutMs,
    ),
    softOffTimeoutMs: parsed(
      REDFISH_PROPERTIES.softOffTimeout,
      p[REDFISH_PROPERTIES.softOffTimeout],
      duration({ min: 0, max: 3_600_000, allowZero: true }),
      REDFISH_DEFAULTS.softOffTimeoutMs,
    ),
    bootMode,
  };
}
