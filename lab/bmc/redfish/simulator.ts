import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { createWriteStream, mkdirSync, rmSync } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { BootTarget, SimulatedMachine } from './machine.js';

/*
 * A Redfish BMC for lab machines, the way sushy-emulator serves Ironic's CI:
 * a Redfish service following DMTF's schemas (DSP0266 protocol, DSP8010
 * schemas: ServiceRoot v1.5, ComputerSystem v1.13, Manager v1.3,
 * SessionService v1.1, Session v1.1, VirtualMedia v1.3, Message v1.1) in
 * front of one machine (a QEMU guest through QMP, or a machine in memory).
 *
 * What it does as sushy-emulator does, which real clients rely on:
 * - /redfish/v1/ answers without credentials; every other resource answers
 *   401 with WWW-Authenticate and a Redfish error body unless the request
 *   carries a valid X-Auth-Token (POST SessionService/Sessions) or Basic;
 * - ComputerSystem.Reset answers 204 No Content at once and the power state
 *   changes a moment later (resetDelayMs), so clients must poll PowerState;
 * - the system may be addressed by its name: 307 to its UUID's path;
 * - a value outside @Redfish.AllowableValues (a boot target the machine
 *   lacks, a ResetType it does not allow) is a 400 whose error.message and
 *   @Message.ExtendedInfo say what was wrong and what is allowed;
 * - BootSourceOverrideTarget@Redfish.AllowableValues lists Pxe, Cd, Hdd
 *   (and UefiHttp in UEFI mode); the override maps to the machine's next
 *   boot device, once or continuously;
 * - VirtualMedia (under the Manager, where sushy and Ironic look for it; or
 *   under the System, Redfish 2021.1 style) with InsertMedia and EjectMedia:
 *   the BMC fetches the image over HTTP(S) as a real one does, and puts the
 *   file in the machine's CD drive.
 *
 * Faults, switched on with setFaults() (they hit every path, the service
 * root too), for the driver's tests: 5xx answers,
 * stalls, dropped connections, expired sessions, a required If-Match, no
 * virtual media, no session service, only some ResetTypes, a power state
 * that never changes. Not the product: it lives in lab/ and is held to an
 * outside client (Debian's python3-sushy) by test/lab/redfish-sushy.test.ts.
 */

export interface RedfishFaults {
  /** The next N requests answer `serverErrorStatus` with an error body. */
  serverErrors?: number;
  serverErrorStatus?: number;
  /** Every request answers 500 (a BMC whose service is broken). */
  alwaysFail?: boolean;
  /** Requests are read and never answered (a hung BMC web server). */
  stall?: boolean;
  /** The next N requests have their connection closed without an answer. */
  dropConnections?: number;
  /** PATCH without If-Match answers 428 Precondition Required. */
  requireIfMatch?: boolean;
  /** No VirtualMedia anywhere (a BMC without the licence for it). */
  noVirtualMedia?: boolean;
  /** No SessionService: clients must use Basic. */
  noSessionService?: boolean;
  /** ResetType@Redfish.AllowableValues; only these are accepted. */
  resetTypes?: string[];
  /** Reset is accepted, but the power state never changes. */
  powerStuck?: boolean;
  /** Sessions expire this long after their last use (default: 30 min). */
  sessionTimeoutMs?: number;
}

export interface RedfishSimulatorOptions {
  machine: SimulatedMachine;
  /** The system's Name (addressable, with a 307 to its UUID path). */
  name: string;
  /** Users and their passwords. */
  users: Record<string, string>;
  /** Where the system's VirtualMedia lives: under its Manager (default, as sushy 4 finds it) or under the System. */
  virtualMediaUnder?: 'manager' | 'system';
  /** Serve HTTPS with this key and certificate (PEM); plain HTTP otherwise. */
  tls?: { key: string; cert: string };
  /** Delay between accepting a Reset and the power state changing (default 200 ms). */
  resetDelayMs?: number;
  /** BIOS (Legacy) or UEFI firmware: the override mode it shows, and UefiHttp as a target under UEFI. */
  firmware?: 'bios' | 'uefi';
  /** Folder for fetched virtual media images (default: a folder under the OS temp). */
  mediaDir?: string;
  /** Address to listen on (default 127.0.0.1:0). */
  host?: string;
  port?: number;
  faults?: RedfishFaults;
  /** Called with each request once its answer is sent (or its connection ends): for a request log. */
  onRequest?: (request: SimulatedRequest) => void;
}

