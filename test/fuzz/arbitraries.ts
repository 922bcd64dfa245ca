import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { createFileRegistry, type DescField, type DescMessage, fromBinary, ScalarType } from '@bufbuild/protobuf';
import { FileDescriptorSetSchema } from '@bufbuild/protobuf/wkt';
import fc from 'fast-check';

/*
 * Arbitraries for the fuzz suite, built from the descriptors of the proto
 * contract (gen/metalcast.binpb) in the shape ts-proto gives messages
 * (camelCase fields, numbers for enums and 64-bit integers, Date for
 * Timestamp, { $case, value } for oneofs): whatever a field is, the fuzzer
 * covers it, including fields added after this file was written.
 */

const DESCRIPTOR_SET = fileURLToPath(new URL('../../gen/metalcast.binpb', import.meta.url));

export const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(DESCRIPTOR_SET)));

export function messageDesc(typeName: string): DescMessage {
  const desc = registry.getMessage(typeName);
  if (!desc) throw new Error(`no message ${typeName} in ${DESCRIPTOR_SET}`);
  return desc;
}

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

/** Strings of every kind a hostile peer could send: empty, ASCII, any Unicode, controls and NUL, huge. */
export const anyString: fc.Arbitrary<string> = fc.oneof(
  { weight: 3, arbitrary: fc.constant('') },
  { weight: 4, arbitrary: fc.string({ maxLength: 40 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'grapheme', maxLength: 20 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 20 }) },
  {
    weight: 2,
    arbitrary: fc.string({
      unit: fc.constantFrom(
        '\u0000',
        '\n',
        '\t',
        '\u001b',
        '\u007f',
        '\u0085',
        '\u202e',
        '\ufffd',
        'a',
        'Z',
        '0',
        ':',
        '/',
        '.',
        '-',
        ' ',
        '%',
      ),
      maxLength: 30,
    }),
  },
  { weight: 1, arbitrary: fc.integer({ min: 60, max: 300 }).map((n) => 'a'.repeat(n)) },
  { weight: 1, arbitrary: fc.integer({ min: 1000, max: 80_000 }).map((n) => 'x'.repeat(n)) },
);

/** Names by the node and image rule. */
export const validName: fc.Arbitrary<string> = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/);

/** Random well-formed MACs, lower-case colon form. */
export const validMac: fc.Arbitrary<string> = fc
  .array(fc.integer({ min: 0, max: 255 }), { minLength: 6, maxLength: 6 })
  .map((b) => b.map((x) => x.toString(16).padStart(2, '0')).join(':'));

/** Names by the node and image rule, and just outside it. */
export const nameLike: fc.Arbitrary<string> = fc.oneof(
  validName,
  fc.constantFrom('-leading-dash', '.hidden', 'a'.repeat(63), 'a'.repeat(64), 'with space', 'ünïcode', 'a/b', '..'),
);

const hexDigits = (length: number) => fc.string({ unit: fc.constantFrom(...'0123456789abcdef'), minLength: length, maxLength: length });
export const sha256Like: fc.Arbitrary<string> = fc.oneof(
  hexDigits(64),
  hexDigits(64).map((h) => h.toUpperCase()),
  hexDigits(63),
  hexDigits(65),
  anyString,
);

export const macLike: fc.Arbitrary<string> = fc.oneof(
  validMac,
  fc
    .array(fc.integer({ min: 0, max: 255 }), { minLength: 6, maxLength: 6 })
    .map((b) => b.map((x) => x.toString(16).padStart(2, '0').toUpperCase()).join('-')),
  fc.constantFrom('zz:11', '02:00:00:00:00', '02:00:00:00:00:00:00', '02:00:00:00:00:0g', ' 02:00:00:00:00:01 ', '02:00-00:00:00:01'),
  anyString,
);

export const uuidLike: fc.Arbitrary<string> = fc.oneof(
  fc.uuid(),
  fc.uuid().map((u) => u.toUpperCase()),
  anyString,
);

