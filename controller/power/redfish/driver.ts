import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../../../common/logging.js';
import { type PowerBootDevice, type PowerDriver, PowerError, type PowerState, type PowerValidation } from '../power-driver.js';
import { CredentialsRefused, type RedfishClient } from './client.js';
import { RedfishError } from './errors.js';
import type { RedfishConnections } from './pool.js';
import { Collection, ComputerSystem, Manager, ServiceRoot, VirtualMedia } from './resources.js';
import { REDFISH_PROPERTIES, type RedfishSettings } from './settings.js';

/** Redfish's boot override target for each of our boot devices. */
const BOOT_TARGETS: Record<PowerBootDevice, string> = { network: 'Pxe', disk: 'Hdd', cd: 'Cd' };
const STANDARD_RESET_TYPES = [
  'On',
  'ForceOff',
  'GracefulShutdown',
  'GracefulRestart',
  'ForceRestart',
  'Nmi',
  'ForceOn',
  'PushPowerButton',
  'PowerCycle',
];
/** Polling PowerState after a Reset: from this interval, growing to POLL_MAX_MS. */
const POLL_START_MS = 250;
const POLL_MAX_MS = 2000;

/** What the driver needs beyond the node's settings. */
export interface RedfishDriverOptions {
  /** boot.method of the node: validate says whether virtual media is required. */
  bootMethod: 'network' | 'virtual-media';
}

/**
 * Powers a machine through its BMC's Redfish service (DSP0266), the way
 * Ironic's redfish hardware type does through sushy:
 *
 * - power: ComputerSystem.Reset with a ResetType the system allows
 *   (@Redfish.AllowableValues): On (or ForceOn), ForceOff, ForceRestart (or
 *   PowerCycle, or off then on), GracefulShutdown with ForceOff after
 *   power.redfish.soft_off_timeout; the BMC answers at once (often 204) and
 *   the state changes later, so PowerState is polled until it gets there or
 *   power.redfish.power_timeout passes;
 * - boot: one PATCH of the system's Boot (BootSourceOverrideTarget Pxe, Hdd
 *   or Cd; Enabled Once for network and cd, Continuous for disk; Mode UEFI or
 *   Legacy from boot.mode when the system has one), with If-Match when the
 *   system gave an ETag, once more with a fresh ETag on 412;
 * - virtual media: InsertMedia and EjectMedia on the system's (or its
 *   manager's) CD or DVD drive.
 *
 * Every failure is a PowerError naming the BMC, the request and what the BMC
 * said. Requests, retries, sessions and keep-alive are the client's
 * (client.ts, connection.ts), shared per BMC through RedfishConnections.
 */
export class RedfishPowerDriver implements PowerDriver {
  readonly name = 'redfish';
  private made: RedfishClient | undefined;
  private systemPath: string | undefined;

  constructor(
    private readonly settings: RedfishSettings,
    private readonly connections: RedfishConnections,
    private readonly options: RedfishDriverOptions,
    private readonly logger: Logger,
  ) {}

  /** Made at the first request: a driver made only to check a node's settings touches nothing. */
  private get client(): RedfishClient {
    this.made ??= this.connections.client(this.settings);
    return this.made;
  }

  // --- the PowerDriver interface

  powerOn(bootDevice: PowerBootDevice): Promise<void> {
    return this.guard(async () => {
      await this.applyBootDevice(bootDevice);
      const system = await this.system();
      if (isOn(system.powerState)) await this.restart(system);
      else await this.resetTo(system, pick(system, ['On', 'ForceOn'], 'power on'), 'On');
    });
  }

  powerOff(): Promise<void> {
    return this.guard(async () => {
      const system = await this.system();
      if (system.powerState === 'Off') return;
      if (allows(system, 'ForceOff')) await this.resetTo(system, 'ForceOff', 'Off');
      else await this.gracefulThenForce(system);
    });
  }

  /** GracefulShutdown (the OS shuts down), then ForceOff when it is not off within power.redfish.soft_off_timeout. */
  softPowerOff(): Promise<void> {
    return this.guard(async () => {
      const system = await this.system();
      if (system.powerState === 'Off') return;
      await this.gracefulThenForce(system);
    });
  }

  reset(): Promise<void> {
    return this.guard(async () => {
      const system = await this.system();
      if (isOn(system.powerState)) await this.restart(system);
      else await this.resetTo(system, pick(system, ['On', 'ForceOn'], 'power on'), 'On');
    });
  }

  setBootDevice(device: PowerBootDevice): Promise<void> {
    return this.guard(() => this.applyBootDevice(device));
  }

