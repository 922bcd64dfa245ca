import { isIP } from 'node:net';

/**
 * OpenStack's network_data.json, as cloud-init's ConfigDrive datasource
 * reads it (cloudinit/sources/helpers/openstack.py, convert_net_json):
 * `links` are NICs (by MAC), bonds and VLANs; `networks` put addresses,
 * routes or DHCP on a link; `services` name DNS servers. Checked here so
 * that a mistake is refused at the deploy request, with the field named,
 * instead of leaving a machine without network after a long deploy.
 * Unknown keys are kept: cloud-init ignores what it does not use.
 */

/** Largest network_data.json accepted, in bytes. */
export const MAX_NETWORK_DATA_BYTES = 64 * 1024;

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;
const NETWORK_TYPES = new Set(['ipv4', 'ipv6', 'ipv4_dhcp', 'ipv6_dhcp', 'ipv6_slaac', 'ipv6_dhcpv6-stateless', 'ipv6_dhcpv6-stateful']);
/** Link types cloud-init renders as physical NICs (it needs their MAC). */
const PHYSICAL_TYPES = new Set([
  'phy',
  'ethernet',
  'bridge',
  'hw_veb',
  'hyperv',
  'ovs',
  'tap',
  'vhostuser',
  'vif',
  'dvs',
  'bridge',
  'vrouter',
  'midonet',
  'unbound',
  '802.1qbh',
  '802.1qbg',
  'ib',
  'infiniband',
]);

type Json = Record<string, unknown>;

export class NetworkDataError extends Error {
  override name = 'NetworkDataError';
}

const fail = (message: string): never => {
  throw new NetworkDataError(message);
};

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function array(parent: Json, key: string, where: string): Json[] {
  const value = parent[key];
  if (value === undefined) return [];
  if (!Array.isArray(value)) fail(`${where}.${key}: must be a list`);
  return (value as unknown[]).map((item, i) => (isObject(item) ? item : fail(`${where}.${key}[${i}]: must be an object`)));
}

function text(parent: Json, key: string, where: string, required = true): string | undefined {
  const value = parent[key];
  if (value === undefined || value === null) return required ? fail(`${where}.${key}: required`) : undefined;
  if (typeof value !== 'string' || value === '') fail(`${where}.${key}: must be a non-empty string`);
  return value as string;
}

function ip(parent: Json, key: string, where: string, family?: 4 | 6, required = true): string | undefined {
  const value = text(parent, key, where, required);
  if (value === undefined) return undefined;
  const found = isIP(value);
  if (found === 0) fail(`${where}.${key}: '${value.slice(0, 60)}' is not an IP address`);
  if (family && found !== family) fail(`${where}.${key}: '${value}' is not an IPv${family} address`);
  return value;
}

/** A netmask as dotted quad (IPv4), IPv6 mask, or prefix length; returns the prefix length. */
function prefixOf(mask: string, family: 4 | 6, where: string): number {
  if (/^\d{1,3}$/.test(mask)) {
    const bits = Number(mask);
    if (bits > (family === 4 ? 32 : 128)) fail(`${where}: prefix length ${bits} is too long for IPv${family}`);
    return bits;
  }
  if (isIP(mask) !== family) fail(`${where}: '${mask.slice(0, 60)}' is not an IPv${family} netmask`);
  const bits =
    family === 4
      ? mask
          .split('.')
          .map((part) => Number(part).toString(2).padStart(8, '0'))
          .join('')
      : expandIpv6(mask)
          .map((group) => Number.parseInt(group, 16).toString(2).padStart(16, '0'))
          .join('');
  if (!/^1*0*$/.test(bits)) fail(`${where}: '${mask}' is not a netmask (its ones are not contiguous)`);
  return bits.indexOf('0') === -1 ? bits.length : bits.indexOf('0');
}

function expandIpv6(address: string): string[] {
  const [head = '', tail = ''] = address.split('::');
  const left = head ? head.split(':') : [];
  const right = address.includes('::') ? (tail ? tail.split(':') : []) : [];
  const missing = 8 - left.length - right.length;
  return [...left, ...Array<string>(Math.max(0, missing)).fill('0'), ...right];
}

export interface NetworkDataSummary {
  /** One line per network, e.g. "nic0 (52:54:00:12:34:56) 10.0.2.50/24 via 10.0.2.2". */
  lines: string[];
}

/**
 * Parses and checks network_data.json; throws {@link NetworkDataError} with
 * the JSON path of the first problem. Returns one summary line per network
 * and the DNS servers.
 */