/** Only loopback or unparseable: the fuzzer must never make the controller fetch from or dial the network. */
export function loopbackOnlyUrl(raw: string): string {
  try {
    const url = new URL(raw);
    if ((url.protocol === 'http:' || url.protocol === 'https:') && !['127.0.0.1', '[::1]'].includes(url.hostname)) {
      url.hostname = '127.0.0.1';
      url.port = '1';
      return url.href;
    }
  } catch {
    // not a URL: harmless
  }
  return raw;
}

export const importUrlLike: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(
    'http://127.0.0.1:1/image.img',
    'https://127.0.0.1:1/image.img',
    'http://[::1]:1/x',
    'http://user:secret@127.0.0.1:1/x',
    'ftp://127.0.0.1/x',
    'file:///etc/passwd',
    'http://',
    'javascript:alert(1)',
    `http://127.0.0.1:1/${'a'.repeat(3000)}`,
  ),
  fc.webUrl().map(loopbackOnlyUrl),
  anyString.map(loopbackOnlyUrl),
);

export const checksumLike: fc.Arbitrary<string> = fc.oneof(
  hexDigits(64).map((h) => `sha256:${h}`),
  hexDigits(128).map((h) => `sha512:${h}`),
  hexDigits(64).map((h) => `SHA256:${h.toUpperCase()}`),
  hexDigits(64).map((h) => `md5:${h}`),
  sha256Like.map((h) => `sha256:${h}`),
  anyString,
);

const AGENT_ADDRESS = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):\d{1,5}$/;

/** Agent addresses the controller could dial are only ever 127.0.0.1:1 (closed). */
export function loopbackOnlyAddress(raw: string): string {
  return AGENT_ADDRESS.test(raw) ? '127.0.0.1:1' : raw;
}

export const agentAddressLike: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom('', '127.0.0.1:1', '127.0.0.1:0', '127.0.0.1:65536', '127.0.0.1:99999', '[::1]:1', 'no-port', ':1'),
  anyString.map(loopbackOnlyAddress),
);

export const pageTokenLike: fc.Arbitrary<string> = fc.oneof(
  fc.constant(''),
  fc.jsonValue({ maxDepth: 2 }).map((value) => Buffer.from(JSON.stringify(value) ?? 'null').toString('base64url')),
  fc.oneof(fc.double(), fc.integer(), nameLike).map((value) => Buffer.from(JSON.stringify(value)).toString('base64url')),
  anyString,
);

export const devicePathLike: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom('/dev/sda', '/dev/nvme0n1', '/dev/../etc/passwd', 'dev/sda', '/', '/dev/disk/by-path/pci-0000:00:1f.2-ata-1'),
  anyString.map((s) => `/${s}`),
  anyString,
);

/** String arbitraries by field name (proto, snake_case); `key` and `value` are the properties map's. */
export type StringHints = Record<string, fc.Arbitrary<string>>;

export const DEFAULT_STRING_HINTS: StringHints = {
  mac_addresses: macLike,
  mac_address: macLike,
  sha256: sha256Like,
  checksum: checksumLike,
  url: importUrlLike,
  agent_address: agentAddressLike,
  page_token: pageTokenLike,
  device_path: devicePathLike,
  device_paths: devicePathLike,
  system_uuid: uuidLike,
  key: fc.oneof(fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$/), anyString),
};

export interface MessageOptions {
  strings?: StringHints;
  /** Most entries in a repeated or map field, except now and then (maxLength x 20). */
  maxLength?: number;
  /** Nesting depth below which message fields are still filled. */
  maxDepth?: number;
}

