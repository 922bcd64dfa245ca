import { MetalcastError } from './errors.js';
import { Status } from 'nice-grpc-common';

const MAC_PATTERN = /^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$/i;

/**
 * Normalises a MAC address to lower-case colon form ("aa:bb:cc:dd:ee:ff"),
 * accepting either case and ':' or '-' separators. Anything else is an
 * INVALID_ARGUMENT that quotes the bad value.
 */
export function normaliseMac(input: string, field = 'mac_address'): string {
  const trimmed = input.trim();
  if (!MAC_PATTERN.test(trimmed)) {
    throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}: MAC address '${truncate(input)}' is not of the form aa:bb:cc:dd:ee:ff`);
  }
  return trimmed.toLowerCase().replaceAll('-', ':');
}

/** Normalises a list of MACs, refusing empty lists, oversized lists and duplicates. */
export function normaliseMacList(inputs: readonly string[], field = 'mac_addresses', max = 64): string[] {
  if (inputs.length === 0) throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}: at least one MAC address is required`);
  if (inputs.length > max) {
    throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}: at most ${max} MAC addresses are allowed, got ${inputs.length}`);
  }
  const macs = inputs.map((mac) => normaliseMac(mac, field));
  const seen = new Set<string>();
  for (const mac of macs) {
    if (seen.has(mac)) throw new MetalcastError(Status.INVALID_ARGUMENT, `${field}: MAC address ${mac} is listed twice`);
    seen.add(mac);
  }
  return macs;
}

/** Keeps hostile input from flooding an error message or a log line. */
export function truncate(value: string, max = 64): string {
  return value.length <= max ? value : `${value.slice(0, max)}…(${value.length} characters)`;
}
