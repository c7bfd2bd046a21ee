// A client for the freedesktop Secret Service (org.freedesktop.secrets on the session bus: GNOME
// Keyring, KWallet, KeePassXC) over dbus-native, with only what keyhold needs: store, look up and
// delete one item by its attributes in the default collection.
//
// It never opens a prompt: a locked collection or item is reported (exit 4), never unlocked, so a
// keyhold command cannot sit waiting for a dialog nobody sees. Every call has a deadline, so a bus
// or provider that does not answer is an error within a few seconds, never a hang.
//
// The secret crosses the bus encrypted when the provider offers dh-ietf1024-sha256-aes128-cbc-pkcs7
// (GNOME Keyring and KeePassXC do), else in a `plain` session; either way only this uid's session
// bus carries it. Secrets are Buffers the caller owns; the copies made here are zeroed (not those
// inside dbus-native's message buffers: with the DH session they hold only ciphertext).
import { createCipheriv, createDecipheriv, createDiffieHellman, hkdfSync, randomBytes } from 'node:crypto';
import type DbusNative from 'dbus-native';
import { EXIT, KeyholdError, type ExitCode } from '../errors.js';
import { loadOnFirstUse } from '../load-on-first-use.js';

/** dbus-native and its XML parser: most commands never talk D-Bus. */
const dbusNative = loadOnFirstUse<typeof DbusNative>('dbus-native');

export const SECRET_SERVICE_BUS_NAME = 'org.freedesktop.secrets';
export const SECRET_SERVICE_PATH = '/org/freedesktop/secrets';
const SERVICE_IFACE = 'org.freedesktop.Secret.Service';
const COLLECTION_IFACE = 'org.freedesktop.Secret.Collection';
const ITEM_IFACE = 'org.freedesktop.Secret.Item';
const SESSION_IFACE = 'org.freedesktop.Secret.Session';
const PROMPT_IFACE = 'org.freedesktop.Secret.Prompt';
const PROPERTIES_IFACE = 'org.freedesktop.DBus.Properties';
/** An object path meaning "none" in the Secret Service API (no prompt, no such alias). */
const NO_OBJECT = '/';

export const DH_ALGORITHM = 'dh-ietf1024-sha256-aes128-cbc-pkcs7';
export type SessionAlgorithm = typeof DH_ALGORITHM | 'plain';

/**
 * RFC 2409's second Oakley group (1024-bit MODP, generator 2), the group the Secret Service
 * specification names for this algorithm. Spelled out rather than `getDiffieHellman('modp2')`,
 * which Node documents as deprecated.
 */
export const RFC2409_MODP1024_PRIME = Buffer.from(
  'FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD' +
    'EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED' +
    'EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF',
  'hex',
);

/** A few seconds: a provider answers in milliseconds, or is waiting on something that will not come. */
export const DEFAULT_TIMEOUT_MS = 3000;

export type SecretServiceFailure = 'no-bus' | 'no-provider' | 'timeout' | 'locked' | 'missing' | 'refused';

const LOCKED_HINT = 'log in to the desktop session, or unlock the login keyring with `gnome-keyring-daemon --unlock`, which reads its password on stdin; then retry';

/**
 * Why the Secret Service could not do what was asked. `no-bus`, `no-provider` and `timeout` exit 3
 * (nothing answered: there is nothing to ask, try another factor); `locked`, `missing` and
 * `refused` exit 4 (the provider answered and said no).
 */
export class SecretServiceError extends KeyholdError {
  override name = 'SecretServiceError';

  constructor(
    readonly reason: SecretServiceFailure,
    message: string,
    hint?: string,
    exitCode: ExitCode = reason === 'no-bus' || reason === 'no-provider' || reason === 'timeout' ? EXIT.LOCKED : EXIT.DENIED,
    /** The D-Bus error name of a `refused` call. */
    readonly dbusName?: string,
  ) {
    super(message, hint, exitCode);
  }
}

export type SecretAttributes = Record<string, string>;

export interface SecretServiceOptions {
  env?: NodeJS.ProcessEnv | undefined;
  /** The deadline of each call, connecting included (default 3 s). */
  timeoutMs?: number | undefined;
  /** `plain` refuses the DH session even when offered (tests; providers that break it). */
  algorithm?: 'auto' | 'plain' | undefined;
}