export function checkNetworkData(raw: string): NetworkDataSummary {
  if (Buffer.byteLength(raw) > MAX_NETWORK_DATA_BYTES) fail(`larger than ${MAX_NETWORK_DATA_BYTES} bytes`);
  let data: unknown;
  try {
    data = JSON.parse(raw);
  } catch (error) {
    fail(`not JSON: ${(error as Error).message}`);
  }
  if (!isObject(data)) return fail('must be a JSON object with links, networks and services');
  const links = new Map<string, Json>();
  for (const [i, link] of array(data, 'links', '').entries()) {
    const where = `links[${i}]`;
    const id = text(link, 'id', where) as string;
    if (links.has(id)) fail(`${where}.id: '${id}' is used by another link`);
    const type = text(link, 'type', where) as string;
    const mac = text(link, 'ethernet_mac_address', where, PHYSICAL_TYPES.has(type));
    if (mac !== undefined && !MAC.test(mac))
      fail(`${where}.ethernet_mac_address: '${mac.slice(0, 40)}' is not of the form aa:bb:cc:dd:ee:ff`);
    if (
      link.mtu !== undefined &&
      link.mtu !== null &&
      (!Number.isInteger(link.mtu) || (link.mtu as number) < 68 || (link.mtu as number) > 65535)
    ) {
      fail(`${where}.mtu: must be a whole number from 68 to 65535`);
    }
    links.set(id, link);
  }
  for (const [i, link] of [...links.values()].entries()) {
    const where = `links[${i}]`;
    if (link.type === 'bond') {
      const members = link.bond_links;
      if (!Array.isArray(members) || members.length === 0) fail(`${where}.bond_links: a bond needs a list of link ids`);
      for (const member of members as unknown[]) {
        if (typeof member !== 'string' || !links.has(member)) fail(`${where}.bond_links: '${String(member)}' is not the id of a link`);
      }
      text(link, 'bond_mode', where);
    }
    if (link.type === 'vlan') {
      const parent = text(link, 'vlan_link', where) as string;
      if (!links.has(parent)) fail(`${where}.vlan_link: '${parent}' is not the id of a link`);
      if (!Number.isInteger(link.vlan_id) || (link.vlan_id as number) < 1 || (link.vlan_id as number) > 4094) {
        fail(`${where}.vlan_id: must be a whole number from 1 to 4094`);
      }
    }
  }
  const lines: string[] = [];
  const ids = new Set<string>();
  for (const [i, network] of array(data, 'networks', '').entries()) {
    const where = `networks[${i}]`;
    const id = text(network, 'id', where, false);
    if (id !== undefined) {
      if (ids.has(id)) fail(`${where}.id: '${id}' is used by another network`);
      ids.add(id);
    }
    const type = text(network, 'type', where) as string;
    if (!NETWORK_TYPES.has(type)) fail(`${where}.type: '${type.slice(0, 40)}' is not one of ${[...NETWORK_TYPES].join(', ')}`);
    const linkId = text(network, 'link', where) as string;
    const link = links.get(linkId) ?? fail(`${where}.link: '${linkId}' is not the id of a link`);
    const on = `${linkId}${link.ethernet_mac_address ? ` (${String(link.ethernet_mac_address).toLowerCase()})` : ''}`;
    if (type !== 'ipv4' && type !== 'ipv6') {
      lines.push(`${on} ${type.replace('_', ' ')}`);
      continue;
    }
    const family = type === 'ipv4' ? 4 : 6;
    const address = ip(network, 'ip_address', where, family) as string;
    const mask = text(network, 'netmask', where, family === 4);
    const prefix = mask === undefined ? 64 : prefixOf(mask, family, `${where}.netmask`);
    const via: string[] = [];
    if (network.gateway !== undefined) via.push(ip(network, 'gateway', where, family) as string);
    for (const [r, route] of array(network, 'routes', where).entries()) {
      const at = `${where}.routes[${r}]`;
      const destination = ip(route, 'network', at, family) as string;
      const routeMask = text(route, 'netmask', at) as string;
      const bits = prefixOf(routeMask, family, `${at}.netmask`);
      const gateway = ip(route, 'gateway', at, family) as string;
      via.push(bits === 0 ? gateway : `${gateway} for ${destination}/${bits}`);
    }
    const nameservers = network.dns_nameservers;
    if (nameservers !== undefined && !Array.isArray(nameservers)) fail(`${where}.dns_nameservers: must be a list`);
    for (const [d, server] of ((nameservers as unknown[]) ?? []).entries()) {
      if (typeof server !== 'string' || isIP(server) === 0) fail(`${where}.dns_nameservers[${d}]: not an IP address`);
    }
    lines.push(`${on} ${address}/${prefix}${via.length ? ` via ${via.join(', ')}` : ''}`);
  }
  const dns: string[] = [];
  for (const [i, service] of array(data, 'services', '').entries()) {
    const where = `services[${i}]`;
    const type = text(service, 'type', where) as string;
    if (type === 'dns') dns.push(ip(service, 'address', where) as string);
  }
  if (dns.length > 0) lines.push(`dns ${dns.join(', ')}`);
  return { lines };
}
