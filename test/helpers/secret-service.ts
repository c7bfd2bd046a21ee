/**
 * Test harness: a private session bus (`dbus-daemon --session` on a temp config that activates
 * nothing, so "no provider" stays true) and, on it, a real `gnome-keyring-daemon --foreground
 * --unlock --components=secrets` with a temp HOME and XDG dirs, its login keyring created and
 * unlocked with a password given on stdin. Every process started here is stopped by stop() /
 * stopAllSecretServices(), and killed synchronously if the test process exits first.
 *
 * The D-Bus calls here (lock, search) go straight through dbus-native, not through
 * src/platform/secret-service.ts, so they check that client rather than trust it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import dbus from 'dbus-native';

const START_TIMEOUT_MS = 10_000;
const STOP_GRACE_MS = 3_000;
const CALL_TIMEOUT_MS = 3_000;

const SECRETS = 'org.freedesktop.secrets';
const SERVICE_PATH = '/org/freedesktop/secrets';
const SERVICE_IFACE = 'org.freedesktop.Secret.Service';

export interface SessionBusHandle {
  /** DBUS_SESSION_BUS_ADDRESS of this bus. */
  address: string;
  /** Temp dir holding the bus socket and the HOME/XDG dirs; removed by stop(). */
  dir: string;
  /** DBUS_SESSION_BUS_ADDRESS, HOME and the XDG dirs, for a child that should use this session. */
  env: NodeJS.ProcessEnv;
  stop(): Promise<void>;
}

export interface GnomeKeyringHandle extends SessionBusHandle {
  keyringPid: number;
  /** Service.Lock on the default collection, as the desktop's "lock keyring" does. */
  lockDefaultCollection(): Promise<void>;
  /** Service.SearchItems: how many items (unlocked + locked) have these attributes. */
  countItems(attributes: Record<string, string>): Promise<number>;
  /** Stops gnome-keyring-daemon, leaving the bus without a Secret Service. */
  stopKeyring(): Promise<void>;
}

const running = new Set<Child>();

process.once('exit', () => {
  for (const c of running) c.killNow();
});

class Child {
  private exitedFlag = false;
  readonly exited: Promise<void>;
  private stopping: Promise<void> | undefined;
  output = '';

  constructor(
    readonly name: string,
    readonly process: ChildProcess,
  ) {
    const collect = (d: Buffer) => (this.output = (this.output + d.toString()).slice(-4096));
    process.stdout?.on('data', collect);
    process.stderr?.on('data', collect);
    this.exited = new Promise<void>((resolve) => {
      process.once('exit', () => resolve());
      process.once('error', () => resolve());
    }).then(() => {
      this.exitedFlag = true;
    });
    running.add(this);
  }

  get hasExited(): boolean {
    return this.exitedFlag;
  }

  killNow(): void {
    if (!this.exitedFlag) this.process.kill('SIGKILL');
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (!this.exitedFlag) {
        this.process.kill('SIGTERM');
        const timer = setTimeout(() => this.process.kill('SIGKILL'), STOP_GRACE_MS);
        await this.exited;
        clearTimeout(timer);
      }
      running.delete(this);
    })();
    return this.stopping;
  }
}

function busConfig(socket: string): string {
  // No <servicedir> and no <standard_session_servicedirs/>: nothing is activated on demand, so
  // the Secret Service exists exactly while the test's gnome-keyring-daemon runs.
  return `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=${socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`;
}