/** One request the simulator answered (or not), for tests. */
export interface SimulatedRequest {
  method: string;
  path: string;
  /** How it was authenticated. */
  auth: 'none' | 'session' | 'basic' | 'bad';
  ifMatch: string | undefined;
  status: number | 'stalled' | 'dropped';
}

const STANDARD_RESET_TYPES = ['On', 'ForceOff', 'GracefulShutdown', 'GracefulRestart', 'ForceRestart', 'Nmi', 'ForceOn', 'PushPowerButton'];
const MANAGER_ID = 'BMC';
const CD_ID = 'Cd';
const MAX_BODY = 64 * 1024;

class HttpProblem extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly messageId = 'Base.1.8.GeneralError',
    readonly extended: { MessageId: string; Message: string; Resolution?: string; Severity?: string }[] = [],
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

interface Session {
  id: string;
  user: string;
  token: string;
  lastUsed: number;
}

export class RedfishSimulator {
  readonly uuid: string;
  readonly requests: SimulatedRequest[] = [];
  /** Most requests that were in flight at once. */
  maxInFlight = 0;
  private inFlight = 0;
  private faults: RedfishFaults;
  private readonly sessions = new Map<string, Session>();
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  private readonly stalled = new Set<ServerResponse>();
  private readonly timers = new Set<NodeJS.Timeout>();
  /** A pending Reset: what PowerState shows until it lands. */
  private transition: 'PoweringOn' | 'PoweringOff' | undefined;
  private boot: { target: BootTarget; enabled: 'Disabled' | 'Once' | 'Continuous'; mode: 'UEFI' | 'Legacy' };
  private etagCounter = 1;
  private media: { image: string; file: string } | undefined;
  private readonly mediaDir: string;
  address = '';

  constructor(private readonly options: RedfishSimulatorOptions) {
    this.uuid = uuidFrom(options.name);
    this.faults = { ...options.faults };
    this.boot = { target: 'None', enabled: 'Disabled', mode: options.firmware === 'bios' ? 'Legacy' : 'UEFI' };
    this.mediaDir = options.mediaDir ?? join(process.env.TMPDIR ?? '/tmp', `metalcast-bmc-${process.pid}-${this.uuid.slice(0, 8)}`);
  }

  /** The base URL clients use: scheme://127.0.0.1:port */
  get url(): string {
    return `${this.options.tls ? 'https' : 'http'}://${this.address}`;
  }

  get systemPath(): string {
    return `/redfish/v1/Systems/${this.uuid}`;
  }

  /** What is in the CD drive (the URL it was fetched from), or undefined. */
  get insertedImage(): string | undefined {
    return this.media?.image;
  }

  get bootOverride(): { target: BootTarget; enabled: string; mode: string } {
    return { ...this.boot };
  }

  setFaults(faults: RedfishFaults): void {
    this.faults = { ...faults };
  }

  /** Ends every session now: the next request with a token answers 401, as after a BMC reboot. */
  expireSessions(): void {
    this.sessions.clear();
  }

  get sessionCount(): number {
    return this.sessions.size;
  }

