import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { Client } from '@grpc/grpc-js';
import fc from 'fast-check';
import { createClient } from 'nice-grpc';
import { HealthDefinition } from 'nice-grpc-server-health';
import { Status } from 'nice-grpc-common';
import { agentMetadata, NODE_UUID_KEY } from '../../common/agent-metadata.js';
import { AgentGatewayServiceDefinition, LookupResponse } from '../../gen/metalcast/v1/agent_gateway.js';
import { ImageServiceDefinition } from '../../gen/metalcast/v1/image.js';
import { type Node, NodeServiceDefinition, ProvisionAction } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, lookup } from '../helpers/agent-client.js';
import { FAST_FLAGS, startTestController, type TestController } from '../helpers/controller.js';
import { addImage, makeImageContent } from '../helpers/images.js';
import {
  anyString,
  macLike,
  messageArbitrary,
  nameLike,
  rawBytesArbitrary,
  type StringHints,
  uuidLike,
  validMac,
  validName,
} from './arbitraries.js';
import {
  assertAcceptable,
  fcOptions,
  type FuzzMethod,
  fuzzMethod,
  type MetadataSpec,
  methodsOf,
  type Outcome,
  rawCall,
  rawClient,
  requestsOf,
  runs,
  Tally,
} from './harness.js';

/*
 * Every RPC of every service the controller serves gets thousands of random
 * and malformed requests in total, against a real controller with a real
 * SQLite store: typed messages with hostile values, and raw bytes that are
 * not protobuf at all. Each answer must be a status a correct server gives
 * (never INTERNAL or UNKNOWN, which mean a handler threw; never DATA_LOSS);
 * afterwards the controller must still be healthy, the nodes and images it
 * had must be unchanged, and nothing may have been rejected unhandled.
 *
 * The fuzzer acts for real on two things of its own: the node 'fuzz-ops'
 * (operator calls name it) and the node 'fuzz-agent' (deploy wait, in
 * maintenance so that the controller leaves it alone, with its agent token
 * and its deploy image), so that deep paths run too. Seeds it never names
 * are compared before and after. Addresses it could make the controller dial
 * or fetch from are loopback only (arbitraries.ts).
 *
 * METALCAST_FUZZ_RUNS=20 runs twenty times as many cases; METALCAST_FUZZ_SEED
 * replays the seed a failure printed.
 */

const TYPED_RUNS = runs(150);
const RAW_RUNS = runs(100);