/** The session bus's socket from DBUS_SESSION_BUS_ADDRESS: the first `unix:path=` or `unix:abstract=` entry. */
export function sessionBusSocket(env: NodeJS.ProcessEnv): string {
  const address = env.DBUS_SESSION_BUS_ADDRESS;
  if (!address) {
    throw new SecretServiceError(
      'no-bus',
      'no Secret Service: DBUS_SESSION_BUS_ADDRESS is not set',
      'run keyhold inside the desktop session, or under `dbus-run-session` with a Secret Service such as gnome-keyring-daemon; or use another factor',
    );
  }
  for (const entry of address.split(';')) {
    const colon = entry.indexOf(':');
    if (entry.slice(0, colon) !== 'unix') continue;
    const params = new Map<string, string>();
    for (const pair of entry.slice(colon + 1).split(',')) {
      const eq = pair.indexOf('=');
      if (eq > 0) params.set(pair.slice(0, eq), unescapeAddressValue(pair.slice(eq + 1)));
    }
    const path = params.get('path');
    if (path) return path;
    const abstract = params.get('abstract');
    if (abstract) return `\0${abstract}`;
  }
  // tcp: would mean cookie authentication over a network, unixexec: running a program: neither is
  // a desktop session's bus.
  throw new SecretServiceError(
    'no-bus',
    'no Secret Service: DBUS_SESSION_BUS_ADDRESS names no unix socket',
    'keyhold talks to the session bus through unix:path= or unix:abstract= only',
  );
}