  async start(): Promise<this> {
    mkdirSync(this.mediaDir, { recursive: true });
    const handler = (req: IncomingMessage, res: ServerResponse) => void this.handle(req, res);
    const server = this.options.tls
      ? createHttpsServer({ key: this.options.tls.key, cert: this.options.tls.cert }, handler)
      : createHttpServer(handler);
    server.keepAliveTimeout = 30_000;
    server.on('connection', (socket: Socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.options.port ?? 0, this.options.host ?? '127.0.0.1', () => resolve());
    });
    const bound = server.address() as AddressInfo;
    this.address = `${bound.address}:${bound.port}`;
    this.server = server;
    return this;
  }

  async stop(): Promise<void> {
    for (const timer of this.timers) clearTimeout(timer);
    for (const res of this.stalled) res.destroy();
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    this.options.machine.close();
    rmSync(this.mediaDir, { recursive: true, force: true });
  }

  // --- HTTP

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://bmc');
    const path = url.pathname.replace(/\/+$/, '') || '/';
    const record: SimulatedRequest = {
      method: req.method ?? 'GET',
      path: url.pathname,
      auth: 'none',
      ifMatch: header(req, 'if-match'),
      status: 0,
    };
    this.requests.push(record);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    res.on('close', () => {
      this.inFlight--;
      this.options.onRequest?.(record);
    });
    try {
      const body = await readBody(req);
      if (this.faults.stall) {
        record.status = 'stalled';
        this.stalled.add(res);
        return;
      }
      if (this.faults.dropConnections && this.faults.dropConnections > 0) {
        this.faults.dropConnections--;
        record.status = 'dropped';
        req.socket.destroy();
        return;
      }
      if (this.faults.alwaysFail || (this.faults.serverErrors && this.faults.serverErrors > 0)) {
        if (!this.faults.alwaysFail && this.faults.serverErrors) this.faults.serverErrors--;
        throw new HttpProblem(this.faults.serverErrorStatus ?? 500, 'The BMC encountered an internal error.', 'Base.1.8.InternalError', [
          {
            MessageId: 'Base.1.8.InternalError',
            Message: 'The request failed due to an internal service error.  The service is still operational.',
            Resolution: 'Resubmit the request.  If the problem persists, consider resetting the service.',
            Severity: 'Critical',
          },
        ]);
      }
      const json = body.length ? parseJson(body) : undefined;
      const answer = await this.route(req.method ?? 'GET', path, json, req, record);
      record.status = answer.status;
      send(res, answer.status, answer.body, answer.headers);
    } catch (error) {
      const problem =
        error instanceof HttpProblem
          ? error
          : new HttpProblem(500, `The BMC failed: ${(error as Error).message}`, 'Base.1.8.InternalError', [
              { MessageId: 'Base.1.8.InternalError', Message: (error as Error).message, Severity: 'Critical' },
            ]);
      record.status = problem.status;
      send(res, problem.status, errorBody(problem), problem.headers);
    }
  }

  private authenticate(req: IncomingMessage, record: SimulatedRequest): string {
    const token = header(req, 'x-auth-token');
    if (token !== undefined) {
      const timeout = this.faults.sessionTimeoutMs ?? 30 * 60_000;
      for (const session of this.sessions.values()) {
        if (equal(session.token, token)) {
          if (Date.now() - session.lastUsed > timeout) {
            this.sessions.delete(session.id);
            break;
          }
          session.lastUsed = Date.now();
          record.auth = 'session';
          return session.user;
        }
      }
      record.auth = 'bad';
      throw unauthorized('The session token is not valid or has expired.');
    }
    const authorization = header(req, 'authorization');
    if (authorization?.startsWith('Basic ')) {
      const decoded = Buffer.from(authorization.slice(6), 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      const user = decoded.slice(0, colon);
      const password = decoded.slice(colon + 1);
      if (colon > 0 && this.checkPassword(user, password)) {
        record.auth = 'basic';
        return user;
      }
      record.auth = 'bad';
      throw unauthorized('The user name or password is not valid.');
    }
    throw unauthorized('Authentication is required: log in with a session (X-Auth-Token) or Basic.');
  }

  private checkPassword(user: string, password: string): boolean {
    const known = this.options.users[user];
    return known !== undefined && equal(known, password);
  }

  private async route(
    method: string,
    path: string,
    body: unknown,
    req: IncomingMessage,
    record: SimulatedRequest,
  ): Promise<{ status: number; body?: unknown; headers?: Record<string, string> }> {
    const ok = (value: unknown, headers?: Record<string, string>) => ({ status: 200, body: value, headers });
    const only = (...methods: string[]) => {
      if (!methods.includes(method))
        throw new HttpProblem(405, `${method} is not allowed on ${path}.`, 'Base.1.8.OperationNotAllowed', [], {
          allow: methods.join(', '),
        });
    };
    if (path === '/redfish') {
      only('GET');
      return ok({ v1: '/redfish/v1/' });
    }
    if (path === '/redfish/v1') {
      only('GET');
      return ok(this.serviceRoot());
    }
    if (path === '/redfish/v1/SessionService/Sessions' && method === 'POST') {
      if (this.faults.noSessionService) throw new HttpProblem(404, `${path} does not exist.`, 'Base.1.8.ResourceMissingAtURI');
      return this.createSession(body);
    }
    this.authenticate(req, record);
    if (path === '/redfish/v1/SessionService' && !this.faults.noSessionService) {
      only('GET');
      return ok({
        ...odata('#SessionService.v1_1_8.SessionService', '/redfish/v1/SessionService'),
        Id: 'SessionService',
        Name: 'Session Service',
        ServiceEnabled: true,
        SessionTimeout: Math.round((this.faults.sessionTimeoutMs ?? 30 * 60_000) / 1000),
        Sessions: { '@odata.id': '/redfish/v1/SessionService/Sessions' },
      });
    }
    if (path === '/redfish/v1/SessionService/Sessions' && !this.faults.noSessionService) {
      only('GET', 'POST');
      return ok(
        collection(
          '#SessionCollection.SessionCollection',
          path,
          'Session Collection',
          [...this.sessions.keys()].map((id) => `${path}/${id}`),
        ),
      );
    }
    const sessionMatch = /^\/redfish\/v1\/SessionService\/Sessions\/([^/]+)$/.exec(path);
    if (sessionMatch && !this.faults.noSessionService) {
      only('GET', 'DELETE');
      const session = this.sessions.get(sessionMatch[1] as string);
      if (!session) throw notFound(path);
      if (method === 'DELETE') {
        this.sessions.delete(session.id);
        return { status: 204 };
      }
      return ok({ ...odata('#Session.v1_1_0.Session', path), Id: session.id, Name: 'User Session', UserName: session.user });
    }
    if (path === '/redfish/v1/Systems') {
      only('GET');
      return ok(collection('#ComputerSystemCollection.ComputerSystemCollection', path, 'Computer System Collection', [this.systemPath]));
    }
    if (path === '/redfish/v1/Managers') {
      only('GET');
      return ok(collection('#ManagerCollection.ManagerCollection', path, 'Manager Collection', [`/redfish/v1/Managers/${MANAGER_ID}`]));
    }
    if (path === `/redfish/v1/Managers/${MANAGER_ID}`) {
      only('GET');
      return ok(this.manager());
    }
    const systemMatch = /^\/redfish\/v1\/Systems\/([^/]+)(\/.*)?$/.exec(path);
    if (systemMatch) {
      const identity = decodeURIComponent(systemMatch[1] as string);
      const rest = systemMatch[2] ?? '';
      if (identity === this.options.name) {
        // sushy-emulator: a system addressed by name redirects to its UUID.
        return { status: 307, headers: { location: `${this.systemPath}${rest}` } };
      }
      if (identity !== this.uuid) throw notFound(path);
      if (rest === '') return this.systemResource(method, body, req);
      if (rest === '/Actions/ComputerSystem.Reset') {
        only('POST');
        return this.reset(body);
      }
      if (rest.startsWith('/VirtualMedia') && this.virtualMediaBase() === `${this.systemPath}/VirtualMedia`)
        return this.virtualMedia(method, path, body);
      throw notFound(path);
    }
    if (
      path.startsWith(`/redfish/v1/Managers/${MANAGER_ID}/VirtualMedia`) &&
      this.virtualMediaBase() === `/redfish/v1/Managers/${MANAGER_ID}/VirtualMedia`
    )
      return this.virtualMedia(method, path, body);
    throw notFound(path);
  }

  private serviceRoot(): unknown {
    return {
      ...odata('#ServiceRoot.v1_5_0.ServiceRoot', '/redfish/v1/'),
      Id: 'RootService',
      Name: 'metalcast lab BMC',
      RedfishVersion: '1.11.0',
      UUID: uuidFrom(`service:${this.options.name}`),
      Systems: { '@odata.id': '/redfish/v1/Systems' },
      Managers: { '@odata.id': '/redfish/v1/Managers' },
      ...(this.faults.noSessionService
        ? {}
        : {
            SessionService: { '@odata.id': '/redfish/v1/SessionService' },
            Links: { Sessions: { '@odata.id': '/redfish/v1/SessionService/Sessions' } },
          }),
    };
  }

  private createSession(body: unknown): { status: number; body: unknown; headers: Record<string, string> } {
    const fields = (body ?? {}) as { UserName?: unknown; Password?: unknown };
    if (typeof fields.UserName !== 'string' || typeof fields.Password !== 'string')
      throw new HttpProblem(400, 'UserName and Password are required.', 'Base.1.8.PropertyMissing', [
        {
          MessageId: 'Base.1.8.PropertyMissing',
          Message: 'The property UserName or Password is a required property and must be included in the request.',
          Severity: 'Warning',
        },
      ]);
    if (!this.checkPassword(fields.UserName, fields.Password)) throw unauthorized('The user name or password is not valid.');
    const id = randomBytes(8).toString('hex');
    const token = randomBytes(24).toString('hex');
    this.sessions.set(id, { id, user: fields.UserName, token, lastUsed: Date.now() });
    const location = `/redfish/v1/SessionService/Sessions/${id}`;
    return {
      status: 201,
      headers: { 'x-auth-token': token, location },
      body: { ...odata('#Session.v1_1_0.Session', location), Id: id, Name: 'User Session', UserName: fields.UserName },
    };
  }

  private etag(): string {
    return `W/"${this.etagCounter}"`;
  }

  private allowedTargets(): string[] {
    return ['Pxe', 'Cd', 'Hdd', ...(this.boot.mode === 'UEFI' ? ['UefiHttp'] : [])];
  }

  private resetTypes(): string[] {
    return this.faults.resetTypes ?? STANDARD_RESET_TYPES;
  }

  private async powerState(): Promise<string> {
    return this.transition ?? ((await this.options.machine.isOn()) ? 'On' : 'Off');
  }

  private async systemResource(
    method: string,
    body: unknown,
    req: IncomingMessage,
  ): Promise<{ status: number; body?: unknown; headers?: Record<string, string> }> {
    if (method === 'PATCH') {
      const ifMatch = header(req, 'if-match');
      if (ifMatch === undefined && this.faults.requireIfMatch)
        throw new HttpProblem(428, 'This resource requires an If-Match header with its ETag.', 'Base.1.8.PreconditionRequired', [
          {
            MessageId: 'Base.1.8.PreconditionRequired',
            Message: 'A precondition header or annotation is required to change this resource.',
            Resolution: 'Try the request again with an If-Match header and the current ETag of the resource.',
            Severity: 'Critical',
          },
        ]);
      if (ifMatch !== undefined && ifMatch !== '*' && ifMatch !== this.etag() && ifMatch !== this.etag().slice(2))
        throw new HttpProblem(412, "The ETag given in If-Match is not the resource's current one.", 'Base.1.8.PreconditionFailed', [
          {
            MessageId: 'Base.1.8.PreconditionFailed',
            Message: 'The ETag supplied did not match the ETag required to change this resource.',
            Resolution: 'Try the operation again using the appropriate ETag.',
            Severity: 'Critical',
          },
        ]);
      await this.patchBoot(body);
      this.etagCounter++;
      return { status: 204 };
    }
    if (method !== 'GET')
      throw new HttpProblem(405, `${method} is not allowed on a system.`, 'Base.1.8.OperationNotAllowed', [], { allow: 'GET, PATCH' });
    const etag = this.etag();
    const vm = this.virtualMediaBase();
    return {
      status: 200,
      headers: { etag },
      body: {
        ...odata('#ComputerSystem.v1_13_0.ComputerSystem', this.systemPath),
        '@odata.etag': etag,
        Id: this.uuid,
        Name: this.options.name,
        UUID: this.uuid,
        Manufacturer: 'metalcast lab',
        Model: 'QEMU guest',
        SystemType: 'Virtual',
        Status: { State: 'Enabled', Health: 'OK' },
        PowerState: await this.powerState(),
        Boot: {
          BootSourceOverrideEnabled: this.boot.enabled,
          BootSourceOverrideTarget: this.boot.target,
          'BootSourceOverrideTarget@Redfish.AllowableValues': this.allowedTargets(),
          BootSourceOverrideMode: this.boot.mode,
          'BootSourceOverrideMode@Redfish.AllowableValues': ['UEFI', 'Legacy'],
        },
        ...(vm === `${this.systemPath}/VirtualMedia` ? { VirtualMedia: { '@odata.id': vm } } : {}),
        Links: { ManagedBy: [{ '@odata.id': `/redfish/v1/Managers/${MANAGER_ID}` }] },
        Actions: {
          '#ComputerSystem.Reset': {
            target: `${this.systemPath}/Actions/ComputerSystem.Reset`,
            'ResetType@Redfish.AllowableValues': this.resetTypes(),
          },
        },
      },
    };
  }

  private async patchBoot(body: unknown): Promise<void> {
    const boot = (body as { Boot?: Record<string, unknown> } | undefined)?.Boot;
    if (!boot || typeof boot !== 'object')
      throw new HttpProblem(400, 'PATCH of a system changes Boot only.', 'Base.1.8.PropertyUnknown', [
        { MessageId: 'Base.1.8.PropertyUnknown', Message: 'Only the Boot property can be changed on this system.', Severity: 'Warning' },
      ]);
    const target = boot.BootSourceOverrideTarget;
    const enabled = boot.BootSourceOverrideEnabled;
    const mode = boot.BootSourceOverrideMode;
    const notInList = (property: string, value: unknown, allowed: string[]) =>
      new HttpProblem(
        400,
        `The value ${JSON.stringify(value)} for ${property} is not one this system allows.`,
        'Base.1.8.PropertyValueNotInList',
        [
          {
            MessageId: 'Base.1.8.PropertyValueNotInList',
            Message: `The value ${JSON.stringify(value)} for the property ${property} is not in the list of acceptable values.`,
            Resolution: `Choose a value from the enumeration list: ${allowed.join(', ')}.`,
            Severity: 'Warning',
          },
        ],
      );
    if (target !== undefined && (typeof target !== 'string' || !['None', ...this.allowedTargets()].includes(target)))
      throw notInList('BootSourceOverrideTarget', target, ['None', ...this.allowedTargets()]);
    if (enabled !== undefined && !['Disabled', 'Once', 'Continuous'].includes(enabled as string))
      throw notInList('BootSourceOverrideEnabled', enabled, ['Disabled', 'Once', 'Continuous']);
    if (mode !== undefined && !['UEFI', 'Legacy'].includes(mode as string))
      throw notInList('BootSourceOverrideMode', mode, ['UEFI', 'Legacy']);
    if (target === 'UefiHttp') throw new HttpProblem(400, 'UefiHttp is not wired to anything in this lab.', 'Base.1.8.ActionNotSupported');
    if (mode !== undefined) this.boot.mode = mode as 'UEFI' | 'Legacy';
    if (target !== undefined) this.boot.target = target as BootTarget;
    if (enabled !== undefined) this.boot.enabled = enabled as 'Disabled' | 'Once' | 'Continuous';
    else if (target !== undefined && this.boot.enabled === 'Disabled') this.boot.enabled = 'Once';
    const active = this.boot.enabled !== 'Disabled' && this.boot.target !== 'None';
    await this.options.machine.setBootTarget(active ? this.boot.target : 'None', this.boot.enabled === 'Once');
  }

  private async reset(body: unknown): Promise<{ status: number }> {
    const type = (body as { ResetType?: unknown } | undefined)?.ResetType;
    if (type === undefined)
      throw new HttpProblem(400, 'ResetType is required.', 'Base.1.8.ActionParameterMissing', [
        {
          MessageId: 'Base.1.8.ActionParameterMissing',
          Message: 'The action ComputerSystem.Reset requires the parameter ResetType to be present in the request body.',
          Severity: 'Critical',
        },
      ]);
    if (typeof type !== 'string' || !this.resetTypes().includes(type))
      throw new HttpProblem(
        400,
        `ResetType ${JSON.stringify(type)} is not allowed on this system.`,
        'Base.1.8.ActionParameterNotSupported',
        [
          {
            MessageId: 'Base.1.8.ActionParameterNotSupported',
            Message: `The parameter ResetType with the value ${JSON.stringify(type)} is not supported by the action ComputerSystem.Reset.`,
            Resolution: `Use one of: ${this.resetTypes().join(', ')}.`,
            Severity: 'Warning',
          },
        ],
      );
    const machine = this.options.machine;
    const on = await machine.isOn();
    const act: (() => Promise<void>) | undefined = {
      On: () => machine.powerOn(),
      ForceOn: () => machine.powerOn(),
      ForceOff: () => machine.powerOff(),
      GracefulShutdown: () => machine.pressPowerButton(),
      PushPowerButton: () => (on ? machine.pressPowerButton() : machine.powerOn()),
      ForceRestart: () => machine.reset(),
      GracefulRestart: () => machine.reset(),
      PowerCycle: () => machine.reset(),
      Nmi: async () => {},
    }[type];
    if (this.faults.powerStuck || !act) return { status: 204 };
    const consumeOnce = () => {
      // A consumed "once" override shows as such, as on real BMCs.
      if (['On', 'ForceOn', 'ForceRestart', 'GracefulRestart', 'PowerCycle'].includes(type) && this.boot.enabled === 'Once') {
        this.boot = { ...this.boot, enabled: 'Disabled', target: 'None' };
        this.etagCounter++;
      }
    };
    if (on && ['ForceRestart', 'GracefulRestart', 'PowerCycle'].includes(type)) {
      // A restart shows no power state to wait for; BMCs act on it at once.
      await act();
      consumeOnce();
      return { status: 204 };
    }
    const goingOn = ['On', 'ForceOn'].includes(type) || (type === 'PushPowerButton' && !on);
    const goingOff = ['ForceOff'].includes(type);
    if (goingOn && !on) this.transition = 'PoweringOn';
    if (goingOff && on) this.transition = 'PoweringOff';
    // Like a real BMC (and sushy-emulator): accepted now, done a moment later.
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      act()
        .catch(() => {})
        .finally(() => {
          this.transition = undefined;
          consumeOnce();
        });
    }, this.options.resetDelayMs ?? 200);
    this.timers.add(timer);
    return { status: 204 };
  }

  private manager(): unknown {
    const vm = this.virtualMediaBase();
    return {
      ...odata('#Manager.v1_3_1.Manager', `/redfish/v1/Managers/${MANAGER_ID}`),
      Id: MANAGER_ID,
      Name: 'metalcast lab BMC',
      ManagerType: 'BMC',
      UUID: uuidFrom(`manager:${this.options.name}`),
      Model: 'metalcast Redfish simulator',
      FirmwareVersion: '1.0',
      Status: { State: 'Enabled', Health: 'OK' },
      PowerState: 'On',
      ...(vm === `/redfish/v1/Managers/${MANAGER_ID}/VirtualMedia` ? { VirtualMedia: { '@odata.id': vm } } : {}),
      Links: { ManagerForServers: [{ '@odata.id': this.systemPath }] },
    };
  }

  private virtualMediaBase(): string | undefined {
    if (this.faults.noVirtualMedia) return undefined;
    return this.options.virtualMediaUnder === 'system'
      ? `${this.systemPath}/VirtualMedia`
      : `/redfish/v1/Managers/${MANAGER_ID}/VirtualMedia`;
  }

  private async virtualMedia(method: string, path: string, body: unknown): Promise<{ status: number; body?: unknown }> {
    const base = this.virtualMediaBase() as string;
    const drive = `${base}/${CD_ID}`;
    if (path === base) {
      if (method !== 'GET') throw new HttpProblem(405, `${method} is not allowed here.`, 'Base.1.8.OperationNotAllowed');
      return { status: 200, body: collection('#VirtualMediaCollection.VirtualMediaCollection', base, 'Virtual Media Services', [drive]) };
    }
    if (path === drive) {
      if (method !== 'GET')
        throw new HttpProblem(
          405,
          `${method} is not allowed here; use the InsertMedia and EjectMedia actions.`,
          'Base.1.8.OperationNotAllowed',
        );
      return {
        status: 200,
        body: {
          ...odata('#VirtualMedia.v1_3_0.VirtualMedia', drive),
          Id: CD_ID,
          Name: 'Virtual CD',
          MediaTypes: ['CD', 'DVD'],
          Image: this.media?.image ?? '',
          ImageName: this.media ? (this.media.image.split('/').at(-1) ?? '') : '',
          ConnectedVia: this.media ? 'URI' : 'NotConnected',
          Inserted: this.media !== undefined,
          WriteProtected: true,
          TransferProtocolType: this.media?.image.startsWith('https:') ? 'HTTPS' : 'HTTP',
          Actions: {
            '#VirtualMedia.InsertMedia': { target: `${drive}/Actions/VirtualMedia.InsertMedia` },
            '#VirtualMedia.EjectMedia': { target: `${drive}/Actions/VirtualMedia.EjectMedia` },
          },
        },
      };
    }
    if (path === `${drive}/Actions/VirtualMedia.InsertMedia`) {
      if (method !== 'POST') throw new HttpProblem(405, 'POST the action.', 'Base.1.8.OperationNotAllowed');
      const image = (body as { Image?: unknown } | undefined)?.Image;
      if (typeof image !== 'string' || !/^https?:\/\//.test(image))
        throw new HttpProblem(400, 'Image must be an http:// or https:// URL.', 'Base.1.8.ActionParameterValueFormatError', [
          {
            MessageId: 'Base.1.8.ActionParameterValueFormatError',
            Message: `The value ${JSON.stringify(image)} for the parameter Image in the action InsertMedia is of a different format than the parameter can accept.`,
            Severity: 'Warning',
          },
        ]);
      if (this.media) await this.eject();
      const file = await this.fetchImage(image);
      await this.options.machine.insertMedia(file);
      this.media = { image, file };
      return { status: 204 };
    }
    if (path === `${drive}/Actions/VirtualMedia.EjectMedia`) {
      if (method !== 'POST') throw new HttpProblem(405, 'POST the action.', 'Base.1.8.OperationNotAllowed');
      if (this.media) await this.eject();
      return { status: 204 };
    }
    throw notFound(path);
  }

  private async eject(): Promise<void> {
    await this.options.machine.ejectMedia();
    if (this.media) rmSync(this.media.file, { force: true });
    this.media = undefined;
  }

  /** Fetches the image as a BMC does before it presents it; a failure is the BMC's 400 with the reason. */
  private async fetchImage(url: string): Promise<string> {
    const file = join(this.mediaDir, `${createHash('sha256').update(url).digest('hex').slice(0, 16)}-${Date.now()}.iso`);
    let response: Response;
    try {
      response = await fetch(url, { signal: AbortSignal.timeout(120_000) });
    } catch (error) {
      throw new HttpProblem(
        400,
        `The image ${url} could not be fetched: ${(error as Error).message}.`,
        'Base.1.8.ResourceAtUriUnauthorized',
      );
    }
    if (!response.ok || !response.body)
      throw new HttpProblem(400, `The image ${url} could not be fetched: HTTP ${response.status}.`, 'Base.1.8.ResourceAtUriUnauthorized', [
        {
          MessageId: 'Base.1.8.ResourceAtUriUnauthorized',
          Message: `While accessing the resource at ${url}, the service received an error: HTTP ${response.status}.`,
          Severity: 'Critical',
        },
      ]);
    await pipeline(Readable.fromWeb(response.body as import('node:stream/web').ReadableStream), createWriteStream(file));
    return file;
  }
}