  state(): Promise<PowerState> {
    return this.guard(async () => {
      const state = (await this.system()).powerState;
      if (state === undefined) throw new Error(`${this.systemPath} has no PowerState`);
      // Powering off still runs; powering on does not yet.
      return state === 'On' || state === 'PoweringOff' ? 'on' : 'off';
    });
  }

  insertMedia(url: string): Promise<void> {
    return this.guard(async () => {
      const drive = await this.opticalDrive();
      if (drive.inserted && drive.image === url) return;
      if (drive.inserted) await this.eject(drive);
      const insert = drive.insertAction;
      if (insert) {
        try {
          await this.client.post(insert.target, { Image: url });
        } catch (error) {
          // Some BMCs want the protocol spelled out (sushy does the same).
          if (!(error instanceof RedfishError) || error.status !== 400 || !/TransferProtocolType/.test(error.message)) throw error;
          await this.client.post(insert.target, { Image: url, TransferProtocolType: url.startsWith('https:') ? 'HTTPS' : 'HTTP' });
        }
      } else {
        // VirtualMedia without actions (Redfish 1.0-era BMCs): PATCH the resource.
        await this.client.patch(drive.path, { Image: url, Inserted: true, WriteProtected: true }, drive.etag);
      }
      const after = await VirtualMedia.fetch(this.client, drive.path);
      if (!after.inserted) throw new Error(`${drive.path}: InsertMedia was accepted, but the drive shows no medium inserted`);
      this.logger.info({ bmc: this.settings.origin, drive: drive.path, image: url }, 'virtual media inserted');
    });
  }

  ejectMedia(): Promise<void> {
    return this.guard(async () => {
      for (const drive of await this.opticalDrives()) if (drive.inserted) await this.eject(drive);
    });
  }

  async validate(): Promise<PowerValidation[]> {
    const rows: PowerValidation[] = [];
    const add = (check: string, ok: boolean, detail: string) => rows.push({ check, ok, detail });
    const skip = (checks: string[], why: string) => {
      for (const check of checks) add(check, false, `not checked: ${why}`);
    };
    const later = ['credentials', 'system', 'reset types', 'boot override', 'virtual media'];
    let root: ServiceRoot;
    try {
      root = new ServiceRoot(this.client, await this.client.serviceRoot());
      const tls = this.settings.origin.startsWith('http:')
        ? '; plain HTTP: the password crosses the network readable'
        : this.settings.verifyTls
          ? this.settings.caFile
            ? `; TLS verified with ${this.settings.caFile}`
            : '; TLS verified'
          : `; TLS NOT verified (${REDFISH_PROPERTIES.verifyTls}=false)`;
      add('reachability', true, `Redfish ${root.redfishVersion || '(version not given)'} at ${this.settings.origin}${tls}`);
    } catch (error) {
      add('reachability', false, this.describe(error));
      skip(later, 'the BMC is not reachable');
      return rows;
    }
    let system: ComputerSystem;
    try {
      system = await this.system();
      add(
        'credentials',
        true,
        `user '${this.settings.username}' logged in (${this.client.loginKind === 'basic' ? 'Basic authentication' : 'session, X-Auth-Token'})`,
      );
    } catch (error) {
      const refused = error instanceof CredentialsRefused;
      add('credentials', !refused, refused ? this.describe(error) : `user '${this.settings.username}' accepted`);
      if (refused) {
        skip(later.slice(1), 'the credentials were refused');
      } else {
        add('system', false, this.describe(error));
        skip(later.slice(2), 'no system');
      }
      return rows;
    }
    add('system', true, `${system.odataId} (${system.name || system.id}), PowerState ${system.powerState ?? 'not given'}`);

    const allowed = system.allowedResetTypes;
    if (!system.reset) add('reset types', false, `${system.odataId} offers no #ComputerSystem.Reset action`);
    else {
      const missing = [
        ['power on', ['On', 'ForceOn']],
        ['power off', ['ForceOff', 'GracefulShutdown']],
      ]
        .filter(([, types]) => !(types as string[]).some((t) => allows(system, t)))
        .map(([what, types]) => `${what} (${(types as string[]).join(' or ')})`);
      add(
        'reset types',
        missing.length === 0,
        missing.length === 0
          ? allowed
            ? allowed.join(', ')
            : 'not advertised (ResetType@Redfish.AllowableValues missing): assuming the standard ones'
          : `cannot ${missing.join(', ')}; the system allows ${allowed?.join(', ')}`,
      );
    }

    const targets = system.allowedBootTargets;
    const needed = ['Pxe', 'Hdd', ...(this.options.bootMethod === 'virtual-media' ? ['Cd'] : [])];
    const lacking = targets ? needed.filter((t) => !targets.includes(t)) : [];
    const mode = system.bootMode
      ? `; mode ${system.bootMode}, will set ${this.settings.bootMode === 'bios' ? 'Legacy' : 'UEFI'}`
      : '; no BootSourceOverrideMode (the firmware decides)';
    add(
      'boot override',
      lacking.length === 0 && system.json.Boot !== undefined,
      system.json.Boot === undefined
        ? `${system.odataId} has no Boot property`
        : lacking.length
          ? `the system lacks boot target ${lacking.join(', ')}; it allows ${targets?.join(', ')}`
          : `${targets ? targets.join(', ') : 'targets not advertised'}${mode}${system.etag ? '; ETag given (If-Match used)' : ''}`,
    );

    try {
      const drives = await this.opticalDrives();
      const drive = drives[0];
      if (!drive) throw new Error('no virtual CD or DVD drive');
      add(
        'virtual media',
        true,
        `${drive.path} (${drive.mediaTypes.join(', ')})${drive.inserted ? `, holding ${drive.image}` : ', empty'}${drive.insertAction ? '' : '; no InsertMedia action: PATCH'}`,
      );
    } catch (error) {
      const needed = this.options.bootMethod === 'virtual-media';
      add('virtual media', !needed, `${this.describe(error)}${needed ? '' : ' (not needed: boot.method is network)'}`);
    }
    return rows;
  }