/** D-Bus address values escape bytes as %XX. */
function unescapeAddressValue(value: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

type Bus = ReturnType<typeof DbusNative.createClient>;

/** One connection and one open session; `withSecretService` closes both. */
export class SecretServiceClient {
  private closed = false;

  private constructor(
    private readonly bus: Bus,
    private readonly timeoutMs: number,
    private readonly connectionError: () => Error | undefined,
    private sessionPath: string,
    /** The session's AES-128 key (DH), or null (plain). Zeroed by close(). */
    private readonly sessionKey: Buffer | null,
  ) {}

  get algorithm(): SessionAlgorithm {
    return this.sessionKey ? DH_ALGORITHM : 'plain';
  }

  static async open(options: SecretServiceOptions = {}): Promise<SecretServiceClient> {
    const env = options.env ?? process.env;
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const { bus, lastError } = connectSessionBus(sessionBusSocket(env), true);
    const call = new Caller(bus, timeoutMs, lastError);
    try {
      const { path, key } = await openSession(call, options.algorithm ?? 'auto');
      return new SecretServiceClient(bus, timeoutMs, lastError, path, key);
    } catch (err) {
      bus.connection.stream.destroy();
      throw err;
    }
  }

  private get call(): Caller {
    return new Caller(this.bus, this.timeoutMs, this.connectionError);
  }

  /** Stores `secret` in the default collection, replacing an item with the same attributes. */
  async store(label: string, attributes: SecretAttributes, secret: Buffer): Promise<void> {
    const collection = await this.defaultCollection();
    if (await this.isLocked(collection, COLLECTION_IFACE)) throw lockedError();
    const properties = [
      [`${ITEM_IFACE}.Label`, new (dbusNative().Variant)('s', label)],
      [`${ITEM_IFACE}.Attributes`, new (dbusNative().Variant)('a{ss}', Object.entries(attributes))],
    ];
    const encoded = this.encode(secret);
    try {
      const [item, prompt] = await this.call.invoke<[string, string]>(collection, COLLECTION_IFACE, 'CreateItem', 'a{sv}(oayays)b', [
        properties,
        [this.sessionPath, encoded.parameters, encoded.value, 'application/octet-stream'],
        true,
      ]);
      if (item === NO_OBJECT || prompt !== NO_OBJECT) {
        await this.dismiss(prompt);
        throw lockedError('it asked to prompt before storing, and keyhold never prompts through it');
      }
    } finally {
      encoded.value.fill(0);
    }
  }

  /**
   * The secret of the item with these attributes (the caller zeroes it). Throws `locked` when the
   * item (or the default collection, for providers that hide locked items) is locked, `missing`
   * when there is no such item.
   */
  async lookup(attributes: SecretAttributes): Promise<Buffer> {
    const { unlocked, locked } = await this.search(attributes);
    for (const item of unlocked) {
      try {
        const [, parameters, value] = await this.call.invoke<[string, Buffer, Buffer, string]>(item, ITEM_IFACE, 'GetSecret', 'o', [this.sessionPath]);
        return this.decode(parameters, value);
      } catch (err) {
        // Deleted between the search and the read: the next one, if any.
        if (err instanceof SecretServiceError && err.reason === 'missing') continue;
        throw err;
      }
    }
    if (locked.length > 0) throw lockedError();
    const collection = await this.defaultCollection().catch(() => null);
    if (collection && (await this.isLocked(collection, COLLECTION_IFACE))) throw lockedError();
    throw new SecretServiceError('missing', `the Secret Service holds no item ${describeAttributes(attributes)}`);
  }

  /** Deletes every item with these attributes; returns how many. Locked ones throw `locked`. */
  async remove(attributes: SecretAttributes): Promise<number> {
    const { unlocked, locked } = await this.search(attributes);
    let removed = 0;
    for (const item of [...unlocked, ...locked]) {
      try {
        const prompt = await this.call.invoke<string>(item, ITEM_IFACE, 'Delete', '', []);
        if (prompt !== NO_OBJECT) {
          await this.dismiss(prompt);
          throw lockedError('it asked to prompt before deleting, and keyhold never prompts through it');
        }
        removed++;
      } catch (err) {
        if (err instanceof SecretServiceError && err.reason === 'missing') continue;
        throw err;
      }
    }
    return removed;
  }

  /** Closes the session (the provider forgets its key) and the connection. Never throws. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.sessionKey?.fill(0);
    try {
      await this.call.invoke(this.sessionPath, SESSION_IFACE, 'Close', '', []);
    } catch {
      // The provider drops the session with the connection anyway.
    }
    const stream = this.bus.connection.stream;
    const timer = setTimeout(() => stream.destroy(), this.timeoutMs);
    try {
      await this.bus.close();
    } finally {
      clearTimeout(timer);
      stream.destroy();
    }
  }

  private async search(attributes: SecretAttributes): Promise<{ unlocked: string[]; locked: string[] }> {
    const [unlocked, locked] = await this.call.invoke<[string[], string[]]>(SECRET_SERVICE_PATH, SERVICE_IFACE, 'SearchItems', 'a{ss}', [
      Object.entries(attributes),
    ]);
    return { unlocked: unlocked ?? [], locked: locked ?? [] };
  }

  private async defaultCollection(): Promise<string> {
    const path = await this.call.invoke<string>(SECRET_SERVICE_PATH, SERVICE_IFACE, 'ReadAlias', 's', ['default']);
    if (path === NO_OBJECT) {
      throw new SecretServiceError(
        'refused',
        'the Secret Service has no default collection',
        'create a default keyring (Seahorse: File > New > Password Keyring, then "Set as default"), or use another factor',
      );
    }
    return path;
  }

  private async isLocked(path: string, iface: string): Promise<boolean> {
    const locked = await this.call.invoke<unknown>(path, PROPERTIES_IFACE, 'Get', 'ss', [iface, 'Locked']);
    return locked === true;
  }

  /** A prompt keyhold will not show: dismissed so the provider does not keep it around. */
  private async dismiss(prompt: string): Promise<void> {
    if (!prompt || prompt === NO_OBJECT) return;
    try {
      await this.call.invoke(prompt, PROMPT_IFACE, 'Dismiss', '', []);
    } catch {
      // Best effort: the provider drops it with the connection.
    }
  }

  private encode(secret: Buffer): { parameters: Buffer; value: Buffer } {
    if (!this.sessionKey) return { parameters: Buffer.alloc(0), value: Buffer.from(secret) };
    const iv = randomBytes(16);
    const cipher = createCipheriv('aes-128-cbc', this.sessionKey, iv);
    return { parameters: iv, value: Buffer.concat([cipher.update(secret), cipher.final()]) };
  }

  private decode(parameters: Buffer, value: Buffer): Buffer {
    if (!this.sessionKey) return value;
    try {
      if (parameters.length !== 16) throw new Error('bad IV');
      const decipher = createDecipheriv('aes-128-cbc', this.sessionKey, parameters);
      const head = decipher.update(value);
      const tail = decipher.final();
      const secret = Buffer.concat([head, tail]);
      head.fill(0);
      tail.fill(0);
      return secret;
    } catch {
      throw new SecretServiceError('refused', 'the Secret Service returned a secret that does not decrypt in this session', 'check the Secret Service provider: gnome-keyring-daemon, KWallet, KeePassXC');
    } finally {
      value.fill(0);
    }
  }
}

export interface SecretServicePresence {
  /** `running`: something owns org.freedesktop.secrets; `activatable`: the bus would start it. */
  provider: 'running' | 'activatable' | 'absent';
  /** When running: the state of the collection behind the `default` alias. */
  defaultCollection?: 'unlocked' | 'locked' | 'none';
}

/**
 * What `keyhold doctor` reports: asks the bus who provides the Secret Service and, when one runs,
 * whether its default collection is locked. Never starts a provider (an activatable one stays
 * unstarted) and opens no session. Throws `no-bus` / `timeout` SecretServiceErrors.
 */
export async function probeSecretService(options: SecretServiceOptions = {}): Promise<SecretServicePresence> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const { bus, lastError } = connectSessionBus(sessionBusSocket(options.env ?? process.env), false);
  const call = new Caller(bus, timeoutMs, lastError);
  const busCall = <T>(member: string, signature: string, body: unknown[]) =>
    call.invoke<T>('/org/freedesktop/DBus', 'org.freedesktop.DBus', member, signature, body, 'org.freedesktop.DBus');
  try {
    if (!(await busCall<boolean>('NameHasOwner', 's', [SECRET_SERVICE_BUS_NAME]))) {
      const activatable = await busCall<string[]>('ListActivatableNames', '', []);
      return { provider: activatable.includes(SECRET_SERVICE_BUS_NAME) ? 'activatable' : 'absent' };
    }
    const collection = await call.invoke<string>(SECRET_SERVICE_PATH, SERVICE_IFACE, 'ReadAlias', 's', ['default']);
    if (collection === NO_OBJECT) return { provider: 'running', defaultCollection: 'none' };
    const locked = await call.invoke<unknown>(collection, PROPERTIES_IFACE, 'Get', 'ss', [COLLECTION_IFACE, 'Locked']);
    return { provider: 'running', defaultCollection: locked === true ? 'locked' : 'unlocked' };
  } finally {
    bus.connection.stream.destroy();
  }
}

