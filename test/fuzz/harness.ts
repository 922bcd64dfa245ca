import { type Channel, Client, credentials, Metadata as GrpcMetadata, type ServiceError } from '@grpc/grpc-js';
import { isAbortError } from 'abort-controller-x';
import fc from 'fast-check';
import { ClientError, Metadata, Status } from 'nice-grpc-common';
import { messageArbitrary, rawBytesArbitrary, registry, type StringHints } from './arbitraries.js';

/*
 * Sends fuzzed requests to a real server and sorts the answers. Typed
 * requests go through nice-grpc clients (the generated codec, as the CLI and
 * the agent use it); raw bytes go through a grpc-js client with identity
 * serializers. Streams are time-boxed: a call still running after a few
 * messages or a moment of silence is cancelled, which is fine.
 */

/** How many runs each property gets: METALCAST_FUZZ_RUNS multiplies them (e.g. 20 for a long local run). */
export const RUN_FACTOR = Math.max(0.1, Number(process.env.METALCAST_FUZZ_RUNS ?? '1') || 1);
/** METALCAST_FUZZ_SEED replays a failure: fast-check prints the seed (and path) of every failing property. */
export const SEED = process.env.METALCAST_FUZZ_SEED === undefined ? undefined : Number(process.env.METALCAST_FUZZ_SEED);

export const runs = (base: number) => Math.max(1, Math.round(base * RUN_FACTOR));

/** A method of a ts-proto service definition, with what the fuzzer needs to know about it. */
export interface FuzzMethod {
  service: string;
  /** As in the proto, e.g. 'CreateNode'. */
  name: string;
  /** As in the definition and on clients, e.g. 'createNode'. */
  key: string;
  path: string;
  requestStream: boolean;
  responseStream: boolean;
  /** Full proto name of the request message; undefined when it is not in gen/metalcast.binpb (health). */
  requestTypeName: string | undefined;
  requestType: { encode(message: never): { finish(): Uint8Array }; fromPartial(object: never): unknown };
}

interface TsProtoDefinition {
  fullName: string;
  methods: Record<string, { name: string; requestStream: boolean; responseStream: boolean; requestType: FuzzMethod['requestType'] }>;
}

export function methodsOf(definition: TsProtoDefinition): FuzzMethod[] {
  const service = registry.getService(definition.fullName);
  return Object.entries(definition.methods).map(([key, method]) => ({
    service: definition.fullName,
    name: method.name,
    key,
    path: `/${definition.fullName}/${method.name}`,
    requestStream: method.requestStream,
    responseStream: method.responseStream,
    requestTypeName: service?.methods.find((m) => m.name === method.name)?.input.typeName,
    requestType: method.requestType,
  }));
}

/** Plain metadata (printable in counterexamples): header name to value. */
export type MetadataSpec = Record<string, string>;

export interface Outcome {
  /** A gRPC status, or 'timeboxed' for a stream the fuzzer cancelled while it still ran, or 'hung'. */
  code: Status | 'timeboxed' | 'hung';
  details: string;
  /** A unary call's response: the decoded message (typed calls) or its bytes (raw calls). */
  response?: unknown;
}

const UNARY_LIMIT_MS = 10_000;
const STREAM_LIMIT_MS = 300;
const STREAM_IDLE_MS = 20;
const STREAM_MESSAGES = 8;

/** Statuses that mean the server threw, lost data it should have, or does not know its own method. */
const FORBIDDEN = new Set<Outcome['code']>([Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS, Status.UNIMPLEMENTED, 'hung']);

/** Throws (failing the property) unless the outcome is a status a correct server may answer hostile input with. */
export function assertAcceptable(method: FuzzMethod, outcome: Outcome): void {
  if (FORBIDDEN.has(outcome.code)) {
    const code = typeof outcome.code === 'number' ? Status[outcome.code] : outcome.code;
    throw new Error(`${method.path} answered ${code}: ${outcome.details}`);
  }
}

/** A tally of outcomes by method and status, for the test's diagnostics. */
export class Tally {
  private readonly counts = new Map<string, Map<string, number>>();

  add(method: FuzzMethod, outcome: Outcome): void {
    const byCode = this.counts.get(method.path) ?? new Map<string, number>();
    const code = typeof outcome.code === 'number' ? Status[outcome.code] : outcome.code;
    byCode.set(code, (byCode.get(code) ?? 0) + 1);
    this.counts.set(method.path, byCode);
  }

  get calls(): number {
    let total = 0;
    for (const byCode of this.counts.values()) for (const n of byCode.values()) total += n;
    return total;
  }

  describe(path: string): string {
    return [...(this.counts.get(path) ?? new Map()).entries()]
      .sort((a, b) => b[1] - a[1])
      .map(([code, n]) => `${code} ${n}`)
      .join(', ');
  }
}