  close(): void {
    // Connections and logins belong to RedfishConnections: the next action on this BMC reuses them.
  }

  // --- the steps

  /** The system: power.redfish.system_id, or the BMC's only one. Fetched fresh every time (state, ETag). */
  private async system(): Promise<ComputerSystem> {
    if (!this.systemPath) this.systemPath = await this.findSystem();
    return ComputerSystem.fetch(this.client, this.systemPath);
  }

  private async findSystem(): Promise<string> {
    const root = new ServiceRoot(this.client, await this.client.serviceRoot());
    const collection = root.systemsPath ?? '/redfish/v1/Systems';
    const wanted = this.settings.systemId;
    if (wanted) return wanted.startsWith('/') ? wanted : `${collection.replace(/\/$/, '')}/${encodeURIComponent(wanted)}`;
    const members = (await Collection.fetch(this.client, collection)).members;
    if (members.length === 1) return members[0] as string;
    throw new Error(
      members.length === 0
        ? `${collection} lists no system`
        : `${collection} lists ${members.length} systems (${members.join(', ')}): set ${REDFISH_PROPERTIES.systemId} to the one to drive`,
    );
  }

  private async applyBootDevice(device: PowerBootDevice): Promise<void> {
    let system = await this.system();
    const target = BOOT_TARGETS[device];
    const allowed = system.allowedBootTargets;
    if (allowed && !allowed.includes(target))
      throw new Error(`${system.odataId} cannot boot from ${target} (its BootSourceOverrideTarget allows ${allowed.join(', ')})`);
    const boot: Record<string, string> = {
      BootSourceOverrideTarget: target,
      // Once into the agent (a crash falls back to the normal order); the disk for good once deployed.
      BootSourceOverrideEnabled: device === 'disk' ? 'Continuous' : 'Once',
    };
    const mode = this.settings.bootMode === 'bios' ? 'Legacy' : 'UEFI';
    // Only systems that show a mode take one; changing it needlessly makes some BMCs restage their firmware settings.
    if (system.bootMode !== undefined && system.bootMode !== mode) {
      const modes = system.allowedBootModes;
      if (modes && !modes.includes(mode))
        throw new Error(
          `${system.odataId} cannot boot in ${mode} mode (boot.mode=${this.settings.bootMode}; it allows ${modes.join(', ')})`,
        );
      boot.BootSourceOverrideMode = mode;
    }
    try {
      await this.client.patch(system.path, { Boot: boot }, system.etag);
    } catch (error) {
      // The system changed between our GET and PATCH: once more with its new ETag.
      if (!(error instanceof RedfishError) || error.status !== 412) throw error;
      system = await this.system();
      await this.client.patch(system.path, { Boot: boot }, system.etag);
    }
    this.logger.debug({ bmc: this.settings.origin, system: system.path, boot }, 'boot override set');
  }

  /** A warm restart of a system that is on. */
  private async restart(system: ComputerSystem): Promise<void> {
    const type = ['ForceRestart', 'PowerCycle', 'GracefulRestart'].find((t) => allows(system, t));
    if (type) {
      await this.client.post(this.resetTarget(system), { ResetType: type });
      return;
    }
    // Neither: off, then on.
    await this.resetTo(system, pick(system, ['ForceOff'], 'power off'), 'Off');
    await this.resetTo(await this.system(), pick(system, ['On', 'ForceOn'], 'power on'), 'On');
  }

