// `keyhold serve` with a config file: each [serve] key is honoured by the running daemon, a flag
// wins over the file (and KEYHOLD_LOG_LEVEL sits between them), and a mistake stops the daemon
// before it starts, naming the file, the line and the key.
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  initVault,
  keyhold,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  serveExpectingExit,
  startServe,
  stopAllServes,
  waitFor,
  type KeyholdEnv,
} from '../helpers/keyhold.js';
import { setPolicyThroughDaemon } from '../helpers/policy-daemon.js';
import { identitiesFrame, parseIdentities, RawConn, signRequestFrame, tokenHandshake } from '../helpers/raw-wire.js';
import { run } from '../helpers/sshd.js';

let k: KeyholdEnv;
const quietServes = new Set<ChildProcess>();
afterEach(async () => {
  await stopAllServes();
  await Promise.all([...quietServes].map(stopProcess));
  quietServes.clear();
  k?.cleanup();
});

async function stopProcess(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

/**
 * `keyhold serve` (unlocked from the passphrase file), up once `keyhold status` says unlocked:
 * for log levels that hide the "ready" line startServe waits for.
 */
async function startServeQuietly(env: KeyholdEnv, args: string[] = [], extraEnv: NodeJS.ProcessEnv = {}): Promise<{ stderr(): string }> {
  const proc = spawn(process.execPath, [KEYHOLD_BIN, 'serve', ...args], { env: { ...env.env, ...extraEnv }, stdio: ['ignore', 'ignore', 'pipe'] });
  quietServes.add(proc);
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  await waitFor(() => proc.exitCode !== null || keyhold(env, ['status', '--quiet']).status === 0, 15_000, 'keyhold serve to unlock');
  if (proc.exitCode !== null) throw new Error(`keyhold serve exited ${proc.exitCode}: ${stderr}`);
  return { stderr: () => stderr };
}

/** The messages of the daemon's JSON log lines at `level` (pino: 20 debug, 30 info, 40 warn). */
const messagesAt = (stderr: string, level: number): string[] =>
  stderr
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as { level: number; msg: string })
    .filter((entry) => entry.level === level)
    .map((entry) => entry.msg);

/** A confirm program as OpenSSH runs SSH_ASKPASS: records its question, answers with `code`. */
function confirmProgram(env: KeyholdEnv, name: string, code: number): { path: string; asked(): string | null } {
  const path = join(env.dir, name);
  const record = join(env.dir, `${name}.asked`);
  writeFileSync(path, `#!/bin/sh\nprintf '%s %s\\n' "$SSH_ASKPASS_PROMPT" "$1" >> '${record}'\nexit ${code}\n`, { mode: 0o700 });
  return { path, asked: () => (existsSync(record) ? readFileSync(record, 'utf8') : null) };
}

/** A vault whose scope `web` holds one key; the key's public blob. */
function vaultWithWebKey(env: KeyholdEnv): Buffer {
  initVault(env);
  const line = keyholdOk(env, ['key', 'generate', 'web']).trim();
  return Buffer.from(line.split(' ')[1]!, 'base64');
}

/** One sign request on `web`'s socket: the reply's type (14 signed, 5 refused) and how long it took. */
async function signOnce(socket: string, blob: Buffer, timeoutMs = 15_000): Promise<{ type: number; ms: number }> {
  const conn = await RawConn.connect(socket);
  const started = Date.now();
  try {
    conn.send(signRequestFrame(blob, Buffer.from('config test data')));
    const reply = await conn.reply(timeoutMs);
    return { type: reply[0]!, ms: Date.now() - started };
  } finally {
    conn.close();
  }
}

const CONFIRM_EVERYTHING = { default: 'allow', rules: [{ action: 'confirm' }] };

/** Writes the default config file of this environment ($XDG_CONFIG_HOME/keyhold/config.toml). */
function writeConfig(env: KeyholdEnv, text: string): string {
  const dir = join(env.env.XDG_CONFIG_HOME!, 'keyhold');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, 'config.toml');
  writeFileSync(file, text);
  return file;
}