describe('controller fuzz: hostile requests on every RPC', () => {
  let t: TestController;
  let raw: Client;
  const tally = new Tally();
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  const suffix = randomBytes(4).toString('hex');
  const seeds: Node[] = [];
  let seedImage = '';
  let seedImageBefore: unknown;
  let fuzzAgent: Node;
  let fuzzAgentToken = '';
  let fuzzOps: Node;
  const FUZZ_AGENT_MACS = ['02:f0:22:00:00:01', '02:f0:22:00:00:02'];
  const FUZZ_OPS_MACS = ['02:f0:22:00:01:01'];

  const operatorMetadata = (): MetadataSpec => (t.adminToken === '' ? {} : { authorization: `Bearer ${t.adminToken}` });
  /** fuzz-ops as it is now, created again (manageable, out of maintenance) if the fuzzer deleted it. */
  async function ensureFuzzOps(): Promise<Node> {
    const found = await t.nodes.getNode({ node: 'fuzz-ops' }).catch(() => undefined);
    if (found?.node) return found.node;
    const { node } = await t.nodes.createNode({ name: 'fuzz-ops', macAddresses: FUZZ_OPS_MACS });
    await t.nodes.setProvisionState({ node: node!.uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    return node!;
  }
  const agentMetadataSpec = (): MetadataSpec => ({ [NODE_UUID_KEY]: fuzzAgent.uuid, authorization: `Bearer ${fuzzAgentToken}` });

  before(async () => {
    process.on('unhandledRejection', onUnhandled);
    process.on('uncaughtException', onUnhandled);
    t = await startTestController({
      ...FAST_FLAGS,
      heartbeatTimeout: '60s',
      heartbeatIntervalMin: '200ms',
      heartbeatIntervalMax: '400ms',
      imageChunkSize: '64K',
      importAttempts: '1',
      maxImageSize: '64M',
    });
    raw = rawClient(t.channel);

    // Seeds the fuzzer never names: compared before and after.
    const enrolled = await t.nodes.createNode({
      name: `seed-${suffix}-enroll`,
      macAddresses: ['02:5e:ed:00:00:01'],
      properties: { rack: 'r1' },
    });
    const manageable = await t.nodes.createNode({ name: `seed-${suffix}-manageable`, macAddresses: ['02:5e:ed:00:00:02'] });
    await t.nodes.setProvisionState({ node: manageable.node!.uuid, action: ProvisionAction.PROVISION_ACTION_MANAGE });
    await t.nodes.setMaintenance({ node: manageable.node!.uuid, enabled: true, reason: 'seed' });
    const waiting = await createWaitingNode(t.nodes, `seed-${suffix}-waiting`, ['02:5e:ed:00:00:03']);
    await t.nodes.setMaintenance({ node: waiting.uuid, enabled: true, reason: 'seed' });
    await lookup(t.gateway, ['02:5e:ed:00:00:03']);
    for (const uuid of [enrolled.node!.uuid, manageable.node!.uuid, waiting.uuid]) {
      seeds.push((await t.nodes.getNode({ node: uuid })).node!);
    }
    seedImage = `seed-${suffix}`;
    await addImage(t.controller, seedImage, makeImageContent(100_000));
    seedImageBefore = (await t.images.getImage({ name: seedImage })).image;

    // The agent's own node: deploy wait with a deploy image, in maintenance so that no one else acts on it.
    await addImage(t.controller, 'fuzz-image', makeImageContent(300_000));
    const agentNode = await createWaitingNode(t.nodes, 'fuzz-agent', FUZZ_AGENT_MACS);
    await t.nodes.setMaintenance({ node: agentNode.uuid, enabled: true, reason: 'fuzzed' });
    fuzzAgentToken = (await lookup(t.gateway, FUZZ_AGENT_MACS)).agentToken;
    const moved = await t.controller.store.transition(agentNode.uuid, {
      from: ['inspect_wait'],
      to: 'deploy_wait',
      target: 'active',
      keepAgentToken: true,
      deployJson: JSON.stringify({ image: 'fuzz-image' }),
      event: { kind: 'transition', message: 'fuzz set-up', actor: 'test', fromState: 'inspect_wait', toState: 'deploy_wait' },
    });
    assert.ok(moved, 'fuzz-agent moved to deploy wait');
    fuzzAgent = agentNode;
    fuzzOps = await ensureFuzzOps();
  });

  after(async () => {
    raw?.close();
    await t?.destroy();
    process.off('unhandledRejection', onUnhandled);
    process.off('uncaughtException', onUnhandled);
  });

  /** Runs the typed and the raw property of one method. */
  function fuzz(
    method: FuzzMethod,
    client: unknown,
    validMetadata: () => MetadataSpec,
    typed: fc.Arbitrary<unknown[]>,
    onOutcome?: (outcome: Outcome) => void,
  ): Promise<void> {
    return fuzzMethod({ client, raw, validMetadata, tally }, method, typed, { typedRuns: TYPED_RUNS, rawRuns: RAW_RUNS }, onOutcome);
  }

  describe('AgentGatewayService', () => {
    const methods = methodsOf(AgentGatewayServiceDefinition);
    const gatewayStrings = (): StringHints => ({
      mac_addresses: fc.oneof(fc.constantFrom(...FUZZ_AGENT_MACS, ...FUZZ_OPS_MACS), macLike),
      image: fc.oneof(fc.constantFrom('fuzz-image', seedImage), nameLike, anyString),
    });

    for (const method of methods) {
      it(`${method.name}`, async (ctx) => {
        const client = createClient(AgentGatewayServiceDefinition, t.channel);
        const readImage = method.name === 'ReadImage' || method.name === 'StatImage';
        // ReadImage also gets offsets and lengths around the image's size (300,000 bytes).
        const extra = readImage
          ? fc
              .record({
                image: fc.constantFrom('fuzz-image', seedImage, ''),
                offset: fc.oneof(
                  fc.constantFrom(0, 1, 65_535, 65_536, 299_999, 300_000, 300_001, Number.MAX_SAFE_INTEGER),
                  fc.maxSafeNat(),
                ),
                length: fc.oneof(fc.constantFrom(0, 1, 65_536, 300_000, 300_001, Number.MAX_SAFE_INTEGER), fc.maxSafeNat()),
              })
              .map((m) => [m])
          : undefined;
        await fuzz(method, client, agentMetadataSpec, requestsOf(method, gatewayStrings(), extra), (outcome) => {
          // A lookup that found fuzz-agent rotated its token: keep using the new one.
          if (method.name !== 'Lookup' || outcome.code !== Status.OK) return;
          const response = Buffer.isBuffer(outcome.response)
            ? LookupResponse.decode(outcome.response)
            : (outcome.response as LookupResponse);
          if (response.nodeUuid === fuzzAgent.uuid) fuzzAgentToken = response.agentToken;
        });
        ctx.diagnostic(tally.describe(method.path));
      });
    }
  });

  describe('NodeService', () => {
    const nodeStrings = (): StringHints => ({
      node: fc.oneof(fc.constantFrom('fuzz-ops', fuzzOps.uuid), nameLike, uuidLike, anyString),
      nodes: fc.oneof(fc.constantFrom('fuzz-ops', fuzzOps.uuid), nameLike, uuidLike, anyString),
      name: fc.oneof(fc.constant('fuzz-ops'), nameLike, anyString),
      mac_addresses: fc.oneof(fc.constantFrom(...FUZZ_OPS_MACS), macLike),
      mac_address: fc.oneof(fc.constantFrom(...FUZZ_OPS_MACS), macLike),
      image: fc.oneof(fc.constantFrom('fuzz-image', 'no-such-image'), nameLike, anyString),
      reason: anyString,
    });
    /** Requests that pass the first checks, so that the deeper paths run as often as the checks. */
    const plausible = (method: FuzzMethod): fc.Arbitrary<unknown[]> | undefined => {
      const ref = fc.constantFrom('fuzz-ops', fuzzOps.uuid);
      const mac = fc.oneof(fc.constantFrom(...FUZZ_OPS_MACS), validMac);
      const text = fc.string({ maxLength: 30 });
      const one = (arbitrary: fc.Arbitrary<unknown>) => arbitrary.map((m) => [m]);
      switch (method.name) {
        case 'CreateNode':
          return one(
            fc.record({
              name: fc.oneof(fc.constant('fuzz-ops'), validName),
              macAddresses: fc.uniqueArray(mac, { minLength: 1, maxLength: 3 }),
              properties: fc.dictionary(fc.stringMatching(/^[a-z][a-z0-9./-]{0,20}$/), text, { maxKeys: 3 }),
            }),
          );
        case 'AddNodePort':
        case 'RemoveNodePort':
          return one(fc.record({ node: ref, macAddress: mac }));
        case 'SetMaintenance':
          return one(fc.record({ node: ref, enabled: fc.boolean(), reason: text }));
        case 'UpdateNode': {
          const key = fc.stringMatching(/^[a-z][a-z0-9./-]{0,20}$/);
          return one(
            fc.record({
              node: ref,
              setProperties: fc.dictionary(key, text, { maxKeys: 3 }),
              unsetProperties: fc.array(key, { maxLength: 3 }),
              setSecrets: fc.dictionary(key, text, { maxKeys: 3 }),
              unsetSecrets: fc.array(key, { maxLength: 3 }),
            }),
          );
        }
        case 'SetProvisionState':
          return one(
            fc.record({
              node: ref,
              action: fc.integer({ min: 0, max: 6 }),
              deploy: fc.option(fc.record({ image: fc.constantFrom('fuzz-image', 'no-such-image'), target: fc.constant(undefined) }), {
                nil: undefined,
              }),
            }),
          );
        case 'ListNodes':
          return one(
            fc.record({
              provisionState: fc.integer({ min: 0, max: 14 }),
              maintenance: fc.option(fc.boolean(), { nil: undefined }),
              pageSize: fc.integer({ min: 0, max: 1000 }),
              pageToken: fc.oneof(
                fc.constant(''),
                validName.map((n) => Buffer.from(JSON.stringify(n)).toString('base64url')),
              ),
            }),
          );
        case 'ListNodeEvents':
          return one(
            fc.record({
              node: ref,
              pageSize: fc.integer({ min: 0, max: 1000 }),
              pageToken: fc.oneof(
                fc.constant(''),
                fc.nat(1000).map((n) => Buffer.from(JSON.stringify(n)).toString('base64url')),
              ),
            }),
          );
        case 'WatchNodes':
          return one(fc.record({ nodes: fc.subarray(['fuzz-ops', fuzzOps.uuid]) }));
        default:
          return one(fc.record({ node: ref }));
      }
    };
    for (const method of methodsOf(NodeServiceDefinition)) {
      it(`${method.name}`, async (ctx) => {
        // An earlier method may have deleted fuzz-ops: every method gets it back, manageable.
        fuzzOps = await ensureFuzzOps();
        const client = createClient(NodeServiceDefinition, t.channel);
        await fuzz(method, client, operatorMetadata, requestsOf(method, nodeStrings(), plausible(method)));
        ctx.diagnostic(tally.describe(method.path));
      });
    }
  });

  describe('ImageService', () => {
    const imageStrings = (): StringHints => ({
      name: fc.oneof(fc.constantFrom('fuzz-upload', 'fuzz-import'), nameLike, anyString),
    });
    for (const method of methodsOf(ImageServiceDefinition)) {
      it(`${method.name}`, async (ctx) => {
        const client = createClient(ImageServiceDefinition, t.channel);
        let extra: fc.Arbitrary<unknown[]> | undefined;
        if (method.name === 'UploadImage') {
          // A header with a plausible name first, then data: what gets past the first checks.
          const header = messageArbitrary('metalcast.v1.UploadImageHeader', { strings: imageStrings() }).map((value) => ({
            part: { $case: 'header', value },
          }));
          const data = fc
            .uint8Array({ minLength: 0, maxLength: 3000 })
            .map((bytes) => ({ part: { $case: 'data', value: Buffer.from(bytes) } }));
          // And uploads that can succeed: a fresh name, data, and the sha256 and size right, absent or wrong.
          const whole = fc
            .tuple(
              validName,
              fc.array(fc.uint8Array({ minLength: 1, maxLength: 3000 }), { minLength: 1, maxLength: 3 }),
              fc.constantFrom('none', 'right', 'wrong'),
            )
            .map(([name, chunks, claim]) => {
              const content = Buffer.concat(chunks);
              const sha256 = createHash('sha256').update(content).digest('hex');
              const header =
                claim === 'none'
                  ? { name, sha256: '', sizeBytes: 0 }
                  : claim === 'right'
                    ? { name, sha256, sizeBytes: content.length }
                    : { name, sha256: sha256.replace(/^./, (c) => (c === '0' ? '1' : '0')), sizeBytes: content.length + 1 };
              return [
                { part: { $case: 'header', value: header } },
                ...chunks.map((chunk) => ({ part: { $case: 'data', value: Buffer.from(chunk) } })),
              ];
            });
          extra = fc.oneof(
            fc.tuple(header, fc.array(data, { maxLength: 3 })).map(([h, d]) => [h, ...d]),
            whole,
          );
        }
        if (method.name === 'DownloadImage') {
          extra = fc
            .record({
              name: fc.constantFrom('fuzz-image', seedImage),
              offset: fc.oneof(fc.constantFrom(0, 65_536, 99_999, 100_000, 100_001, 300_000, Number.MAX_SAFE_INTEGER), fc.maxSafeNat()),
            })
            .map((m) => [m]);
        }
        await fuzz(method, client, operatorMetadata, requestsOf(method, imageStrings(), extra));
        ctx.diagnostic(tally.describe(method.path));
      });
    }
  });

  describe('Health and reflection', () => {
    for (const method of methodsOf(HealthDefinition as never)) {
      it(`${method.name}`, async (ctx) => {
        const client = createClient(HealthDefinition, t.channel);
        const request = fc
          .record({ service: fc.oneof(fc.constantFrom('', 'metalcast.v1.NodeService', 'no.such.Service'), anyString) })
          .map((m) => [m]);
        await fuzz(method, client, () => ({}), request);
        ctx.diagnostic(tally.describe(method.path));
      });
    }
    it('ServerReflectionInfo (raw bytes)', async (ctx) => {
      const method: FuzzMethod = {
        service: 'grpc.reflection.v1.ServerReflection',
        name: 'ServerReflectionInfo',
        key: 'serverReflectionInfo',
        path: '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
        requestStream: true,
        responseStream: true,
        requestTypeName: undefined,
        requestType: { encode: () => ({ finish: () => new Uint8Array() }), fromPartial: () => ({}) },
      };
      // A valid list_services request (field 7, a string) among the random ones.
      const valid = fc.constant([Uint8Array.of(0x3a, 0x01, 0x2a)]);
      await fc.assert(
        fc.asyncProperty(
          valid.chain((v) => fc.tuple(...v.map((one) => rawBytesArbitrary(fc.constant(one))))),
          async (messages) => {
            const outcome = await rawCall(raw, method, messages, operatorMetadata());
            tally.add(method, outcome);
            assertAcceptable(method, outcome);
          },
        ),
        fcOptions(RAW_RUNS),
      );
      ctx.diagnostic(tally.describe(method.path));
    });
  });

  describe('afterwards', () => {
    it('still answers health checks, kept the seeds as they were, and rejected nothing unhandled', async (ctx) => {
      ctx.diagnostic(`${tally.calls} fuzzed calls`);
      assert.ok(tally.calls >= 4000 * Math.min(1, TYPED_RUNS / 150), `thousands of calls were made (${tally.calls})`);
      const health = createClient(HealthDefinition, t.channel);
      assert.equal((await health.check({ service: '' })).status, 1 /* SERVING */);
      for (const seed of seeds) {
        const now = (await t.nodes.getNode({ node: seed.uuid })).node;
        assert.deepEqual(now, seed, `seed node ${seed.name} is unchanged`);
      }
      assert.deepEqual((await t.images.getImage({ name: seedImage })).image, seedImageBefore, 'the seed image is unchanged');
      // The controller still works for a good agent: fuzz-agent's current token still reads its image.
      const stat = await createClient(AgentGatewayServiceDefinition, t.channel).statImage(
        { image: 'fuzz-image' },
        { metadata: agentMetadata(fuzzAgent.uuid, fuzzAgentToken) },
      );
      assert.equal(stat.sizeBytes, 300_000);
      assert.deepEqual(unhandled, [], 'no unhandled rejection or uncaught exception');
    });
  });
});