/** A private session bus in a temp dir, with HOME and the XDG dirs inside it. */
export async function startSessionBus(): Promise<SessionBusHandle> {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-dbus-'));
  const home = join(dir, 'home');
  const runtime = join(dir, 'run');
  mkdirSync(home, { mode: 0o700 });
  mkdirSync(runtime, { mode: 0o700 });
  const config = join(dir, 'bus.conf');
  writeFileSync(config, busConfig(join(dir, 'bus')));
  const child = new Child('dbus-daemon', spawn('dbus-daemon', ['--config-file', config, '--nofork', '--print-address=1'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const stop = async () => {
    await child.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const address = await waitUntil(() => (child.output.match(/^(unix:\S+)$/m)?.[1] ?? null), () => child, 'dbus-daemon printing its address');
    const env: NodeJS.ProcessEnv = {
      DBUS_SESSION_BUS_ADDRESS: address,
      HOME: home,
      XDG_RUNTIME_DIR: runtime,
      XDG_DATA_HOME: join(home, '.local', 'share'),
      XDG_CONFIG_HOME: join(home, '.config'),
      XDG_CACHE_HOME: join(home, '.cache'),
    };
    return { address, dir, env, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** A session bus with gnome-keyring-daemon on it, its login keyring (the default) unlocked. */
export async function startGnomeKeyring(): Promise<GnomeKeyringHandle> {
  const bus = await startSessionBus();
  const env = { PATH: process.env.PATH, ...bus.env };
  const keyring = new Child(
    'gnome-keyring-daemon',
    spawn('gnome-keyring-daemon', ['--foreground', '--unlock', '--components=secrets'], { stdio: ['pipe', 'pipe', 'pipe'], env }),
  );
  // --unlock reads the login keyring's password from stdin until EOF (creating the keyring).
  keyring.process.stdin!.end(randomBytes(12).toString('base64url'));
  const stopKeyring = () => keyring.stop();
  const stop = async () => {
    await keyring.stop();
    await bus.stop();
  };
  try {
    await waitUntil(
      async () => {
        const collection = await rawCall<string>(bus.address, SERVICE_PATH, SERVICE_IFACE, 'ReadAlias', 's', ['default']).catch(() => '/');
        return collection !== '/' ? collection : null;
      },
      () => keyring,
      'gnome-keyring-daemon serving an unlocked default collection',
    );
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    ...bus,
    keyringPid: keyring.process.pid!,
    stop,
    stopKeyring,
    async lockDefaultCollection() {
      const collection = await rawCall<string>(bus.address, SERVICE_PATH, SERVICE_IFACE, 'ReadAlias', 's', ['default']);
      const [locked, prompt] = await rawCall<[string[], string]>(bus.address, SERVICE_PATH, SERVICE_IFACE, 'Lock', 'ao', [[collection]]);
      if (!locked.includes(collection) || prompt !== '/') throw new Error(`Service.Lock did not lock ${collection} (prompt ${prompt})`);
    },
    async countItems(attributes) {
      const [unlocked, locked] = await rawCall<[string[], string[]]>(bus.address, SERVICE_PATH, SERVICE_IFACE, 'SearchItems', 'a{ss}', [
        Object.entries(attributes),
      ]);
      return unlocked.length + locked.length;
    },
  };
}

export async function stopAllSecretServices(): Promise<void> {
  // gnome-keyring-daemon first, while its bus is still there to say goodbye to.
  const all = [...running];
  await Promise.all(all.filter((c) => c.name !== 'dbus-daemon').map((c) => c.stop()));
  await Promise.all(all.filter((c) => c.name === 'dbus-daemon').map((c) => c.stop()));
}

/** One method call to org.freedesktop.secrets on its own connection, with a deadline. */
export async function rawCall<T>(address: string, path: string, iface: string, member: string, signature: string, body: unknown[]): Promise<T> {
  const bus = dbus.createClient({ busAddress: address, authMethods: ['EXTERNAL'], plainValues: true, variants: 'plain' });
  bus.connection.on('error', () => {});
  try {
    return await bus.invoke<T>({ destination: SECRETS, path, interface: iface, member, signature, body }, { timeout: CALL_TIMEOUT_MS });
  } finally {
    bus.connection.stream.destroy();
  }
}

async function waitUntil<T>(check: () => T | null | Promise<T | null>, child: () => Child, what: string): Promise<T> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    const value = await check();
    if (value !== null) return value;
    const c = child();
    if (c.hasExited) throw new Error(`${c.name} exited before ${what}: ${c.output}`);
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${c.output}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
