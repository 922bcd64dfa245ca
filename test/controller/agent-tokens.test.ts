import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type Channel, createChannel, createClient, Status } from 'nice-grpc';
import { agentApiToken } from '../../common/agent-credentials.js';
import { agentMetadata } from '../../common/agent-metadata.js';
import { createLogger } from '../../common/logging.js';
import { loadControllerConfig } from '../../controller/config.js';
import { type RunningController, startController } from '../../controller/controller.js';
import { AgentGatewayServiceDefinition } from '../../gen/metalcast/v1/agent_gateway.js';
import { NodeServiceDefinition, ProvisionAction, ProvisionState } from '../../gen/metalcast/v1/node.js';
import { createWaitingNode, lookup, openHeartbeat } from '../helpers/agent-client.js';
import { type AgentProcess, msg, spawnAgent } from '../helpers/agent-process.js';
import { eventually, tempDir } from '../helpers/controller.js';
import { uniqueFakeMachine } from '../helpers/fake-machine.js';
import { assertRejectsWith } from '../helpers/grpc-assert.js';

/*
 * The agent token's promises, end to end: 256 bits, only a hash (and the
 * credential derived from it) at rest, never in a log line of the
 * controller or the agent (debug level included), a new one on every
 * lookup that the old one stops working for, and wiped once the node
 * leaves the states that expect an agent.
 */

describe('agent tokens', () => {
  const dir = tempDir('metalcast-tokens-');
  let controller: RunningController;
  let channel: Channel;
  const lines: string[] = [];
  const agents: AgentProcess[] = [];
  const tokens = new Set<string>();

  before(async () => {
    const config = loadControllerConfig(
      {
        listen: '127.0.0.1:0',
        metricsListen: '127.0.0.1:0',
        dataDir: join(dir.path, 'data'),
        controllerId: 'tokens-test',
        insecure: 'true',
        operatorAuth: 'none',
        heartbeatTimeout: '10s',
        heartbeatIntervalMin: '200ms',
        heartbeatIntervalMax: '400ms',
        heartbeatFlushInterval: '50ms',
        sweepInterval: '200ms',
        startupGrace: '0s',
      },
      {},
    );
    const destination = { write: (line: string) => void lines.push(line) };
    controller = await startController(config, createLogger({ name: 'tokens-test', level: 'trace', destination }));
    channel = createChannel(controller.grpcAddress);
  });

  after(async () => {
    await Promise.all(agents.map((agent) => agent.kill('SIGKILL')));
    channel.close();
    await controller.stop();
    dir.remove();
  });

  it('rotates on every lookup, stops the old one, and is wiped when the node leaves the agent states', async () => {
    const gateway = createClient(AgentGatewayServiceDefinition, channel);
    const nodes = createClient(NodeServiceDefinition, channel);
    const node = await createWaitingNode(nodes, 'tok-1', ['02:00:00:00:71:01']);
    const first = await lookup(gateway, ['02:00:00:00:71:01']);
    tokens.add(first.agentToken);
    assert.equal(Buffer.from(first.agentToken, 'base64url').length, 32, '256 bits');

    const stored = await controller.store.getNode(node.uuid);
    assert.equal(stored?.agentTokenHash, createHash('sha256').update(first.agentToken).digest('hex'), 'the hash is stored');
    assert.equal(stored?.agentApiToken, agentApiToken(first.agentToken), 'and the credential derived from it');

    const stream = openHeartbeat(gateway, node.uuid, first.agentToken);
    await stream.beat();
    await stream.beat();
    stream.end();
    assert.equal(await stream.ended, undefined);
    await assertRejectsWith(
      gateway.statImage({ image: 'img' }, { metadata: agentMetadata(node.uuid, `${first.agentToken}x`) }),
      Status.UNAUTHENTICATED,
    );

    const second = await eventually(() => lookup(gateway, ['02:00:00:00:71:01']), { what: 'a second lookup' });
    tokens.add(second.agentToken);
    assert.notEqual(second.agentToken, first.agentToken);
    await assertRejectsWith(
      gateway.statImage({ image: 'img' }, { metadata: agentMetadata(node.uuid, first.agentToken) }),
      Status.UNAUTHENTICATED,
      /agent token is not valid/,
    );
    // The current token gets past authentication (the node deploys no image, hence PERMISSION_DENIED).
    await assertRejectsWith(
      gateway.statImage({ image: 'img' }, { metadata: agentMetadata(node.uuid, second.agentToken) }),
      Status.PERMISSION_DENIED,
    );

    await nodes.setProvisionState({ node: node.uuid, action: ProvisionAction.PROVISION_ACTION_ABORT });
    const aborted = await controller.store.getNode(node.uuid);
    assert.equal(aborted?.provisionState, 'inspect_failed');
    assert.equal(aborted?.agentTokenHash, null, 'the hash is wiped');
    assert.equal(aborted?.agentApiToken, null, 'and the credential');
    await assertRejectsWith(
      gateway.statImage({ image: 'img' }, { metadata: agentMetadata(node.uuid, second.agentToken) }),
      Status.UNAUTHENTICATED,
    );
  });

  it('a real agent runs through inspection: its tokens appear in no log line of either side, at debug level', async () => {
    const nodes = createClient(NodeServiceDefinition, channel);
    const machine = await uniqueFakeMachine(join(dir.path, 'machine'), 71);
    const node = await createWaitingNode(nodes, 'tok-agent', [machine.macs[0] as string]);
    await nodes.setMaintenance({ node: node.uuid, enabled: true, reason: 'the test reads the token first' });
    const agent = spawnAgent({ controller: controller.grpcAddress, root: machine.root, 'log-level': 'trace' });
    agents.push(agent);
    await agent.waitForLog(msg('heartbeat stream established'));
    const endpoint = controller.sessions.agentEndpoint(node.uuid);
    assert.ok(endpoint);
    tokens.add(endpoint.token);
    // Inspection calls the agent with the derived credential; the node leaves inspect wait and the token is wiped.
    await nodes.setMaintenance({ node: node.uuid, enabled: false, reason: '' });
    await eventually(
      async () => (await nodes.getNode({ node: node.uuid })).node?.provisionState === ProvisionState.PROVISION_STATE_MANAGEABLE,
      { what: 'inspection to finish' },
    );
    await agent.waitForLog(msg('controller no longer accepts this agent token'));

    const secrets = [...tokens].flatMap((token) => [token, agentApiToken(token)]);
    const agentLines = agent.logs.map((line) => JSON.stringify(line));
    assert.ok(
      lines.some((line) => line.includes('agent looked up its node')),
      'the controller logged the lookups',
    );
    assert.ok(
      agentLines.some((line) => line.includes('heartbeat stream established')),
      'the agent logged its side',
    );
    for (const secret of secrets) {
      assert.equal(lines.filter((line) => line.includes(secret)).length, 0, 'no controller log line holds a token');
      assert.equal(agentLines.filter((line) => line.includes(secret)).length, 0, 'no agent log line holds a token');
    }
  });

  it('keeps no token in the database files', async () => {
    const data = join(dir.path, 'data');
    const files = readdirSync(data).filter((name) => name.startsWith('metalcast.db'));
    assert.ok(files.length > 0);
    const bytes = Buffer.concat(files.map((name) => readFileSync(join(data, name))));
    for (const token of tokens) assert.equal(bytes.includes(Buffer.from(token)), false, 'a token is stored only as its hash');
  });
});
