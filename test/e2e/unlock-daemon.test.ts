// End-to-end: the unlock daemon's lifecycle with the passphrase factor — `keyhold unlock` starting a
// background daemon, lock/status exit codes, locked scope sockets, the CLI working through an
// unlocked daemon with no passphrase source, idle and absolute lock timers, serve's start-up
// sources (file, systemd credential, none), another vault's daemon, passphrase change, factor rm.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import {
  daemonPid,
  frameBytes,
  initVault,
  keyhold,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  processAlive,
  RawAgentClient,
  serveExpectingExit,
  startServe,
  stopAllServes,
  stopBackgroundDaemon,
  waitFor,
  type KeyholdEnv,
} from '../helpers/keyhold.js';

const envs: KeyholdEnv[] = [];
const clients: RawAgentClient[] = [];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const pidFile = (k: KeyholdEnv) => join(k.runtime, 'daemon.pid');
const killDaemon = (k: KeyholdEnv) => stopBackgroundDaemon(k.runtime);

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await stopAllServes();
  const done = envs.splice(0);
  for (const k of done) await killDaemon(k);
  for (const k of done) k.cleanup();
});

// One vault (passphrase factor, one ed25519 key in scope web, comment web-key) made once and copied
// into each test's own directory: creating it per test would cost a second of CLI runs each time.
let template: KeyholdEnv;

beforeAll(() => {
  template = makeKeyholdEnv('keyhold-unlock-template-');
  initVault(template);
  keyholdOk(template, ['key', 'generate', 'web', '--comment', 'web-key']);
});

afterAll(() => template?.cleanup());

/** A private copy of the template vault, with its own runtime dir and passphrase file. */
function freshVault(): KeyholdEnv {
  const k = makeKeyholdEnv('keyhold-unlock-');
  envs.push(k);
  const from = dirname(template.vault);
  mkdirSync(dirname(k.vault), { recursive: true, mode: 0o700 });
  for (const name of readdirSync(from)) copyFileSync(join(from, name), join(dirname(k.vault), name));
  writeFileSync(k.passFile, template.passphrase + '\n', { mode: 0o600 });
  return { ...k, passphrase: template.passphrase };
}

/** The same vault and runtime dir with no passphrase source at all in the environment. */
function bare(k: KeyholdEnv): KeyholdEnv {
  const env = { ...k.env };
  delete env.KEYHOLD_PASSPHRASE_FILE;
  delete env.KEYHOLD_PASSPHRASE;
  delete env.CREDENTIALS_DIRECTORY;
  delete env.SSH_AUTH_SOCK;
  return { ...k, env };
}

interface KeyRow {
  fingerprint: string;
  comment: string;
  scopes: string[];
}

function keyList(k: KeyholdEnv): KeyRow[] {
  return JSON.parse(keyholdOk(k, ['key', 'list', '--json'])) as KeyRow[];
}

interface StatusJson {
  running: boolean;
  locked: boolean;
  pid?: number;
  vault?: string;
  lock_at?: string | null;
  idle_ms?: number | null;
  sockets?: string[];
}

function statusJson(k: KeyholdEnv): { code: number | null; json: StatusJson } {
  const r = keyhold(k, ['status', '--json']);
  return { code: r.status, json: JSON.parse(r.stdout) as StatusJson };
}

const statusCode = (k: KeyholdEnv) => keyhold(k, ['status', '--quiet']).status;
const scopeSock = (k: KeyholdEnv, scope: string) => join(k.runtime, 'scopes', `${scope}.sock`);

/** sha256 of every file in the vault's directory, by name. */
function hashVaultDir(k: KeyholdEnv): Record<string, string> {
  const dir = dirname(k.vault);
  const out: Record<string, string> = {};
  for (const name of readdirSync(dir).sort()) out[name] = createHash('sha256').update(readFileSync(join(dir, name))).digest('hex');
  return out;
}

