import { type Fetched, odataId, type RedfishClient } from './client.js';

/*
 * Redfish resources as small classes over their JSON, fetched by @odata.id
 * (the shape of sushy's resources): each names the fields the driver reads,
 * following DMTF's schemas (ServiceRoot, ComputerSystem v1.x, Manager,
 * VirtualMedia v1.x). Missing optional fields read as undefined, because
 * BMCs leave out much of the schema.
 */

/** A resource and the ETag it came with. */
export class Resource {
  constructor(
    readonly client: RedfishClient,
    readonly fetched: Fetched,
  ) {}

  get path(): string {
    return this.fetched.path;
  }

  get json(): Record<string, unknown> {
    return this.fetched.json;
  }

  get etag(): string | undefined {
    return this.fetched.etag;
  }

  get id(): string {
    return stringField(this.json.Id) ?? this.path.split('/').filter(Boolean).at(-1) ?? this.path;
  }

  get name(): string {
    return stringField(this.json.Name) ?? '';
  }

  /** The resource's own @odata.id (after redirects the path asked for may differ). */
  get odataId(): string {
    return stringField(this.json['@odata.id']) ?? this.path;
  }
}

function stringField(value: unknown): string | undefined {
  return typeof value === 'string' ? value : undefined;
}

function stringList(value: unknown): string[] | undefined {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === 'string') : undefined;
}

/** A resource collection: its members' @odata.id. */
export class Collection extends Resource {
  static async fetch(client: RedfishClient, path: string): Promise<Collection> {
    return new Collection(client, await client.get(path));
  }

  get members(): string[] {
    const members = this.json.Members;
    return Array.isArray(members) ? members.map(odataId).filter((id): id is string => id !== undefined) : [];
  }
}

export class ServiceRoot extends Resource {
  get redfishVersion(): string {
    return stringField(this.json.RedfishVersion) ?? '';
  }

  get systemsPath(): string | undefined {
    return odataId(this.json.Systems);
  }
}

/** An action a resource advertises: where to POST, and the values it allows (undefined when not advertised). */
export interface Action {
  target: string;
  allowable: Record<string, string[]>;
}

function action(actions: unknown, name: string): Action | undefined {
  const entry = (actions as Record<string, unknown> | undefined)?.[name] as Record<string, unknown> | undefined;
  const target = stringField(entry?.target);
  if (!entry || !target) return undefined;
  const allowable: Record<string, string[]> = {};
  for (const [key, value] of Object.entries(entry)) {
    const match = /^(.*)@Redfish\.AllowableValues$/.exec(key);
    const list = stringList(value);
    if (match?.[1] && list) allowable[match[1]] = list;
  }
  return { target, allowable };
}

/** PowerState values (Resource.PowerState). */
export type RedfishPowerState = 'On' | 'Off' | 'PoweringOn' | 'PoweringOff' | 'Paused';

export class ComputerSystem extends Resource {
  static async fetch(client: RedfishClient, path: string): Promise<ComputerSystem> {
    return new ComputerSystem(client, await client.get(path));
  }

  get powerState(): string | undefined {
    return stringField(this.json.PowerState);
  }

  get reset(): Action | undefined {
    return action(this.json.Actions, '#ComputerSystem.Reset');
  }

  /** ResetType@Redfish.AllowableValues; undefined when the BMC does not say (then any standard type may work). */
  get allowedResetTypes(): string[] | undefined {
    return this.reset?.allowable.ResetType;
  }

  private get boot(): Record<string, unknown> {
    return (this.json.Boot as Record<string, unknown> | undefined) ?? {};
  }

  get bootTarget(): string | undefined {
    return stringField(this.boot.BootSourceOverrideTarget);
  }

  get bootEnabled(): string | undefined {
    return stringField(this.boot.BootSourceOverrideEnabled);
  }

  /** BootSourceOverrideMode (UEFI or Legacy); undefined when the system has none (it cannot be set). */
  get bootMode(): string | undefined {
    return stringField(this.boot.BootSourceOverrideMode);
  }

  get allowedBootTargets(): string[] | undefined {
    return stringList(this.boot['BootSourceOverrideTarget@Redfish.AllowableValues']);
  }

  get allowedBootModes(): string[] | undefined {
    return stringList(this.boot['BootSourceOverrideMode@Redfish.AllowableValues']);
  }

  /** ComputerSystem.VirtualMedia (v1.13+); older BMCs keep virtual media under their Manager. */
  get virtualMediaPath(): string | undefined {
    return odataId(this.json.VirtualMedia);
  }

  get managedBy(): string[] {
    const links = (this.json.Links as Record<string, unknown> | undefined)?.ManagedBy;
    return Array.isArray(links) ? links.map(odataId).filter((id): id is string => id !== undefined) : [];
  }
}

export class Manager extends Resource {
  static async fetch(client: RedfishClient, path: string): Promise<Manager> {
    return new Manager(client, await client.get(path));
  }

  get virtualMediaPath(): string | undefined {
    return odataId(this.json.VirtualMedia);
  }
}

export class VirtualMedia extends Resource {
  static async fetch(client: RedfishClient, path: string): Promise<VirtualMedia> {
    return new VirtualMedia(client, await client.get(path));
  }

  get mediaTypes(): string[] {
    return stringList(this.json.MediaTypes) ?? [];
  }

  /** A CD or DVD drive: what an ISO goes into. */
  get isOptical(): boolean {
    return this.mediaTypes.some((type) => type === 'CD' || type === 'DVD');
  }

  get inserted(): boolean {
    return this.json.Inserted === true;
  }

  get image(): string {
    return stringField(this.json.Image) ?? '';
  }

  get insertAction(): Action | undefined {
    return action(this.json.Actions, '#VirtualMedia.InsertMedia');
  }

  get ejectAction(): Action | undefined {
    return action(this.json.Actions, '#VirtualMedia.EjectMedia');
  }
}