describe('serve with a config file', () => {
  it('binds the configured scope sockets while locked: ssh-add -l says "no identities" (exit 1), not "no such file" (2)', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    writeConfig(k, '[serve]\nscopes = ["web", "ops"]\n');
    const serve = await startServe(k, ['--locked']);
    for (const scope of ['web', 'ops']) {
      const result = await run('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: serve.socket(scope) } });
      expect(result.code).toBe(1);
      expect(result.stdout + result.stderr).toMatch(/no identities/i);
    }
    // Unlocked, a configured scope without keys stays, beside the scopes that have keys.
    keyholdOk(k, ['unlock']);
    keyholdOk(k, ['key', 'generate', 'ci']);
    await expect.poll(() => JSON.parse(keyholdOk(k, ['status', '--json'])).sockets.sort()).toEqual(
      ['ci', 'ops', 'web'].map((s) => serve.socket(s)).sort(),
    );
  });

  it('takes listen and idle_lock from the file, and a flag wins over the file', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    const signer = join(k.dir, 'signer.sock');
    writeConfig(k, `[serve]\nlisten = ["unix:${signer}"]\nidle_lock = "30m"\nlock_after = "8h"\n`);
    const serve = await startServe(k, ['--lock-after', '2h']);
    expect(existsSync(signer)).toBe(true);
    const status = JSON.parse(keyholdOk(k, ['status', '--json'])) as { idle_ms: number; lock_at: string; unlocked_at: string };
    expect(status.idle_ms).toBe(30 * 60_000);
    expect(Date.parse(status.lock_at) - Date.parse(status.unlocked_at)).toBe(2 * 3_600_000);
    await serve.stop();
  });

  it('exits 2 naming file, line and key for an unknown key, before it starts', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    const file = writeConfig(k, '[serve]\nscopes = ["web"]\nconfirm_timout = "30s"\n');
    const { code, stderr } = await serveExpectingExit(k);
    expect(code).toBe(2);
    expect(stderr).toContain(`keyhold: ${file}:3: serve.confirm_timout: unknown key`);
    expect(existsSync(join(k.runtime, 'control.sock'))).toBe(false);
  });

  it('--config names another file; a missing one exits 2', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    writeConfig(k, '[serve]\nlog_level = "nonsense"\n');
    const other = join(k.dir, 'other.toml');
    writeFileSync(other, '[serve]\nscopes = ["only"]\n');
    const serve = await startServe(k, ['--config', other, '--locked']);
    expect(existsSync(serve.socket('only'))).toBe(true);
    await serve.stop();
    const missing = await serveExpectingExit(k, ['--config', join(k.dir, 'nope.toml')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/no config file .*nope\.toml/);
  });
});