  private async gracefulThenForce(system: ComputerSystem): Promise<void> {
    if (allows(system, 'GracefulShutdown')) {
      await this.client.post(this.resetTarget(system), { ResetType: 'GracefulShutdown' });
      if (await this.reaches('Off', this.settings.softOffTimeoutMs)) return;
      if (!allows(system, 'ForceOff'))
        throw new Error(
          `${system.odataId} was not off ${this.settings.softOffTimeoutMs / 1000} s after GracefulShutdown, and it does not allow ForceOff`,
        );
      this.logger.info(
        { bmc: this.settings.origin, system: system.path, waitedMs: this.settings.softOffTimeoutMs },
        'GracefulShutdown did not power the system off in time; ForceOff',
      );
    }
    await this.resetTo(system, pick(system, ['ForceOff'], 'power off'), 'Off');
  }

  /** POSTs the Reset, then polls PowerState until `target` or power.redfish.power_timeout. */
  private async resetTo(system: ComputerSystem, type: string, target: 'On' | 'Off'): Promise<void> {
    await this.client.post(this.resetTarget(system), { ResetType: type });
    if (!(await this.reaches(target, this.settings.powerTimeoutMs))) {
      const now = (await this.system()).powerState;
      throw new Error(
        `${system.odataId} did not reach PowerState ${target} within ${this.settings.powerTimeoutMs / 1000} s after ResetType ${type} (it is ${now ?? 'not saying'})`,
      );
    }
  }

  private async reaches(target: 'On' | 'Off', timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (let wait = POLL_START_MS; ; wait = Math.min(POLL_MAX_MS, wait * 2)) {
      if ((await this.system()).powerState === target) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await sleep(Math.min(wait, left));
    }
  }

  private resetTarget(system: ComputerSystem): string {
    const reset = system.reset;
    if (!reset) throw new Error(`${system.odataId} offers no #ComputerSystem.Reset action`);
    return reset.target;
  }

  /** Every CD or DVD drive: the system's VirtualMedia (Redfish 2021.1 on), then its managers'. */
  private async opticalDrives(): Promise<VirtualMedia[]> {
    const system = await this.system();
    const collections: string[] = [];
    if (system.virtualMediaPath) collections.push(system.virtualMediaPath);
    for (const managerPath of system.managedBy) {
      const path = (await Manager.fetch(this.client, managerPath)).virtualMediaPath;
      if (path) collections.push(path);
    }
    if (collections.length === 0)
      throw new Error(`${system.odataId} has no VirtualMedia, and neither has any manager of it: this BMC has no virtual media`);
    const drives: VirtualMedia[] = [];
    for (const collection of collections) {
      for (const member of (await Collection.fetch(this.client, collection)).members) {
        const drive = await VirtualMedia.fetch(this.client, member);
        if (drive.isOptical) drives.push(drive);
      }
    }
    return drives;
  }

  private async opticalDrive(): Promise<VirtualMedia> {
    const drive = (await this.opticalDrives())[0];
    if (!drive) throw new Error('the BMC has virtual media, but no CD or DVD drive (MediaTypes CD or DVD) to put an ISO in');
    return drive;
  }

  private async eject(drive: VirtualMedia): Promise<void> {
    const eject = drive.ejectAction;
    if (eject) await this.client.post(eject.target, {});
    else await this.client.patch(drive.path, { Image: null, Inserted: false }, drive.etag);
    this.logger.info({ bmc: this.settings.origin, drive: drive.path, image: drive.image }, 'virtual media ejected');
  }

  /** Every error as a PowerError naming the BMC and what it said. */
  private async guard<T>(work: () => Promise<T>): Promise<T> {
    try {
      return await work();
    } catch (error) {
      throw new PowerError(this.describe(error));
    }
  }

  private describe(error: unknown): string {
    const message = error instanceof Error ? error.message : String(error);
    return `BMC ${this.settings.origin}: ${message}`;
  }
}

function isOn(state: string | undefined): boolean {
  return state === 'On' || state === 'PoweringOn' || state === 'Paused';
}

function allows(system: ComputerSystem, type: string): boolean {
  return (system.allowedResetTypes ?? STANDARD_RESET_TYPES).includes(type);
}

/** The first of `types` the system allows; an Error listing what it does allow. */
function pick(system: ComputerSystem, types: string[], what: string): string {
  const type = types.find((t) => allows(system, t));
  if (!type)
    throw new Error(
      `${system.odataId} allows no ResetType to ${what} (${types.join(' or ')}); it allows ${system.allowedResetTypes?.join(', ')}`,
    );
  return type;
}