function scalarArbitrary(name: string, scalar: ScalarType, strings: StringHints): fc.Arbitrary<unknown> {
  switch (scalar) {
    case ScalarType.STRING:
      return strings[name] ?? anyString;
    case ScalarType.BOOL:
      return fc.boolean();
    case ScalarType.BYTES:
      return fc.uint8Array({ maxLength: 256 }).map((bytes) => Buffer.from(bytes));
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return fc.oneof(fc.double(), fc.constantFrom(Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, -0, -1));
    case ScalarType.INT32:
    case ScalarType.SINT32:
    case ScalarType.SFIXED32:
      return fc.oneof(fc.integer(), fc.constantFrom(0, -1, 2 ** 31 - 1, -(2 ** 31)));
    case ScalarType.UINT32:
    case ScalarType.FIXED32:
      return fc.oneof(fc.integer({ min: 0, max: 1000 }), fc.integer({ min: 0, max: 2 ** 32 - 1 }), fc.constantFrom(0, 1, 2 ** 32 - 1));
    case ScalarType.INT64:
    case ScalarType.SINT64:
    case ScalarType.SFIXED64:
      return fc.oneof(fc.integer({ min: -1000, max: 1000 }), fc.maxSafeInteger(), fc.constantFrom(0, -1, MAX_SAFE, -MAX_SAFE));
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return fc.oneof(fc.integer({ min: 0, max: 1 << 20 }), fc.maxSafeNat(), fc.constantFrom(0, 1, MAX_SAFE));
  }
}

/** Known enum values, values outside them, and UNRECOGNIZED (-1). */
function enumArbitrary(values: readonly number[]): fc.Arbitrary<number> {
  return fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom(...values) },
    { weight: 1, arbitrary: fc.constantFrom(-1, values.length, 99, 2 ** 31 - 1, -(2 ** 31)) },
  );
}

const TIMESTAMP = 'google.protobuf.Timestamp';

function fieldArbitrary(field: DescField, options: Required<MessageOptions>, depth: number): fc.Arbitrary<unknown> {
  const strings = options.strings;
  const many = <T>(element: fc.Arbitrary<T>) =>
    fc.oneof(
      { weight: 9, arbitrary: fc.array(element, { maxLength: options.maxLength }) },
      { weight: 1, arbitrary: fc.array(element, { minLength: options.maxLength, maxLength: options.maxLength * 20 }) },
    );
  switch (field.fieldKind) {
    case 'scalar':
      return scalarArbitrary(field.name, field.scalar, strings);
    case 'enum':
      return enumArbitrary(field.enum.values.map((v) => v.number));
    case 'message':
      if (field.message.typeName === TIMESTAMP) {
        return fc.option(fc.date({ min: new Date(0), max: new Date(4_102_444_800_000), noInvalidDate: true }), { nil: undefined });
      }
      return depth >= options.maxDepth
        ? fc.constant(undefined)
        : fc.option(messageArbitraryAt(field.message, options, depth + 1), { nil: undefined });
    case 'list': {
      const element =
        field.listKind === 'scalar'
          ? scalarArbitrary(field.name, field.scalar, strings)
          : field.listKind === 'enum'
            ? enumArbitrary(field.enum.values.map((v) => v.number))
            : depth >= options.maxDepth
              ? fc.constant(undefined)
              : messageArbitraryAt(field.message, options, depth + 1);
      return many(element).map((values) => values.filter((v) => v !== undefined));
    }
    case 'map': {
      const key = strings.key ?? anyString;
      const value =
        field.mapKind === 'scalar'
          ? (strings.value ?? anyString)
          : depth >= options.maxDepth
            ? fc.constant(undefined)
            : fc.constant(undefined);
      return many(fc.tuple(key, value)).map((entries) => Object.fromEntries(entries.filter(([, v]) => v !== undefined)));
    }
  }
}

function messageArbitraryAt(desc: DescMessage, options: Required<MessageOptions>, depth: number): fc.Arbitrary<Record<string, unknown>> {
  const parts: Record<string, fc.Arbitrary<unknown>> = {};
  for (const field of desc.fields) {
    if (field.oneof) continue;
    const arbitrary = fieldArbitrary(field, options, depth);
    parts[field.localName] = field.proto.proto3Optional ? fc.option(arbitrary, { nil: undefined }) : arbitrary;
  }
  for (const oneof of desc.oneofs) {
    parts[oneof.localName] = fc.oneof(
      fc.constant(undefined),
      ...oneof.fields.map((field) => fieldArbitrary(field, options, depth).map((value) => ({ $case: field.localName, value }))),
    );
  }
  return fc.record(parts);
}