function sshAdd(sock: string, args: string[] = ['-l']): { status: number | null; stdout: string; stderr: string } {
  const env = { ...process.env, SSH_AUTH_SOCK: sock };
  const r = spawnSync('ssh-add', args, { env, encoding: 'utf8', timeout: 10_000, input: '' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function str(buf: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(buf.length);
  return Buffer.concat([len, buf]);
}

/** REQUEST_IDENTITIES on a fresh connection: the reply type and the key blobs. */
async function identities(path: string): Promise<{ type: number; blobs: Buffer[]; comments: string[] }> {
  const c = await RawAgentClient.connect(path);
  clients.push(c);
  c.send(frameBytes(Buffer.of(11)));
  const reply = await c.reply();
  c.close();
  const blobs: Buffer[] = [];
  const comments: string[] = [];
  if (reply[0] === 12) {
    let off = 5;
    for (let i = 0; i < reply.readUInt32BE(1); i++) {
      const blen = reply.readUInt32BE(off);
      blobs.push(Buffer.from(reply.subarray(off + 4, off + 4 + blen)));
      off += 4 + blen;
      const clen = reply.readUInt32BE(off);
      comments.push(reply.subarray(off + 4, off + 4 + clen).toString());
      off += 4 + clen;
    }
    expect(reply.readUInt32BE(1)).toBe(blobs.length);
  }
  return { type: reply[0]!, blobs, comments };
}

async function signType(path: string, blob: Buffer): Promise<number> {
  const c = await RawAgentClient.connect(path);
  clients.push(c);
  c.send(frameBytes(Buffer.concat([Buffer.of(13), str(blob), str(Buffer.from('data to sign')), Buffer.alloc(4)])));
  const reply = await c.reply();
  c.close();
  return reply[0]!;
}

const mode = (path: string) => lstatSync(path).mode & 0o777;

describe('unlock starts the daemon', () => {
  it('unlock with no daemon starts one in the background, returns once unlocked; pid file and 0600 control socket', () => {
    const k = freshVault();
    expect(statusCode(k)).toBe(3);
    const r = keyhold(k, ['unlock']);
    expect(r.status, r.stderr).toBe(0);
    // Unlocked by the time unlock returned: no waiting.
    expect(statusCode(k)).toBe(0);
    const pid = daemonPid(k.runtime);
    expect(pid).not.toBeNull();
    expect(processAlive(pid!)).toBe(true);
    expect(statusJson(k).json.pid).toBe(pid);
    const control = join(k.runtime, 'control.sock');
    expect(lstatSync(control).isSocket()).toBe(true);
    expect(mode(control)).toBe(0o600);
    expect(existsSync(join(k.runtime, 'daemon.log'))).toBe(true);
  });

  it('eval "$(keyhold unlock --scope web)" sets SSH_AUTH_SOCK for ssh-add in the same shell; a second unlock needs no secret', () => {
    const k = freshVault();
    keyholdOk(k, ['key', 'generate', 'api', '--comment', 'api-key']);
    const [webKey] = keyList(k).filter((key) => key.scopes.includes('web'));
    const kh = `'${process.execPath}' '${KEYHOLD_BIN}'`;
    const script = `set -e; eval "$(${kh} unlock --scope web)"; echo "SOCK=$SSH_AUTH_SOCK"; ssh-add -l`;
    const env = { ...k.env };
    delete env.SSH_AUTH_SOCK;
    const r = spawnSync('sh', ['-c', script], { env, encoding: 'utf8', timeout: 30_000, input: '' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(`SOCK=${scopeSock(k, 'web')}\n`);
    const listed = r.stdout.split('\n').filter((l) => l.includes('SHA256:'));
    expect(listed).toHaveLength(1);
    expect(listed[0]).toContain(webKey!.fingerprint);
    expect(listed[0]).toContain('web-key');

    // Already unlocked: no passphrase source, stdin not a TTY, still 0 (and the export line again).
    const again = keyhold(bare(k), ['unlock', '--scope', 'web']);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stdout.trim()).toBe(`export SSH_AUTH_SOCK=${scopeSock(k, 'web')}`);
    expect(keyhold(bare(k), ['unlock']).status).toBe(0);
  });
});

describe('exit codes of status, lock and unlock', () => {
  it('status with no daemon exits 3; --quiet prints nothing; --json says running:false', () => {
    const k = freshVault();
    const plain = keyhold(k, ['status']);
    expect(plain.status).toBe(3);
    const quiet = keyhold(k, ['status', '--quiet']);
    expect(quiet.status).toBe(3);
    expect(quiet.stdout).toBe('');
    expect(quiet.stderr).toBe('');
    const { code, json } = statusJson(k);
    expect(code).toBe(3);
    expect(json.running).toBe(false);
    expect(existsSync(pidFile(k))).toBe(false); // status never starts a daemon
  });

  it('status 0 when unlocked; lock 0 then status 3; lock with no daemon 3', async () => {
    const k = freshVault();
    expect(keyhold(k, ['lock']).status).toBe(3);
    keyholdOk(k, ['unlock']);
    const unlocked = statusJson(k);
    expect(unlocked.code).toBe(0);
    expect(unlocked.json).toMatchObject({ running: true, locked: false, vault: k.vault });
    const lock = keyhold(k, ['lock']);
    expect(lock.status, lock.stderr).toBe(0);
    const locked = statusJson(k);
    expect(locked.code).toBe(3);
    expect(locked.json).toMatchObject({ running: true, locked: true });
    // Locking again while locked is fine; stopping the daemon makes lock exit 3.
    expect(keyhold(k, ['lock']).status).toBe(0);
    await killDaemon(k);
    expect(keyhold(k, ['lock']).status).toBe(3);
  });

  it('unlock with a wrong passphrase exits 4, changes no file in the vault dir, and leaves the daemon locked', () => {
    const k = freshVault();
    const before = hashVaultDir(k);
    expect(Object.keys(before)).toEqual(expect.arrayContaining(['vault.db', 'vault.db.keys']));
    const wrong = join(k.dir, 'wrong-pass');
    writeFileSync(wrong, 'not the passphrase\n', { mode: 0o600 });
    const r = keyhold(k, ['unlock'], { env: { KEYHOLD_PASSPHRASE_FILE: wrong } });
    expect(r.status, r.stderr).toBe(4);
    expect(r.stderr).toMatch(/^keyhold: /m);
    expect(r.stderr).not.toContain('not the passphrase');
    expect(hashVaultDir(k)).toEqual(before);
    const { code, json } = statusJson(k);
    expect(code).toBe(3);
    expect(json).toMatchObject({ running: true, locked: true });
    // --passphrase-file wins over the (right) env file, and is wrong too.
    expect(keyhold(k, ['unlock', '--passphrase-file', wrong]).status).toBe(4);
    expect(hashVaultDir(k)).toEqual(before);
  });

  it('unlock with no passphrase source at all exits 3 naming --passphrase-file', () => {
    const k = freshVault();
    const r = keyhold(bare(k), ['unlock']);
    expect(r.status).toBe(3);
    expect(r.stderr).toContain('--passphrase-file');
    expect(r.stderr).toMatch(/^keyhold: .+ \(.+\)$/m);
    expect(r.stderr).not.toMatch(/^\s+at /m);
    expect(statusCode(k)).toBe(3);
  });
});

describe('a locked daemon keeps its scope sockets', () => {
  it('after lock: empty identities, sign refused (5), ssh-add sees no identities; after unlock the key is back on the same path', async () => {
    const k = freshVault();
    keyholdOk(k, ['unlock']);
    const sock = scopeSock(k, 'web');
    const open = await identities(sock);
    expect(open.type).toBe(12);
    expect(open.comments).toEqual(['web-key']);
    const blob = open.blobs[0]!;
    expect(await signType(sock, blob)).toBe(14);

    keyholdOk(k, ['lock']);
    expect(lstatSync(sock).isSocket()).toBe(true);
    const locked = await identities(sock);
    expect(locked.type).toBe(12);
    expect(locked.blobs).toHaveLength(0);
    expect(await signType(sock, blob)).toBe(5);
    const add = sshAdd(sock);
    expect(add.status).toBe(1);
    expect(add.stdout + add.stderr).toMatch(/no identities/i);

    keyholdOk(k, ['unlock']);
    const again = await identities(sock);
    expect(again.type).toBe(12);
    expect(again.comments).toEqual(['web-key']);
    expect(again.blobs[0]!.equals(blob)).toBe(true);
    expect(await signType(sock, blob)).toBe(14);
    expect(sshAdd(sock).status).toBe(0);
  });
});

describe('the CLI through an unlocked daemon, with no passphrase source', () => {
  // Arguments left out on the command line (key generate's --type/--bits, key list's and token
  // list's --scope) must reach the daemon as "not given", exactly as they do in a local open.
  it('key generate (default ed25519, no --bits), key list and token list with no --scope work through the daemon', () => {
    const k = freshVault();
    keyholdOk(k, ['unlock']);
    const b = bare(k);
    const gen = keyhold(b, ['key', 'generate', 'web2', '--comment', 'web2-key']);
    expect.soft(gen.status, `key generate web2: ${gen.stderr}`).toBe(0);
    expect.soft(gen.stdout).toMatch(/^ssh-ed25519 \S+ web2-key$/m);
    const list = keyhold(b, ['key', 'list', '--json']);
    expect.soft(list.status, `key list: ${list.stderr}`).toBe(0);
    if (list.status === 0) expect.soft((JSON.parse(list.stdout) as KeyRow[]).map((key) => key.comment)).toContain('web-key');
    const tokens = keyhold(b, ['token', 'list', '--json']);
    expect.soft(tokens.status, `token list: ${tokens.stderr}`).toBe(0);
    if (tokens.status === 0) expect.soft(JSON.parse(tokens.stdout)).toEqual([]);
  });

  it('key generate, key list, token issue, token list, scope list all work and see each other; locked → 3', async () => {
    const k = freshVault();
    keyholdOk(k, ['unlock']);
    const b = bare(k);

    // Explicit --type and --scope here: the defaults through the daemon are the test above.
    const gen = keyhold(b, ['key', 'generate', 'web2', '--type', 'ecdsa', '--comment', 'web2-key']);
    expect(gen.status, gen.stderr).toBe(0);
    expect(gen.stdout).toMatch(/^ecdsa-sha2-nistp256 \S+/);

    for (const [scope, comment] of [
      ['web2', 'web2-key'],
      ['web', 'web-key'],
    ] as const) {
      const list = keyhold(b, ['key', 'list', '--scope', scope, '--json']);
      expect(list.status, list.stderr).toBe(0);
      const keys = JSON.parse(list.stdout) as KeyRow[];
      expect(keys.map((key) => key.comment)).toEqual([comment]);
      expect(keys[0]!.scopes).toEqual([scope]);
    }

    const issue = keyhold(b, ['token', 'issue', 'web', '--subject', 'ci-1', '--json']);
    expect(issue.status, issue.stderr).toBe(0);
    const token = JSON.parse(issue.stdout) as { id: string; token: string; scope: string };
    expect(token.token).toMatch(/^khp_[A-Za-z0-9_-]{43}$/);
    expect(token.scope).toBe('web');

    const tokens = keyhold(b, ['token', 'list', '--scope', 'web', '--json']);
    expect(tokens.status, tokens.stderr).toBe(0);
    const tokenRows = JSON.parse(tokens.stdout) as { id: string; scope: string; subject: string }[];
    expect(tokenRows.map((t) => t.id)).toEqual([token.id]);
    expect(tokens.stdout).not.toContain(token.token);

    const scopes = keyhold(b, ['scope', 'list', '--json']);
    expect(scopes.status, scopes.stderr).toBe(0);
    const scopeNames = (JSON.parse(scopes.stdout) as { scope?: string; name?: string }[]).map((s) => s.scope ?? s.name);
    expect(scopeNames.sort()).toEqual(['web', 'web2']);
    expect(scopes.stdout).toMatch(/"web2"/);

    // The same changes are visible to a local open of the vault (with the passphrase).
    expect(keyList(k).map((key) => key.comment).sort()).toEqual(['web-key', 'web2-key']);

    // The new scope's socket is opened by the daemon.
    await waitFor(() => (statusJson(k).json.sockets ?? []).includes(scopeSock(k, 'web2')), 5000, 'web2 socket in status');
    expect(lstatSync(scopeSock(k, 'web2')).isSocket()).toBe(true);
    expect((await identities(scopeSock(k, 'web2'))).comments).toEqual(['web2-key']);

    keyholdOk(k, ['lock']);
    for (const args of [
      ['key', 'generate', 'web3'],
      ['key', 'list', '--json'],
      ['token', 'issue', 'web'],
      ['token', 'list'],
      ['scope', 'list'],
    ]) {
      const r = keyhold(b, args);
      expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(3);
    }
    expect(keyList(k).map((key) => key.comment).sort()).toEqual(['web-key', 'web2-key']);
  });
});

// The timer tests drive two daemons at once, so their commands run asynchronously: a blocking
// spawnSync for one daemon would stretch the gaps between the other's requests.
function runAsync(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    proc.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => proc.kill('SIGKILL'), 20_000);
    proc.once('error', reject);
    proc.once('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

const sshAddAsync = (k: KeyholdEnv) => runAsync('ssh-add', ['-l'], { ...process.env, SSH_AUTH_SOCK: scopeSock(k, 'web') });

async function statusAsync(k: KeyholdEnv): Promise<{ code: number | null; json: StatusJson }> {
  const r = await runAsync(process.execPath, [KEYHOLD_BIN, 'status', '--json'], k.env);
  return { code: r.status, json: JSON.parse(r.stdout) as StatusJson };
}

/** Polls status until it exits 3; returns when, or throws after timeoutMs. */
async function waitLocked(k: KeyholdEnv, timeoutMs: number, label: string, activity = false): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (activity) await sshAddAsync(k);
    if ((await statusAsync(k)).code === 3) return Date.now();
    if (Date.now() > deadline) throw new Error(`${label}: still unlocked after ${timeoutMs} ms`);
    await sleep(activity ? 400 : 100);
  }
}

/**
 * Idle lock 2 s: requests every 0.5 s for 3 s (longer than the idle limit) keep it unlocked;
 * then, with no requests, it locks on its own within ~2–5 s (8 s allowed).
 */
async function idleScenario(k: KeyholdEnv, label: string): Promise<void> {
  await sshAddAsync(k);
  await sleep(500);
  const early = await statusAsync(k);
  expect(early.code, `${label}: locked after 0.5 s`).toBe(0);
  expect(early.json.idle_ms, label).toBe(2000);
  const end = Date.now() + 3000;
  while (Date.now() < end) {
    const add = await sshAddAsync(k);
    expect(add.status, `${label}: ssh-add -l while it should be unlocked: ${add.stdout}${add.stderr}`).toBe(0);
    await sleep(500);
  }
  await sshAddAsync(k);
  const lastActivity = Date.now();
  expect((await statusAsync(k)).code, `${label}: locked despite activity`).toBe(0);
  const lockedAt = await waitLocked(k, 8000, `${label} (no requests)`);
  expect(lockedAt - lastActivity, `${label}: locked too soon after the last request`).toBeGreaterThanOrEqual(1000);
  expect((await sshAddAsync(k)).status, `${label}: ssh-add -l once locked`).toBe(1);
}

/** Absolute lock 3 s: requests every ~0.5 s do not keep it open; it locks by ~3–7 s (9 s allowed). */
async function ttlScenario(k: KeyholdEnv, unlockedAt: number, label: string): Promise<void> {
  const first = await statusAsync(k);
  expect(first.code, label).toBe(0);
  expect(first.json.lock_at, label).toEqual(expect.any(String));
  const lockedAt = await waitLocked(k, 9000 - (Date.now() - unlockedAt), label, true);
  expect(lockedAt - unlockedAt, `${label}: locked too early`).toBeGreaterThanOrEqual(2000);
}

async function allPass(scenarios: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(scenarios);
  const failures = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => String(r.reason));
  expect(failures).toEqual([]);
}

describe('lock timers', () => {
  // Each vault's clock starts with its own unlock or start: a's unlock (a daemon from cold, a
  // second or more on a loaded machine) must not eat into b's 2 s, so each runs on its own.
  it('unlock --idle 2s and serve --idle-lock 2s: activity keeps the vault open, inactivity locks it', async () => {
    const a = freshVault();
    const b = freshVault();
    await allPass([
      (async () => {
        const unlock = await runAsync(process.execPath, [KEYHOLD_BIN, 'unlock', '--idle', '2s'], a.env);
        expect(unlock.status, unlock.stderr).toBe(0);
        await idleScenario(a, 'unlock --idle 2s');
      })(),
      (async () => {
        await startServe(b, ['--idle-lock', '2s']);
        await idleScenario(b, 'serve --idle-lock 2s');
      })(),
    ]);
  });

  it('unlock --ttl 3s and serve --lock-after 3s lock despite continuous activity', async () => {
    const a = freshVault();
    const b = freshVault();
    await allPass([
      (async () => {
        // Taken before the unlock: "locked too early" stays a sound bound.
        const aUnlocked = Date.now();
        const unlock = await runAsync(process.execPath, [KEYHOLD_BIN, 'unlock', '--ttl', '3s'], a.env);
        expect(unlock.status, unlock.stderr).toBe(0);
        await ttlScenario(a, aUnlocked, 'unlock --ttl 3s');
      })(),
      (async () => {
        const bStart = Date.now();
        await startServe(b, ['--lock-after', '3s']);
        await ttlScenario(b, bStart, 'serve --lock-after 3s');
      })(),
    ]);
    // After a timed lock, unlock again works.
    keyholdOk(a, ['unlock']);
    expect(statusCode(a)).toBe(0);
  });

  it('unlock --ttl while already unlocked notes it on stderr and leaves lock_at unchanged', () => {
    const k = freshVault();
    keyholdOk(k, ['unlock', '--ttl', '1h']);
    const first = statusJson(k).json.lock_at;
    expect(first).toEqual(expect.any(String));
    expect(Date.parse(first!) - Date.now()).toBeGreaterThan(50 * 60_000);
    const again = keyhold(k, ['unlock', '--ttl', '3s']);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stderr).toMatch(/already unlocked/);
    expect(statusJson(k).json.lock_at).toBe(first);
  });
});

describe('serve at start', () => {
  it('serve --locked starts locked even with a passphrase file', async () => {
    const k = freshVault();
    const serve = await startServe(k, ['--locked']);
    const { code, json } = statusJson(k);
    expect(code).toBe(3);
    expect(json).toMatchObject({ running: true, locked: true, pid: serve.proc.pid });
    keyholdOk(k, ['unlock']);
    expect(statusCode(k)).toBe(0);
  });

  it('serve with no passphrase source starts locked; keyhold unlock then unlocks that daemon', async () => {
    const k = freshVault();
    const serve = await startServe(bare(k));
    expect(serve.proc.exitCode).toBeNull();
    const { code, json } = statusJson(k);
    expect(code).toBe(3);
    expect(json).toMatchObject({ running: true, locked: true, pid: serve.proc.pid });
    const r = keyhold(k, ['unlock']);
    expect(r.status, r.stderr).toBe(0);
    expect(statusJson(k).json).toMatchObject({ locked: false, pid: serve.proc.pid });
    expect((await identities(scopeSock(k, 'web'))).comments).toEqual(['web-key']);
  });

  it('serve with a wrong passphrase file exits 4', async () => {
    const k = freshVault();
    const wrong = join(k.dir, 'wrong-pass');
    writeFileSync(wrong, 'nope-nope\n', { mode: 0o600 });
    const { code, stderr } = await serveExpectingExit({ ...k, env: { ...k.env, KEYHOLD_PASSPHRASE_FILE: wrong } });
    expect(code, stderr).toBe(4);
    expect(stderr).not.toContain('nope-nope');
    expect(statusCode(k)).toBe(3);
    expect(existsSync(join(k.runtime, 'control.sock'))).toBe(false);
  });

  it('a systemd credential unlocks serve at start, and key list with no daemon', async () => {
    const k = freshVault();
    const creds = join(k.dir, 'credentials');
    mkdirSync(creds, { mode: 0o700 });
    writeFileSync(join(creds, 'keyhold-passphrase'), k.passphrase, { mode: 0o600 });
    const withCred: KeyholdEnv = { ...bare(k), env: { ...bare(k).env, CREDENTIALS_DIRECTORY: creds } };

    // No daemon: key list opens the vault with the credential.
    const list = keyhold(withCred, ['key', 'list', '--json']);
    expect(list.status, list.stderr).toBe(0);
    expect((JSON.parse(list.stdout) as KeyRow[]).map((key) => key.comment)).toEqual(['web-key']);
    expect(existsSync(pidFile(k))).toBe(false);
    // Without it, the same command has no source.
    expect(keyhold(bare(k), ['key', 'list']).status).toBe(3);

    const serve = await startServe(withCred);
    const { code, json } = statusJson(k);
    expect(code).toBe(0);
    expect(json).toMatchObject({ locked: false, pid: serve.proc.pid });
    expect((await identities(scopeSock(k, 'web'))).comments).toEqual(['web-key']);

    // A wrong credential is a wrong passphrase: exit 4.
    const badCreds = join(k.dir, 'bad-credentials');
    mkdirSync(badCreds, { mode: 0o700 });
    writeFileSync(join(badCreds, 'keyhold-passphrase'), 'wrong-credential', { mode: 0o600 });
    await serve.stop();
    const bad = keyhold({ ...bare(k), env: { ...bare(k).env, CREDENTIALS_DIRECTORY: badCreds } }, ['key', 'list']);
    expect(bad.status).toBe(4);
  });

  it('serve while a background daemon (from unlock) runs exits 1 naming its pid', async () => {
    const k = freshVault();
    keyholdOk(k, ['unlock']);
    const pid = daemonPid(k.runtime)!;
    const { code, stderr } = await serveExpectingExit(k);
    expect(code).toBe(1);
    expect(stderr).toContain(`pid ${pid}`);
    expect(daemonPid(k.runtime)).toBe(pid);
    expect(statusCode(k)).toBe(0);
  });
});

describe('another vault, passphrase change, factor rm', () => {
  it('a daemon for vault A: status for vault B exits 3 naming the other vault; unlock for B exits 1', () => {
    const a = freshVault();
    keyholdOk(a, ['unlock']);
    const vaultB = join(a.dir, 'other', 'vault.db');
    keyholdOk(a, ['--vault', vaultB, 'init']);

    const status = keyhold(a, ['--vault', vaultB, 'status']);
    expect(status.status).toBe(3);
    expect(status.stderr).toContain(a.vault);
    expect(status.stderr).toMatch(/another vault/);
    expect(keyhold(a, ['--vault', vaultB, 'status', '--quiet']).status).toBe(3);

    const unlock = keyhold(a, ['--vault', vaultB, 'unlock']);
    expect(unlock.status).toBe(1);
    expect(unlock.stderr).toContain(a.vault);
    expect(unlock.stderr).not.toMatch(/^\s+at /m);
    // A's daemon is untouched.
    expect(statusJson(a).json).toMatchObject({ locked: false, vault: a.vault });
  });

  it('passphrase change through the unlocked daemon, with no passphrase source', () => {
    const k = freshVault();
    keyholdOk(k, ['unlock']);
    const newPass = join(k.dir, 'new-pass');
    writeFileSync(newPass, 'the-new-passphrase\n', { mode: 0o600 });
    const keysBefore = readFileSync(k.vault + '.keys');
    const change = keyhold(bare(k), ['passphrase', 'change', '--new-passphrase-file', newPass]);
    expect(change.status, change.stderr).toBe(0);
    expect(readFileSync(k.vault + '.keys').equals(keysBefore)).toBe(false);
    expect(readFileSync(k.vault + '.keys', 'utf8')).not.toContain('the-new-passphrase');

    keyholdOk(k, ['lock']);
    const old = keyhold(k, ['unlock']);
    expect(old.status).toBe(4);
    expect(statusCode(k)).toBe(3);
    const fresh = keyhold(k, ['unlock'], { env: { KEYHOLD_PASSPHRASE_FILE: newPass } });
    expect(fresh.status, fresh.stderr).toBe(0);
    expect(statusCode(k)).toBe(0);
    const listed = keyhold(bare(k), ['key', 'list', '--scope', 'web', '--json']);
    expect(listed.status, listed.stderr).toBe(0);
    expect((JSON.parse(listed.stdout) as KeyRow[]).map((key) => key.comment)).toEqual(['web-key']);
  });

  it('factor rm of the only factor exits 1 and leaves vault.db.keys byte-identical', () => {
    const k = freshVault();
    const factors = JSON.parse(keyholdOk(k, ['factor', 'list', '--json'])) as { id: string; type: string }[];
    expect(factors).toHaveLength(1);
    expect(factors[0]!.type).toBe('passphrase');
    const before = readFileSync(k.vault + '.keys');
    const r = keyhold(k, ['factor', 'rm', factors[0]!.id]);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(factors[0]!.id);
    expect(readFileSync(k.vault + '.keys').equals(before)).toBe(true);
    // Through an unlocked daemon, too.
    keyholdOk(k, ['unlock']);
    const viaDaemon = keyhold(bare(k), ['factor', 'rm', factors[0]!.id]);
    expect(viaDaemon.status).toBe(1);
    expect(readFileSync(k.vault + '.keys').equals(before)).toBe(true);
  });
});
