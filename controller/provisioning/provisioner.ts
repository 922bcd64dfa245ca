import { createHash } from 'node:crypto';
import { Status } from 'nice-grpc-common';
import { CONFIG_DRIVE_DISK_BYTES, type ConfigDrive, type InstanceConfig } from '../configdrive/config-drive.js';
import { pickDisk } from '../../common/disk-hints.js';
import { MetalcastError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { DiskHints } from '../../gen/metalcast/v1/command.js';
import { Inventory } from '../../gen/metalcast/v1/inventory.js';
import type { AgentSessions } from '../agents/agent-sessions.js';
import type { NodeLocks } from './locks.js';
import type { NodeFeed } from './node-feed.js';
import type { ImageRecord, NodeRecord, Store, Transition } from '../store/store.js';
import { PowerDrivers } from '../power/drivers.js';
import type { PowerDriver } from '../power/power-driver.js';
import { bootMethodOf, ejectVirtualMedia, type VirtualMediaBoot } from '../boot/virtual-media.js';
import { ACTION_TRANSITIONS, allowedActions, isAgentState, type ProvisionAction, type ProvisionState, type WaitState } from './states.js';

const human = (state: ProvisionState) => state.replaceAll('_', ' ');

/** Bytes a disk must have for an image, and the config drive partition after it when there is one. */
export function diskBytesNeeded(imageBytes: number, withConfigDrive: boolean): number {
  return imageBytes + (withConfigDrive ? CONFIG_DRIVE_DISK_BYTES : 0);
}

/** The stored deploy: what was asked, what the image was, and a summary of the config drive without the user data. */
function deployRecord(deploy: DeploySpecRecord, image: ImageRecord, configDrive: DeployConfigDrive | undefined): DeploySpecRecord {
  const record: DeploySpecRecord = {
    image: deploy.image,
    target: deploy.target,
    imageFormat: image.format === 'qcow2' ? 'IMAGE_FORMAT_QCOW2' : 'IMAGE_FORMAT_RAW',
    imageSha256: image.sha256,
    imageSourceSha256: image.sourceSha256 || image.sha256,
    ...(deploy.fanoutDisabled ? { fanoutDisabled: true } : {}),
  };
  if (!configDrive) return record;
  const { instance, drive } = configDrive;
  return {
    ...record,
    hostname: instance.hostname,
    sshPublicKeys: instance.sshPublicKeys,
    networkData: instance.networkData,
    userDataSizeBytes: instance.userData?.length ?? 0,
    userDataSha256: instance.userData ? createHash('sha256').update(instance.userData).digest('hex') : '',
    userDataType: instance.userDataType ?? '',
    configDrive: { instanceId: drive.instanceId, sizeBytes: drive.iso.length, sha256: drive.sha256 },
  };
}

/**
 * What a deploy writes; stored as JSON with the node, in the JSON form of
 * the proto DeploySpec (so that the API shows it as it is). The user data
 * is never in it, only its size, sha256 and type: the text lives in the
 * config drive alone.
 */
export interface DeploySpecRecord {
  image: string;
  target?: DiskHints | undefined;
  hostname?: string;
  sshPublicKeys?: string[];
  networkData?: string;
  userDataSizeBytes?: number;
  userDataSha256?: string;
  userDataType?: string;
  configDrive?: { instanceId: string; sizeBytes: number; sha256: string };
  /** ImageFormat's JSON name: IMAGE_FORMAT_RAW or IMAGE_FORMAT_QCOW2. */
  imageFormat?: string;
  imageSha256?: string;
  imageSourceSha256?: string;
  /** The deploy's agents neither fetch from nor serve to peers (docs/fanout.md). */
  fanoutDisabled?: boolean;
}

/** A deploy's instance configuration and the config drive built from it. */
export interface DeployConfigDrive {
  instance: InstanceConfig;
  drive: ConfigDrive;
}

/** What an abort does with the machine (proto AbortPower). */
export type AbortPower = 'off' | 'keep';

/** The conductor's side of an abort (controller/provisioning/conductor.ts); set once both exist. */
export interface StepControl {
  /** Stops this controller's step on the node and keeps new ones off it until the returned function is called. */
  interrupt(nodeUuid: string): Promise<() => void>;
  /** Asks the node's live agent to power off; undefined when there is none. */
  powerOffThroughAgent(node: NodeRecord): Promise<string | undefined>;
}

/**
 * Runs operator actions against the state table, each under the node's
 * lock, each step a compare-and-set on the provision state, so two
 * operators racing on the same node cannot both win. Actions that need the
 * agent leave the node in a wait state; the conductor takes it from there.
 */
export class Provisioner {
  /** The conductor, for aborts: set by the controller's wiring. */
  steps: StepControl | undefined;

  constructor(
    private readonly store: Store,
    private readonly sessions: AgentSessions,
    private readonly locks: NodeLocks,
    private readonly feed: NodeFeed,
    private readonly logger: Logger,
    /** This controller's lock holder name: every move is fenced on it, and it is the actor of steps the controller takes itself. */
    private readonly holder: string,
    /** Power drivers by name; a node with a power.driver property is powered on into network boot when its agent is needed. */
    private readonly power = new PowerDrivers(),
    /** Agent ISOs for nodes with boot.method=virtual-media; without it such nodes cannot boot into the agent. */
    private readonly media?: VirtualMediaBoot,
  ) {}

  async runAction(
    node: NodeRecord,
    action: ProvisionAction,
    actor: string,
    deploy?: DeploySpecRecord,
    configDrive?: DeployConfigDrive,
    abortPower: AbortPower = 'off',
  ): Promise<NodeRecord> {
    const step = ACTION_TRANSITIONS[action][node.provisionState];
    if (!step) {
      const allowed = allowedActions(node.provisionState);
      throw new MetalcastError(
        Status.FAILED_PRECONDITION,
        `cannot ${action} node '${node.name}' in state ${human(node.provisionState)}; allowed from ${human(node.provisionState)}: ${allowed.length ? allowed.join(', ') : 'no action'}`,
      );
    }
    if (node.maintenance && action !== 'abort') {
      throw new MetalcastError(
        Status.FAILED_PRECONDITION,
        `node '${node.name}' is in maintenance (${node.maintenanceReason}); take it out of maintenance first`,
      );
    }
    const image = action === 'deploy' ? await this.checkDeploySpec(node, deploy, configDrive !== undefined) : undefined;
    // An abort stops this controller's running step first (it holds the lock while the agent works).
    const resume = action === 'abort' ? await this.steps?.interrupt(node.uuid) : undefined;
    try {
      return await this.runLocked(node, action, step, actor, deploy, image, configDrive, abortPower);
    } finally {
      resume?.();
    }
  }

  private async runLocked(
    node: NodeRecord,
    action: ProvisionAction,
    step: { to: ProvisionState },
    actor: string,
    deploy: DeploySpecRecord | undefined,
    image: ImageRecord | undefined,
    configDrive: DeployConfigDrive | undefined,
    abortPower: AbortPower,
  ): Promise<NodeRecord> {
    const lock = await this.locks.lock(node.uuid, action);
    try {
      switch (action) {
        case 'manage':
          return await this.move(node, node.provisionState, step.to, null, actor, action, '');
        case 'inspect': {
          const inspecting = await this.move(node, node.provisionState, 'inspecting', 'manageable', actor, action, '');
          const waiting = await this.move(inspecting, 'inspecting', 'inspect_wait', 'manageable', this.holder, action);
          return await this.bootAgent(waiting, 'inspect_wait', 'inspect_failed');
        }
        case 'provide': {
          const cleaning = await this.move(node, node.provisionState, 'cleaning', 'available', actor, action, '');
          const waiting = await this.move(cleaning, 'cleaning', 'clean_wait', 'available', this.holder, action);
          return await this.bootAgent(waiting, 'clean_wait', 'clean_failed');
        }
        case 'deploy': {
          const record = deployRecord(deploy as DeploySpecRecord, image as ImageRecord, configDrive);
          // Stored before the node moves, so that it is there when the agent asks; only an available node gets here.
          if (configDrive) {
            await this.store.putConfigDrive({
              nodeUuid: node.uuid,
              gzip: configDrive.drive.gzip,
              sha256: configDrive.drive.sha256,
              sizeBytes: configDrive.drive.iso.length,
              createdAt: Date.now(),
            });
          }
          const deploying = await this.move(
            node,
            'available',
            'deploying',
            'active',
            actor,
            `deploy of ${record.image}${configDrive ? ` with a config drive (instance ${configDrive.drive.instanceId})` : ''}`,
            '',
            { deployJson: JSON.stringify(record) },
          );
          const waiting = await this.move(deploying, 'deploying', 'deploy_wait', 'active', this.holder, 'deploy');
          return await this.bootAgent(waiting, 'deploy_wait', 'deploy_failed');
        }
        case 'undeploy': {
          const deleting = await this.move(node, node.provisionState, 'deleting', 'available', actor, action, '');
          const cleaning = await this.move(deleting, 'deleting', 'cleaning', 'available', this.holder, action);
          const waiting = await this.move(cleaning, 'cleaning', 'clean_wait', 'available', this.holder, action);
          return await this.bootAgent(waiting, 'clean_wait', 'clean_failed');
        }
        case 'abort': {
          // The node as it is now, under the lock: the interrupted step may have moved it on.
          const current = (await this.store.getNode(node.uuid)) ?? node;
          if (current.provisionState !== node.provisionState) {
            throw new MetalcastError(
              Status.FAILED_PRECONDITION,
              `node '${node.name}' moved on to ${human(current.provisionState)} before the abort took hold; nothing was aborted`,
            );
          }
          // Powered off before the move, while the agent's token is still valid to ask it.
          const power = await this.powerAfterAbort(current, abortPower);
          // The outcome goes into the history before the transition, which stays the node's last event.
          await this.store
            .addEvent(node.uuid, { kind: 'abort_power', message: power.note, actor: this.holder, fromState: null, toState: null })
            .catch((error: unknown) => this.logger.warn({ err: error, node: node.uuid }, 'recording the power after an abort failed'));
          const reason = `aborted by ${actor} while in ${human(node.provisionState)}`;
          return await this.move(
            current,
            node.provisionState,
            step.to,
            null,
            actor,
            action,
            power.failed ? `${reason}; ${power.note}` : reason,
          );
        }
      }
    } finally {
      await lock.release();
    }
  }

  /**
   * After an abort (issue 18 item 14): a machine that was writing or erasing
   * its disk must not keep running a half-written disk. Powered off through
   * its power driver, or else by its agent; or left as it is when the
   * operator asked so. A failure is the node's last_error, so that the
   * operator knows to power it off by hand.
   */
  private async powerAfterAbort(node: NodeRecord, abortPower: AbortPower): Promise<{ note: string; failed: boolean }> {
    if (abortPower === 'keep') return { note: 'left powered as it was, as the abort asked', failed: false };
    let driver: PowerDriver | undefined;
    try {
      driver = this.power.forNode(node);
      if (driver) {
        await driver.powerOff();
        await this.store.savePowerStatus(node.uuid, { powerState: 'off', checkedAt: Date.now(), failures: 0, error: '' });
        this.logger.info({ node: node.uuid, nodeName: node.name, driver: driver.name }, 'powered off after an abort');
        return { note: `powered off through ${driver.name} after the abort`, failed: false };
      }
      const viaAgent = await this.steps?.powerOffThroughAgent(node);
      if (viaAgent) return { note: `${viaAgent} after the abort`, failed: false };
      return { note: 'no power driver and no live agent: the machine was not powered off; check it by hand', failed: false };
    } catch (error) {
      const note = `powering off ${driver ? `through ${driver.name} ` : ''}failed: ${(error as Error).message}; power the machine off by hand`;
      this.logger.warn({ node: node.uuid, nodeName: node.name, reason: note }, 'powering off after an abort failed');
      return { note, failed: true };
    } finally {
      driver?.close();
    }
  }

  /**
   * Once the node waits for its agent: a node with a power driver is powered
   * on (or reset) into the agent, by network boot (the iPXE script serves
   * the ramdisk) or, with boot.method=virtual-media, from the agent ISO its
   * BMC inserts; one without is powered by hand, as before. A failure fails
   * the step.
   */
  private async bootAgent(node: NodeRecord, wait: WaitState, failed: ProvisionState): Promise<NodeRecord> {
    const method = bootMethodOf(node);
    let driver: PowerDriver | undefined;
    try {
      driver = this.power.forNode(node);
      if (!driver) return node;
      if (method === 'virtual-media') {
        if (!driver.insertMedia) throw new Error(`the ${driver.name} power driver has no virtual media (use boot.method=network)`);
        if (!this.media) throw new Error('this controller serves no virtual media');
        await driver.insertMedia(await this.media.isoUrl(node));
        await driver.powerOn('cd');
      } else {
        await driver.powerOn('network');
      }
      // What the power sync expects from now on (controller/power/sync.ts).
      await this.store.savePowerStatus(node.uuid, { powerState: 'on', checkedAt: Date.now(), failures: 0, error: '' });
    } catch (error) {
      const what = method === 'virtual-media' ? 'virtual media boot' : 'power on';
      const reason = driver
        ? `${what} through ${driver.name} failed: ${(error as Error).message}`
        : `${what} failed: ${(error as Error).message}`;
      this.logger.warn({ node: node.uuid, nodeName: node.name, reason }, 'powering the node on failed');
      return await this.move(node, wait, failed, null, this.holder, reason, reason);
    } finally {
      driver?.close();
    }
    this.logger.info({ node: node.uuid, nodeName: node.name, driver: driver.name, boot: method }, `powered on into ${method} boot`);
    return node;
  }

  /** Refuses a deploy that cannot work, before the node moves: unknown image, or hints no inspected disk meets. Returns the image. */
  private async checkDeploySpec(node: NodeRecord, deploy: DeploySpecRecord | undefined, withConfigDrive: boolean): Promise<ImageRecord> {
    if (!deploy || deploy.image === '')
      throw new MetalcastError(Status.INVALID_ARGUMENT, 'deploy.image: an image name is required to deploy');
    const image = await this.store.getImage(deploy.image);
    if (!image) throw new MetalcastError(Status.NOT_FOUND, `image '${deploy.image}' does not exist; metalcast image list shows the images`);
    if (image.state !== 'ready')
      throw new MetalcastError(Status.FAILED_PRECONDITION, `image '${deploy.image}' is ${image.state}, not ready`);
    if (node.inventoryJson) {
      const inventory = Inventory.fromJSON(JSON.parse(node.inventoryJson));
      try {
        pickDisk(inventory.disks, deploy.target, diskBytesNeeded(image.sizeBytes, withConfigDrive));
      } catch (error) {
        throw new MetalcastError(Status.FAILED_PRECONDITION, `node '${node.name}' (as last inspected): ${(error as Error).message}`);
      }
    }
    return image;
  }

  /**
   * One compare-and-set transition with its event, made only while this
   * controller holds the node's lock (every caller does); ABORTED if the
   * node moved meanwhile or the lock was taken from us.
   */
  async move(
    node: NodeRecord,
    from: ProvisionState,
    to: ProvisionState,
    target: ProvisionState | null,
    actor: string,
    reason: string,
    lastError?: string,
    also: Pick<Transition, 'inventoryJson' | 'deployJson'> = {},
  ): Promise<NodeRecord> {
    const keepAgentToken = isAgentState(to);
    const event = {
      kind: 'transition',
      message: lastError ? `${human(from)} -> ${human(to)}: ${lastError}` : `${human(from)} -> ${human(to)} (${reason})`,
      actor,
      fromState: from,
      toState: to,
    };
    const updated = await this.store.transition(node.uuid, {
      ...also,
      from: [from],
      to,
      target,
      lastError,
      keepAgentToken,
      event,
      holder: this.holder,
    });
    if (!updated) {
      const now = await this.store.getNode(node.uuid);
      throw new MetalcastError(
        Status.ABORTED,
        now && now.provisionState === from && now.reservation !== this.holder
          ? `node '${node.name}' is no longer locked by this controller (${this.holder}), which was taken for dead; another controller drives it now`
          : `node '${node.name}' changed state while ${reason} was starting; look at it again and retry`,
      );
    }
    if (!keepAgentToken) {
      this.sessions.revoke(
        node.uuid,
        new MetalcastError(Status.UNAUTHENTICATED, `node left the agent states (now ${human(to)}); the agent token is no longer valid`),
      );
    }
    this.feed.publish({ node: updated, event: { ...event, id: 0, nodeUuid: node.uuid, time: Date.now() } });
    this.logger.info({ node: node.uuid, nodeName: node.name, from, to, actor }, 'provision state changed');
    // The agent's work is over, however it ended: no agent ISO stays in the machine.
    if (isAgentState(from) && !isAgentState(to)) {
      await ejectVirtualMedia({ power: this.power, store: this.store, node: updated, logger: this.logger, actor: this.holder });
    }
    return updated;
  }
}