/** Arbitrary messages of `typeName` in ts-proto's shape. */
export function messageArbitrary(typeName: string, options: MessageOptions = {}): fc.Arbitrary<Record<string, unknown>> {
  return messageArbitraryAt(
    messageDesc(typeName),
    { strings: { ...DEFAULT_STRING_HINTS, ...options.strings }, maxLength: options.maxLength ?? 4, maxDepth: options.maxDepth ?? 3 },
    0,
  );
}

/**
 * Bytes no correct client sends: a varint past 64 bits, wire types 6 and 7,
 * a length past the end, groups (deprecated, and unbalanced), invalid UTF-8,
 * uint64 beyond Number.MAX_SAFE_INTEGER, deep nesting, and a field repeated
 * many times.
 */
const CRAFTED: readonly Uint8Array[] = [
  Uint8Array.of(0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01),
  Uint8Array.of(0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01),
  Uint8Array.of(0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f),
  Uint8Array.of(0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f),
  Uint8Array.of(0x0e),
  Uint8Array.of(0x0f),
  Uint8Array.of(0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f),
  Uint8Array.of(0x0a, 0x05, 0x61),
  Uint8Array.of(0x0b),
  Uint8Array.of(0x0c),
  Uint8Array.of(0x0a, 0x04, 0xff, 0xfe, 0xc0, 0x80),
  Uint8Array.of(0x12, 0x02, 0xed, 0xa0),
  new Uint8Array(3000).fill(0x0b),
  Uint8Array.from({ length: 4000 }, (_, i) => (i % 2 === 0 ? 0x12 : 0x7f)),
  Uint8Array.from({ length: 3000 }, (_, i) => (i % 2 === 0 ? 0x0a : 0x00)),
  Uint8Array.of(0x80),
  Uint8Array.of(0x00),
  Uint8Array.of(0x20, 0x80, 0x80, 0x80, 0x80, 0x10),
  Uint8Array.of(0x21, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f),
];

type Mutation = [kind: 'flip' | 'set' | 'cut' | 'insert' | 'repeat', at: number, byte: number];

function mutate(bytes: Uint8Array, mutations: readonly Mutation[]): Uint8Array {
  let out = Buffer.from(bytes);
  for (const [kind, at, byte] of mutations) {
    const i = out.length === 0 ? 0 : at % out.length;
    switch (kind) {
      case 'flip':
        if (out.length > 0) out[i] = (out[i] as number) ^ (1 << (byte % 8));
        break;
      case 'set':
        if (out.length > 0) out[i] = byte;
        break;
      case 'cut':
        out = out.subarray(0, i);
        break;
      case 'insert':
        out = Buffer.concat([out.subarray(0, i), Buffer.of(byte), out.subarray(i)]);
        break;
      case 'repeat':
        out = Buffer.concat([out, out]);
        break;
    }
  }
  return out;
}

/** Raw request bytes: random, crafted, and valid encodings with a few bytes broken. */
export function rawBytesArbitrary(valid: fc.Arbitrary<Uint8Array>): fc.Arbitrary<Uint8Array> {
  const mutation: fc.Arbitrary<Mutation> = fc.tuple(
    fc.constantFrom('flip', 'set', 'cut', 'insert', 'repeat'),
    fc.nat(),
    fc.integer({ min: 0, max: 255 }),
  );
  return fc.oneof(
    { weight: 2, arbitrary: fc.uint8Array({ maxLength: 300 }) },
    { weight: 2, arbitrary: fc.constantFrom(...CRAFTED) },
    { weight: 4, arbitrary: fc.tuple(valid, fc.array(mutation, { minLength: 1, maxLength: 4 })).map(([b, m]) => mutate(b, m)) },
    { weight: 1, arbitrary: valid },
  );
}