// --- helpers

function header(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

function equal(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(new HttpProblem(413, 'The request body is too large.'));
        req.destroy();
      } else chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function parseJson(body: Buffer): unknown {
  try {
    return JSON.parse(body.toString('utf8'));
  } catch {
    throw new HttpProblem(400, 'The request body is not JSON.', 'Base.1.8.MalformedJSON', [
      {
        MessageId: 'Base.1.8.MalformedJSON',
        Message: 'The request body submitted was malformed JSON and could not be parsed by the receiving service.',
        Severity: 'Critical',
      },
    ]);
  }
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.destroyed) return;
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(text ? { 'content-type': 'application/json; charset=utf-8' } : {}),
    'odata-version': '4.0',
    'content-length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

function errorBody(problem: HttpProblem): unknown {
  return {
    error: {
      code: problem.messageId,
      message: problem.message,
      '@Message.ExtendedInfo': problem.extended.length
        ? problem.extended.map((m) => ({ '@odata.type': '#Message.v1_1_1.Message', Severity: 'Warning', ...m }))
        : [{ '@odata.type': '#Message.v1_1_1.Message', MessageId: problem.messageId, Message: problem.message, Severity: 'Warning' }],
    },
  };
}

function unauthorized(message: string): HttpProblem {
  return new HttpProblem(
    401,
    message,
    'Base.1.8.NoValidSession',
    [
      {
        MessageId: 'Base.1.8.NoValidSession',
        Message: 'There is no valid session established with the implementation.',
        Resolution: 'Establish a session before attempting any operations.',
        Severity: 'Critical',
      },
    ],
    { 'www-authenticate': 'Basic realm="metalcast lab BMC"' },
  );
}

function notFound(path: string): HttpProblem {
  return new HttpProblem(404, `${path} does not exist.`, 'Base.1.8.ResourceMissingAtURI', [
    {
      MessageId: 'Base.1.8.ResourceMissingAtURI',
      Message: `The resource at the URI ${path} was not found.`,
      Resolution: 'Place a valid resource at the URI or correct the URI and resubmit the request.',
      Severity: 'Critical',
    },
  ]);
}

function odata(type: string, id: string): Record<string, string> {
  return { '@odata.type': type, '@odata.id': id };
}

function collection(type: string, id: string, name: string, members: string[]): unknown {
  return { ...odata(type, id), Name: name, 'Members@odata.count': members.length, Members: members.map((m) => ({ '@odata.id': m })) };
}

/** A stable UUID from a name. */
function uuidFrom(name: string): string {
  const hex = createHash('sha256').update(`metalcast-bmc:${name}`).digest('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-8${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
}