/** A connection to the session bus at `socket`, and the last error its connection reported. */
function connectSessionBus(socket: string, ayBuffer: boolean): { bus: Bus; lastError: () => Error | undefined } {
  let lastError: Error | undefined;
  const bus = dbusNative().createClient({ socket, authMethods: ['EXTERNAL'], plainValues: true, variants: 'plain', ...(ayBuffer ? { ayBuffer: true } : {}) });
  // Without listeners these would be thrown as uncaught exceptions; the failed call reports them.
  bus.connection.on('error', (err: Error) => {
    lastError = err;
  });
  bus.connection.on('handlerError', (err: Error) => {
    lastError = err;
    bus.connection.stream.destroy();
  });
  return { bus, lastError: () => lastError };
}

/** Opens a client, runs `fn`, and closes it however `fn` ends. */
export async function withSecretService<T>(options: SecretServiceOptions, fn: (client: SecretServiceClient) => Promise<T>): Promise<T> {
  const client = await SecretServiceClient.open(options);
  try {
    return await fn(client);
  } finally {
    await client.close();
  }
}

/** Method calls with a deadline, their failures turned into SecretServiceErrors. */
class Caller {
  constructor(
    private readonly bus: Bus,
    private readonly timeoutMs: number,
    private readonly connectionError: () => Error | undefined,
  ) {}

  async invoke<T>(path: string, iface: string, member: string, signature: string, body: unknown[], destination = SECRET_SERVICE_BUS_NAME): Promise<T> {
    try {
      return await this.bus.invoke<T>(
        { destination, path, interface: iface, member, ...(signature ? { signature, body } : {}) },
        { timeout: this.timeoutMs },
      );
    } catch (err) {
      throw this.translate(err as Error & { dbusName?: string; code?: string }, `${iface.split('.').pop()}.${member}`);
    }
  }

