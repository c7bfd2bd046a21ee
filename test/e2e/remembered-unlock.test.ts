// End-to-end: `keyhold unlock --remember D` through the kernel's user keyring, inspected with the
// real `keyctl` (Debian's keyutils). A daemon killed with -9 and started again within D comes back
// unlocked with no factor; after D it starts locked; lock, the idle lock and `keyhold stop` take
// the key out of @u, a SIGTERM does not; a planted key that does not open the vault is removed.
// Each test has a vault of its own (its own id, so its own key name) and removes its keys after.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, readFileSync } from 'node:fs';
import {
  daemonPid,
  initVault,
  keyhold,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  processAlive,
  startServe,
  stopAllServes,
  stopBackgroundDaemon,
  waitFor,
  type KeyholdEnv,
} from '../helpers/keyhold.js';

interface Vault {
  k: KeyholdEnv;
  /** The same vault with no factor source at all in the environment. */
  bare: KeyholdEnv;
  description: string;
}

const vaults: Vault[] = [];
const children: ChildProcess[] = [];
/** Serials seen, so that cleanup can unlink even an expired key (which no search finds). */
const serials = new Set<string>();

function keyctl(args: string[], input?: string | Buffer): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('keyctl', args, { encoding: 'utf8', timeout: 10_000, ...(input === undefined ? {} : { input }) });
  return { status: r.status, stdout: r.stdout.trim(), stderr: r.stderr };
}

/** The serial of the vault's key in @u, or null. */
function findKey(v: Vault): string | null {
  const r = keyctl(['search', '@u', 'user', v.description]);
  if (r.status !== 0) return null;
  serials.add(r.stdout);
  return r.stdout;
}

/** Whether `keyctl show @u` lists the vault's key. */
const listed = (v: Vault) => keyctl(['show', '@u']).stdout.includes(v.description);

function forgetKeys(v: Vault): void {
  for (let i = 0; i < 5; i++) {
    const serial = findKey(v);
    if (serial === null) break;
    keyctl(['invalidate', serial]);
  }
}

afterEach(async () => {
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
  await stopAllServes();
  const done = vaults.splice(0);
  for (const v of done) await stopBackgroundDaemon(v.k.runtime);
  for (const v of done) forgetKeys(v);
  for (const serial of serials) keyctl(['unlink', serial, '@u']);
  serials.clear();
  for (const v of done) v.k.cleanup();
});

function freshVault(): Vault {
  const k = makeKeyholdEnv('keyhold-remember-');
  initVault(k);
  const env = { ...k.env };
  for (const name of ['KEYHOLD_PASSPHRASE_FILE', 'KEYHOLD_PASSPHRASE', 'CREDENTIALS_DIRECTORY', 'SSH_AUTH_SOCK']) delete env[name];
  const vaultId = (JSON.parse(readFileSync(`${k.vault}.keys`, 'utf8')) as { vault_id: string }).vault_id;
  const v = { k, bare: { ...k, env }, description: `keyhold:${vaultId}` };
  vaults.push(v);
  return v;
}

interface StatusJson {
  running: boolean;
  locked: boolean;
  pid?: number;
  remembered_until?: string | null;
}

function status(k: KeyholdEnv): { code: number | null; json: StatusJson } {
  const r = keyhold(k, ['status', '--json']);
  return { code: r.status, json: JSON.parse(r.stdout) as StatusJson };
}

async function kill9Daemon(v: Vault): Promise<void> {
  const pid = daemonPid(v.k.runtime);
  expect(pid).not.toBeNull();
  process.kill(pid!, 'SIGKILL');
  await waitFor(() => !processAlive(pid!), 5000, 'the killed daemon to be gone');
}

/**
 * `keyhold serve --locked` in a session keyring of its own (`keyctl session -` execs it): the
 * user keyring is not possessed there, as under systemd's KeyringMode=private.
 */