describe('each [serve] key, honoured by the running daemon; its flag wins', () => {
  it('listen: a token listener at that path serves a token; --listen replaces the configured list', async () => {
    k = makeKeyholdEnv();
    vaultWithWebKey(k);
    const { token } = JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--json'])) as { token: string };
    const configured = join(k.dir, 'configured.sock');
    const flagged = join(k.dir, 'flagged.sock');
    writeConfig(k, `[serve]\nlisten = ["unix:${configured}"]\n`);
    const identitiesThrough = async (path: string) => {
      const conn = await RawConn.connect(path);
      try {
        conn.send(Buffer.concat([tokenHandshake(token), identitiesFrame()]));
        const reply = await conn.reply();
        expect(reply[0]).toBe(12);
        return parseIdentities(reply).length;
      } finally {
        conn.close();
      }
    };
    let serve = await startServe(k);
    expect(await identitiesThrough(configured)).toBe(1);
    await serve.stop();
    serve = await startServe(k, ['--listen', `unix:${flagged}`]);
    expect(await identitiesThrough(flagged)).toBe(1);
    expect(existsSync(configured)).toBe(false);
    await serve.stop();
  });

  it('idle_lock: the daemon locks after that long without requests; --idle-lock wins', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    writeConfig(k, '[serve]\nidle_lock = "1s"\n');
    let serve = await startServe(k);
    await waitFor(() => keyhold(k, ['status', '--quiet']).status === 3, 8_000, 'the idle lock');
    await waitFor(() => serve.stderr().includes('"reason":"idle"'), 5_000, 'the lock logged');
    await serve.stop();
    serve = await startServe(k, ['--idle-lock', '1h']);
    await new Promise((r) => setTimeout(r, 2_500));
    const status = JSON.parse(keyholdOk(k, ['status', '--json'])) as { locked: boolean; idle_ms: number };
    expect(status).toMatchObject({ locked: false, idle_ms: 3_600_000 });
    await serve.stop();
  });

  it('lock_after: the daemon locks that long after the unlock', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    writeConfig(k, '[serve]\nlock_after = "2s"\n');
    const serve = await startServe(k);
    const started = Date.now();
    await waitFor(() => keyhold(k, ['status', '--quiet']).status === 3, 8_000, 'lock_after');
    expect(Date.now() - started).toBeGreaterThanOrEqual(1_000);
    await waitFor(() => serve.stderr().includes('"reason":"lock deadline reached"'), 5_000, 'the lock logged');
  });

  it('confirm_program: a confirm rule asks the configured program; --confirm-program wins', async () => {
    k = makeKeyholdEnv();
    const blob = vaultWithWebKey(k);
    const yes = confirmProgram(k, 'yes', 0);
    const no = confirmProgram(k, 'no', 1);
    writeConfig(k, `[serve]\nconfirm_program = "${yes.path}"\nconfirm_timeout = "10s"\n`);
    let serve = await startServe(k);
    await setPolicyThroughDaemon(k, 'web', CONFIRM_EVERYTHING as never);
    expect((await signOnce(serve.socket('web'), blob)).type).toBe(14);
    expect(yes.asked()).toMatch(/^confirm .*web/);
    await serve.stop();
    serve = await startServe(k, ['--confirm-program', no.path]);
    expect((await signOnce(serve.socket('web'), blob)).type).toBe(5);
    expect(no.asked()).toMatch(/^confirm /);
    expect(yes.asked()!.trim().split('\n')).toHaveLength(1);
    await serve.stop();
  });

  it('confirm_timeout: an unanswered confirmation is refused after it; --confirm-timeout wins', async () => {
    k = makeKeyholdEnv();
    const blob = vaultWithWebKey(k);
    writeConfig(k, '[serve]\nconfirm_timeout = "2s"\n');
    const noAskpass = { SSH_ASKPASS: '', DISPLAY: '', WAYLAND_DISPLAY: '' };
    let serve = await startServe(k, [], noAskpass);
    await setPolicyThroughDaemon(k, 'web', CONFIRM_EVERYTHING as never);
    let refused = await signOnce(serve.socket('web'), blob);
    expect(refused.type).toBe(5);
    expect(refused.ms).toBeGreaterThanOrEqual(1_800);
    expect(refused.ms).toBeLessThan(6_000);
    await serve.stop();
    writeConfig(k, '[serve]\nconfirm_timeout = "1h"\n');
    serve = await startServe(k, ['--confirm-timeout', '1s'], noAskpass);
    refused = await signOnce(serve.socket('web'), blob);
    expect(refused.type).toBe(5);
    expect(refused.ms).toBeLessThan(4_000);
    await serve.stop();
  });

  it('log_level: debug lines appear at debug, info lines vanish at warn; --log-level > KEYHOLD_LOG_LEVEL > the file', async () => {
    k = makeKeyholdEnv();
    vaultWithWebKey(k);
    const socket = join(k.runtime, 'scopes', 'web.sock');
    writeConfig(k, '[serve]\nlog_level = "debug"\n');
    let serve = await startServeQuietly(k);
    await run('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: socket } });
    await waitFor(() => messagesAt(serve.stderr(), 20).includes('agent connection'), 5_000, 'a debug line');
    await Promise.all([...quietServes].map(stopProcess));

    writeConfig(k, '[serve]\nlog_level = "warn"\n');
    serve = await startServeQuietly(k);
    await run('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: socket } });
    expect(messagesAt(serve.stderr(), 30)).toEqual([]);
    expect(messagesAt(serve.stderr(), 20)).toEqual([]);
    await Promise.all([...quietServes].map(stopProcess));

    // KEYHOLD_LOG_LEVEL wins over the file, --log-level over both.
    serve = await startServeQuietly(k, [], { KEYHOLD_LOG_LEVEL: 'info' });
    await waitFor(() => messagesAt(serve.stderr(), 30).includes('keyhold daemon ready'), 5_000, 'an info line');
    await Promise.all([...quietServes].map(stopProcess));
    serve = await startServeQuietly(k, ['--log-level', 'debug'], { KEYHOLD_LOG_LEVEL: 'info' });
    await run('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: socket } });
    await waitFor(() => messagesAt(serve.stderr(), 20).includes('agent connection'), 5_000, 'a debug line');
    await Promise.all([...quietServes].map(stopProcess));

    const typo = await serveExpectingExit(k, [], 15_000, { ...k.env, KEYHOLD_LOG_LEVEL: 'loud' });
    expect(typo.code).toBe(2);
    expect(typo.stderr).toMatch(/^keyhold: KEYHOLD_LOG_LEVEL="loud" is not a log level \(use one of .*debug.*\)\n$/);
  });

  it('offline_grace: accepted and checked, and serve says at debug that it has no effect on this vault', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    writeConfig(k, '[serve]\noffline_grace = "60s"\nlog_level = "debug"\n');
    const serve = await startServe(k);
    expect(messagesAt(serve.stderr(), 20)).toContain('offline_grace is for PostgreSQL vaults (planned): no effect on this vault');
    await serve.stop();
    const file = writeConfig(k, '[serve]\noffline_grace = "a minute"\n');
    const bad = await serveExpectingExit(k);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain(`keyhold: ${file}:2: serve.offline_grace: invalid duration "a minute"`);
  });
});