  private translate(err: Error & { dbusName?: string; code?: string }, call: string): SecretServiceError {
    const name = err.dbusName ?? '';
    if (err.code === 'ETIMEDOUT' || name === 'org.freedesktop.DBus.Error.NoReply' || name === 'org.freedesktop.DBus.Error.Timeout') {
      this.bus.connection.stream.destroy();
      return new SecretServiceError(
        'timeout',
        `the Secret Service did not answer ${call} within ${this.timeoutMs / 1000} s`,
        'is the session bus or the keyring daemon stuck? restart it, or use another factor',
      );
    }
    if (err.code === 'ECONNCLOSED') {
      const cause = this.connectionError() as (Error & { code?: string }) | undefined;
      return new SecretServiceError(
        'no-bus',
        `no Secret Service: cannot reach the session bus (${cause?.code ?? cause?.message ?? 'connection closed'})`,
        'check DBUS_SESSION_BUS_ADDRESS (run keyhold inside the desktop session), or use another factor',
      );
    }
    if (name === 'org.freedesktop.DBus.Error.ServiceUnknown' || name === 'org.freedesktop.DBus.Error.NameHasNoOwner' || name.startsWith('org.freedesktop.DBus.Error.Spawn.')) {
      return new SecretServiceError(
        'no-provider',
        'no Secret Service on the session bus (nothing provides org.freedesktop.secrets)',
        'start gnome-keyring-daemon, KWallet, or KeePassXC with its Secret Service integration; or use another factor',
      );
    }
    if (name === 'org.freedesktop.Secret.Error.IsLocked') return lockedError();
    if (name === 'org.freedesktop.Secret.Error.NoSuchObject' || name === 'org.freedesktop.DBus.Error.UnknownObject') {
      return new SecretServiceError('missing', `the Secret Service has no such object (${call})`);
    }
    // The provider's own words can be anything: keep the error's name, which is an identifier.
    return new SecretServiceError(
      'refused',
      `the Secret Service refused ${call}: ${name || err.message.slice(0, 120)}`,
      'check the Secret Service provider: gnome-keyring-daemon, KWallet, KeePassXC',
      EXIT.DENIED,
      name || undefined,
    );
  }
}

function lockedError(detail?: string): SecretServiceError {
  return new SecretServiceError('locked', `the Secret Service keyring is locked${detail ? ` (${detail})` : ''}`, LOCKED_HINT);
}

function describeAttributes(attributes: SecretAttributes): string {
  return Object.entries(attributes)
    .map(([k, v]) => `${k}=${v}`)
    .join(' ');
}

/**
 * OpenSession: dh-ietf1024-sha256-aes128-cbc-pkcs7 when the provider offers it (it answers
 * NotSupported otherwise), else plain. The AES key is HKDF-SHA256 (no salt, no info) of the DH
 * shared secret, which Node pads to the prime's 128 bytes as the specification's clients do.
 */
async function openSession(call: Caller, algorithm: 'auto' | 'plain'): Promise<{ path: string; key: Buffer | null }> {
  if (algorithm === 'auto') {
    const dh = createDiffieHellman(RFC2409_MODP1024_PRIME, 2);
    const ours = dh.generateKeys();
    try {
      const [theirs, path] = await call.invoke<[Buffer, string]>(SECRET_SERVICE_PATH, SERVICE_IFACE, 'OpenSession', 'sv', [
        DH_ALGORITHM,
        new (dbusNative().Variant)('ay', ours),
      ]);
      if (!Buffer.isBuffer(theirs)) throw new SecretServiceError('refused', 'the Secret Service answered OpenSession without a public key');
      let shared: Buffer;
      try {
        shared = dh.computeSecret(theirs);
      } catch {
        throw new SecretServiceError('refused', 'the Secret Service answered OpenSession with an invalid public key');
      }
      try {
        return { path, key: Buffer.from(hkdfSync('sha256', shared, Buffer.alloc(0), Buffer.alloc(0), 16)) };
      } finally {
        shared.fill(0);
      }
    } catch (err) {
      const notSupported = err instanceof SecretServiceError && err.dbusName === 'org.freedesktop.DBus.Error.NotSupported';
      if (!notSupported) throw err;
    }
  }
  const [, path] = await call.invoke<[unknown, string]>(SECRET_SERVICE_PATH, SERVICE_IFACE, 'OpenSession', 'sv', ['plain', new (dbusNative().Variant)('s', '')]);
  return { path, key: null };
}