async function serveInFreshSession(v: Vault, expectRemembered = true): Promise<ChildProcess> {
  const child = spawn('keyctl', ['session', '-', process.execPath, KEYHOLD_BIN, 'serve', '--locked'], { env: v.bare.env, stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  await waitFor(() => stderr.includes('keyhold daemon ready') || child.exitCode !== null, 15_000, 'keyhold serve in a fresh session');
  expect(child.exitCode, stderr).toBeNull();
  if (expectRemembered) expect(stderr).toContain('unlocked from the remembered unlock');
  return child;
}

/** The payload the daemon stores: magic, remembered until, lock deadline, idle limit (ms), master key. */
function wellFormedPayload(masterKey: Buffer): Buffer {
  const payload = Buffer.alloc(60);
  payload.write('khr1', 0);
  payload.writeBigUInt64BE(BigInt(Date.now() + 60_000), 4);
  masterKey.copy(payload, 28);
  return payload;
}

describe('remembered unlock through the kernel keyring', () => {
  it('unlock --remember 5s, kill -9, restart: unlocked with no factor; after the 5 s: locked', async () => {
    const v = freshVault();
    const unlocked = keyhold(v.k, ['unlock', '--remember', '5s']);
    expect(unlocked.status, unlocked.stderr).toBe(0);
    expect(unlocked.stderr).toContain('a restarted daemon comes back unlocked until');
    const until = Date.parse(status(v.k).json.remembered_until!);
    expect(until - Date.now()).toBeGreaterThan(2_000);
    expect(until - Date.now()).toBeLessThanOrEqual(5_000);
    expect(findKey(v)).not.toBeNull();

    // The CLI finds the key, starts the daemon and asks no factor (none is in its environment).
    await kill9Daemon(v);
    const again = keyhold(v.bare, ['unlock']);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stderr).toContain('unlocked from the remembered unlock');
    expect(status(v.bare).code).toBe(0);
    const audit = readFileSync(`${v.k.vault}.audit.jsonl`, 'utf8').split('\n').filter(Boolean).map((line) => JSON.parse(line) as { event: string; names?: string[] });
    expect(audit.filter((e) => e.event === 'unlock').map((e) => e.names)).toEqual([[expect.stringMatching(/^pp-/)], ['remembered']]);

    // Past the window, the kernel has expired the key: a restart starts locked.
    await kill9Daemon(v);
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, until - Date.now() + 300)));
    expect(findKey(v)).toBeNull();
    const serve = await startServe(v.bare, ['--locked']);
    expect(status(v.bare)).toMatchObject({ code: 3, json: { locked: true } });
    expect(serve.stderr()).toContain('the remembered unlock has expired');
  });

  it('the key is possessor/user only; a daemon in a fresh session keyring reads it; lock takes it out of @u', async () => {
    const v = freshVault();
    keyholdOk(v.k, ['unlock', '--remember', '1m']);
    const serial = findKey(v);
    expect(serial).not.toBeNull();
    const [type, uid, , perm, description] = keyctl(['rdescribe', serial!]).stdout.split(';');
    expect({ type, uid: Number(uid), description }).toEqual({ type: 'user', uid: process.getuid!(), description: v.description });
    const permissions = parseInt(perm!, 16);
    expect(permissions & 0xffff).toBe(0); // group, other: nothing
    expect((permissions >>> 24) & 0x3f).toBe(0x3f); // possessor: all
    expect((permissions >>> 16) & (0x04 | 0x10)).toBe(0); // user: no write, no link

    await kill9Daemon(v);
    await serveInFreshSession(v);
    expect(status(v.bare).code).toBe(0);

    const locked = keyhold(v.bare, ['lock']);
    expect(locked.status, locked.stderr).toBe(0);
    expect(listed(v)).toBe(false);
    expect(findKey(v)).toBeNull();
  });

  it('a daemon in a session keyring of its own (as under the shipped units) stores the key too, not only reads it', async () => {
    const v = freshVault();
    const first = await serveInFreshSession(v, false);
    const unlocked = keyhold(v.k, ['unlock', '--remember', '1m']);
    expect(unlocked.status, unlocked.stderr).toBe(0);
    const serial = findKey(v);
    expect(serial).not.toBeNull();
    const permissions = parseInt(keyctl(['rdescribe', serial!]).stdout.split(';')[3]!, 16);
    expect(permissions & 0xffff).toBe(0);
    first.kill('SIGKILL');
    await waitFor(() => first.exitCode !== null || first.signalCode !== null, 5000, 'the killed daemon to be gone');
    await serveInFreshSession(v);
    expect(status(v.bare).code).toBe(0);
    expect(keyhold(v.bare, ['lock']).status).toBe(0);
    expect(findKey(v)).toBeNull();
  });

  it('a SIGTERM keeps the key (systemd restarts come back unlocked); `keyhold stop` takes it out', async () => {
    const v = freshVault();
    keyholdOk(v.k, ['unlock', '--remember', '1m']);
    await stopBackgroundDaemon(v.k.runtime); // SIGTERM
    expect(listed(v)).toBe(true);
    expect(keyhold(v.bare, ['unlock']).status).toBe(0);
    expect(status(v.bare).code).toBe(0);
    const stopped = keyhold(v.bare, ['stop']);
    expect(stopped.status, stopped.stderr).toBe(0);
    expect(listed(v)).toBe(false);
    expect(findKey(v)).toBeNull();
  });

  it('after a crash, `keyhold lock` or `keyhold stop` with no daemon running still takes the key out', async () => {
    for (const command of ['lock', 'stop']) {
      const v = freshVault();
      keyholdOk(v.k, ['unlock', '--remember', '1m']);
      await kill9Daemon(v);
      expect(listed(v)).toBe(true);
      const revoked = keyhold(v.bare, [command]);
      expect(revoked.status, `${command}: ${revoked.stderr}`).toBe(0);
      expect(revoked.stderr).toContain('removed its remembered unlock');
      expect(findKey(v)).toBeNull();
      // Nothing left to revoke: as before, no daemon is exit 3.
      expect(keyhold(v.bare, [command]).status).toBe(3);
      // And a start comes back locked.
      await startServe(v.bare, ['--locked']);
      expect(status(v.bare).code).toBe(3);
      await stopAllServes();
    }
  });

  it('a restart that cannot open the vault for a reason other than the key (a vault file open to others) starts locked and keeps the key', async () => {
    const v = freshVault();
    keyholdOk(v.k, ['unlock', '--remember', '1m']);
    await kill9Daemon(v);
    chmodSync(v.k.vault, 0o644);
    const refused = await startServe(v.bare, ['--locked']);
    expect(status(v.bare).code).toBe(3);
    expect(refused.stderr()).toContain('the remembered unlock is kept');
    expect(findKey(v)).not.toBeNull();
    await stopAllServes();
    chmodSync(v.k.vault, 0o600);
    await startServe(v.bare, ['--locked']);
    expect(status(v.bare).code).toBe(0);
    keyholdOk(v.bare, ['lock']);
  });

  it('status stops promising a remembered unlock once the kernel key is gone (taken out by another process)', async () => {
    const v = freshVault();
    keyholdOk(v.k, ['unlock', '--remember', '1m']);
    expect(status(v.bare).json.remembered_until).toEqual(expect.any(String));
    expect(keyctl(['invalidate', findKey(v)!]).status).toBe(0);
    expect(status(v.bare).json).toMatchObject({ locked: false, remembered_until: null });
  });

  it('the idle lock takes the key out too, or a restart would undo it', async () => {
    const v = freshVault();
    // 3 s: the listing below must come before the idle lock, on a loaded machine too.
    keyholdOk(v.k, ['unlock', '--remember', '1m', '--idle', '3s']);
    expect(listed(v)).toBe(true);
    await waitFor(() => status(v.bare).code === 3, 10_000, 'the idle lock');
    expect(listed(v)).toBe(false);
  });

  it('a planted key that does not open the vault (garbage, another master key) is removed; the daemon starts locked with a warning', async () => {
    const v = freshVault();
    for (const payload of [Buffer.from('garbage'), wellFormedPayload(randomBytes(32))]) {
      const planted = keyctl(['padd', 'user', v.description, '@u'], payload);
      expect(planted.status, planted.stderr).toBe(0);
      serials.add(planted.stdout);
      const serve = await startServe(v.bare, ['--locked']);
      expect(status(v.bare)).toMatchObject({ code: 3, json: { locked: true } });
      expect(serve.stderr()).toMatch(/"level":40.*the remembered unlock in the kernel keyring (cannot be used|does not open this vault): removed; starting locked/);
      expect(listed(v)).toBe(false);
      await serve.stop();
    }
  });

  it('--remember takes a duration; a bad one is a usage error and changes nothing', () => {
    const v = freshVault();
    const r = keyhold(v.k, ['unlock', '--remember', '5x']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^keyhold: invalid --remember "5x"/);
    expect(daemonPid(v.k.runtime)).toBeNull();
    expect(findKey(v)).toBeNull();
  });
});