describe('a config file serve cannot use: exit 2 naming the file, the line and the key, before it starts', () => {
  it.each([
    ['a bad value', '[serve]\nscopes = ["web"]\nidle_lock = "soon"\n', ':3: serve.idle_lock: invalid duration "soon"'],
    ['a bad type', '[serve]\n\nscopes = "web"\n', ':3: serve.scopes: must be a list of scope names'],
    ['a number for a duration', '[serve]\nlock_after = 3600\n', ':2: serve.lock_after: must be a duration string'],
    ['a relative confirm program', '[serve]\nconfirm_program = "ssh-askpass"\n', ':2: serve.confirm_program: must be an absolute path'],
    ['a bad log level', '[serve]\nlog_level = "loud"\n', ':2: serve.log_level: must be one of'],
    ['bad TOML syntax', '[serve]\nidle_lock = "30m"\nlock_after = 8h\n', ':3: '],
    ['an unknown table', '[server]\nidle_lock = "30m"\n', ':1: server: unknown table or key'],
  ])('%s', async (_what, text, message) => {
    k = makeKeyholdEnv();
    initVault(k);
    const file = writeConfig(k, text);
    const { code, stderr } = await serveExpectingExit(k);
    expect(code).toBe(2);
    expect(stderr).toMatch(/^keyhold: [^\n]*\n$/);
    expect(stderr).toContain(`keyhold: ${file}${message}`);
    expect(existsSync(join(k.runtime, 'control.sock'))).toBe(false);
  });

  it('a config file group or others may write', async () => {
    k = makeKeyholdEnv();
    initVault(k);
    const file = writeConfig(k, '[serve]\n');
    for (const mode of [0o620, 0o602]) {
      chmodSync(file, mode);
      const { code, stderr } = await serveExpectingExit(k);
      expect(code).toBe(2);
      expect(stderr).toBe(`keyhold: ${file} may be written by others (chmod go-w ${file}, and own it yourself)\n`);
    }
  });
});