function niceMetadata(spec: MetadataSpec): Metadata {
  const metadata = Metadata();
  for (const [key, value] of Object.entries(spec)) metadata.set(key, value);
  return metadata;
}

function grpcMetadata(spec: MetadataSpec): GrpcMetadata {
  const metadata = new GrpcMetadata();
  for (const [key, value] of Object.entries(spec)) metadata.set(key, value);
  return metadata;
}

async function* fromArray<T>(items: readonly T[]): AsyncGenerator<T> {
  for (const item of items) yield item;
}

/** A typed call through a nice-grpc client; `messages` has one entry unless the request is a stream. */
export async function typedCall(
  client: unknown,
  method: FuzzMethod,
  messages: readonly unknown[],
  metadata: MetadataSpec,
): Promise<Outcome> {
  const call = (client as Record<string, (request: unknown, options: unknown) => unknown>)[method.key];
  if (!call) throw new Error(`the client has no method ${method.key}`);
  const abort = new AbortController();
  const request = method.requestStream ? fromArray(messages) : messages[0];
  const options = { metadata: niceMetadata(metadata), signal: abort.signal };
  let timedOut = false;
  let timer = setTimeout(
    () => {
      timedOut = true;
      abort.abort();
    },
    method.responseStream ? STREAM_LIMIT_MS : UNARY_LIMIT_MS,
  );
  try {
    if (!method.responseStream) {
      const response = await (call.call(client, request, options) as Promise<unknown>);
      return { code: Status.OK, details: '', response };
    }
    let received = 0;
    for await (const _ of call.call(client, request, options) as AsyncIterable<unknown>) {
      received++;
      if (received >= STREAM_MESSAGES) {
        abort.abort();
        return { code: 'timeboxed', details: `${received} messages` };
      }
      clearTimeout(timer);
      timer = setTimeout(() => {
        timedOut = true;
        abort.abort();
      }, STREAM_IDLE_MS);
    }
    return { code: Status.OK, details: '' };
  } catch (error) {
    if (error instanceof ClientError) return { code: error.code, details: error.details };
    if (isAbortError(error) && timedOut) {
      return method.responseStream ? { code: 'timeboxed', details: '' } : { code: 'hung', details: `no answer within ${UNARY_LIMIT_MS}ms` };
    }
    if (isAbortError(error)) return { code: 'timeboxed', details: '' };
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

/** A grpc-js client for raw bytes on an existing channel (so that it shares the channel's credentials). */
export function rawClient(channel: Channel): Client {
  return new Client('unused', credentials.createInsecure(), { channelOverride: channel });
}

const identity = (bytes: Buffer) => bytes;

function fromServiceError(error: ServiceError, timedOut: boolean, streaming: boolean): Outcome {
  if (error.code === Status.CANCELLED && timedOut) return streaming ? { code: 'timeboxed', details: '' } : { code: 'hung', details: '' };
  return { code: error.code, details: error.details };
}

/** Raw request bytes through grpc-js; `messages` has one entry unless the request is a stream. */
export function rawCall(client: Client, method: FuzzMethod, messages: readonly Uint8Array[], metadata: MetadataSpec): Promise<Outcome> {
  const md = grpcMetadata(metadata);
  const buffers = messages.map((m) => Buffer.from(m.buffer, m.byteOffset, m.byteLength));
  return new Promise<Outcome>((resolve) => {
    let timedOut = false;
    let settled = false;
    const settle = (outcome: Outcome) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(outcome);
    };
    let timer: NodeJS.Timeout;
    const onUnary = (error: ServiceError | null, response?: Buffer) =>
      settle(error ? fromServiceError(error, timedOut, false) : { code: Status.OK, details: '', response });
    if (!method.responseStream) {
      const call = method.requestStream
        ? client.makeClientStreamRequest(method.path, identity, identity, md, {}, onUnary)
        : client.makeUnaryRequest(method.path, identity, identity, buffers[0] ?? Buffer.alloc(0), md, {}, onUnary);
      if (method.requestStream) {
        const writable = call as ReturnType<Client['makeClientStreamRequest']>;
        for (const buffer of buffers) writable.write(buffer);
        writable.end();
      }
      timer = setTimeout(() => {
        timedOut = true;
        call.cancel();
      }, UNARY_LIMIT_MS);
      return;
    }
    const call = method.requestStream
      ? client.makeBidiStreamRequest(method.path, identity, identity, md, {})
      : client.makeServerStreamRequest(method.path, identity, identity, buffers[0] ?? Buffer.alloc(0), md, {});
    if (method.requestStream) {
      const duplex = call as ReturnType<Client['makeBidiStreamRequest']>;
      for (const buffer of buffers) duplex.write(buffer);
      duplex.end();
    }
    let received = 0;
    const cancel = () => {
      timedOut = true;
      call.cancel();
    };
    timer = setTimeout(cancel, STREAM_LIMIT_MS);
    call.on('data', () => {
      received++;
      clearTimeout(timer);
      if (received >= STREAM_MESSAGES) cancel();
      else timer = setTimeout(cancel, STREAM_IDLE_MS);
    });
    call.on('error', (error: ServiceError) => settle(fromServiceError(error, timedOut, true)));
    call.on('status', (status: { code: Status; details: string }) => {
      if (status.code === Status.OK) settle({ code: Status.OK, details: '' });
    });
  });
}

/** Which metadata a call carries: the valid one (resolved at call time: tokens change), none, or one header spoilt. */
export type MetadataChoice = { kind: 'valid' } | { kind: 'none' } | { kind: 'spoilt'; key: string; value: string };

export const metadataChoice: fc.Arbitrary<MetadataChoice> = fc.oneof(
  { weight: 8, arbitrary: fc.constant({ kind: 'valid' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'none' as const }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('spoilt' as const),
      key: fc.constantFrom('authorization', 'metalcast-node-uuid'),
      // Header values must be printable ASCII: grpc-js refuses anything else on the client.
      value: fc.oneof(
        fc.constantFrom('Bearer ', 'Bearer', 'bearer x', 'Basic x', ''),
        fc.string({ maxLength: 60 }).map((s) => `Bearer ${s.replace(/[^\x20-\x7e]/g, '')}`),
        fc.uuid(),
      ),
    }),
  },
);

export function resolveMetadata(choice: MetadataChoice, valid: MetadataSpec): MetadataSpec {
  if (choice.kind === 'valid') return valid;
  if (choice.kind === 'none') return {};
  return { ...valid, [choice.key]: choice.value };
}

/** fast-check options shared by every property: the seed to replay, and no shrinking beyond a minute. */
export function fcOptions(numRuns: number): fc.Parameters<unknown> {
  return { numRuns, ...(SEED === undefined ? {} : { seed: SEED }), interruptAfterTimeLimit: 120_000, markInterruptAsFailure: true };
}

/** A request message encoded as the generated client would (fromPartial fills what is missing). */
export function encodeRequest(method: FuzzMethod, message: unknown): Uint8Array {
  const type = method.requestType as unknown as { encode(m: unknown): { finish(): Uint8Array }; fromPartial?(m: unknown): unknown };
  return type.encode(type.fromPartial ? type.fromPartial(message) : message).finish();
}

export interface FuzzTarget {
  /** A nice-grpc client of the method's service, for typed requests. */
  client: unknown;
  /** A grpc-js client on the same channel, for raw bytes. */
  raw: Client;
  /** The metadata a legitimate caller sends now. */
  validMetadata: () => MetadataSpec;
  tally: Tally;
}

/**
 * The two properties of one method: `typedRuns` typed requests (`typed` gives
 * the messages of one call), then `rawRuns` calls whose messages are raw
 * bytes made from such requests (broken, or replaced by crafted and random
 * bytes). `onOutcome` sees every outcome (a test that tracks tokens).
 */
export async function fuzzMethod(
  target: FuzzTarget,
  method: FuzzMethod,
  typed: fc.Arbitrary<unknown[]>,
  counts: { typedRuns: number; rawRuns: number },
  onOutcome: (outcome: Outcome) => void = () => {},
): Promise<void> {
  const record = (outcome: Outcome) => {
    target.tally.add(method, outcome);
    onOutcome(outcome);
    assertAcceptable(method, outcome);
  };
  await fc.assert(
    fc.asyncProperty(typed, metadataChoice, async (messages, choice) => {
      record(await typedCall(target.client, method, messages, resolveMetadata(choice, target.validMetadata())));
    }),
    fcOptions(counts.typedRuns),
  );
  const bytes = typed
    .map((messages) => (messages.length > 0 ? messages.map((m) => encodeRequest(method, m)) : [new Uint8Array()]))
    .chain((encoded) => fc.tuple(...encoded.map((one) => rawBytesArbitrary(fc.constant(one)))));
  await fc.assert(
    fc.asyncProperty(bytes, metadataChoice, async (messages, choice) => {
      record(await rawCall(target.raw, method, messages, resolveMetadata(choice, target.validMetadata())));
    }),
    fcOptions(counts.rawRuns),
  );
}

/** Requests of the method's type from the contract's descriptors: one for unary requests, up to four for streams; or `extra`. */
export function requestsOf(method: FuzzMethod, strings: StringHints, extra?: fc.Arbitrary<unknown[]>): fc.Arbitrary<unknown[]> {
  if (!method.requestTypeName) {
    if (!extra) throw new Error(`${method.path}: its request type is not in the contract; give an arbitrary`);
    return extra;
  }
  const one = messageArbitrary(method.requestTypeName, { strings });
  const generic = method.requestStream ? fc.array(one, { maxLength: 4 }) : one.map((m) => [m]);
  return extra ? fc.oneof(generic, extra) : generic;
}
