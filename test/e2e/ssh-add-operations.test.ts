// OpenSSH's own ssh-add against a scope socket of a real `keyhold serve`: add (stored in the vault,
// assigned to the scope, kept across a restart), remove and remove-all (unassigned, the key stays),
// lock and unlock (the vault passphrase), constraints refused with a warning naming the keyhold
// commands, and the same add through a container token refused and audited.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { generateKeyPairSync } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initVault, keyhold, keyholdOk, waitFor, makeKeyholdEnv, startServe, stopAllServes, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { frame, RawConn, sshString, tokenHandshake } from '../helpers/raw-wire.js';
import { generateKeyPair, type KeyPair } from '../helpers/ssh-agent.js';
import { auditLines } from '../helpers/audit.js';

interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs an OpenSSH tool without blocking the event loop (the daemon under test is a child, but ssh-add may wait on askpass). */
function run(command: string, args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 15_000): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
let tokenSocket: string;
const keys: Record<string, KeyPair> = {};

const agentEnv = () => ({ SSH_AUTH_SOCK: serve.socket('web'), SSH_ASKPASS: '', DISPLAY: '' });
const sshAdd = (args: string[], env: NodeJS.ProcessEnv = {}) => run('ssh-add', args, { ...agentEnv(), ...env });
const daemonLog = () => `\n--- keyhold serve stderr (tail) ---\n${serve.stderr().slice(-3000)}`;

/** The daemon's log lines reach its stderr a moment after the reply. */
const logged = (text: string) => waitFor(() => serve.stderr().includes(text), 5000, `daemon log line "${text}"${daemonLog()}`);

/** ssh-add reads a password through this script, as OpenSSH's askpass. */
function askpass(name: string, password: string): NodeJS.ProcessEnv {
  const script = join(work, name);
  writeFileSync(script, `#!/bin/sh\necho '${password}'\n`);
  chmodSync(script, 0o700);
  return { SSH_ASKPASS: script, SSH_ASKPASS_REQUIRE: 'force', DISPLAY: ':0' };
}

function listed(scope?: string): { fingerprint: string; comment: string; scopes: string[] }[] {
  return JSON.parse(keyholdOk(k, ['key', 'list', '--json', ...(scope ? ['--scope', scope] : [])])) as { fingerprint: string; comment: string; scopes: string[] }[];
}

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-ssh-add-ops-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-ssh-add-ops-work-'));
  tokenSocket = join(work, 'signer.sock');
  initVault(k);
  // A key so that the web socket exists from the start.
  keyholdOk(k, ['key', 'generate', 'web', '--comment', 'web-generated']);
  keys.ed25519 = generateKeyPair(work, 'id_ed25519', 'ed25519');
  keys.ecdsa = generateKeyPair(work, 'id_ecdsa', 'ecdsa', 256);
  keys.rsa = generateKeyPair(work, 'id_rsa', 'rsa', 3072);
  keys.smallRsa = generateKeyPair(work, 'id_rsa1024', 'rsa', 1024);
  serve = await startServe(k, ['--listen', `unix:${tokenSocket}`]);
}, 30_000);

afterAll(async () => {
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('ssh-add on a scope socket', () => {
  it('adds ed25519, ecdsa-256 and rsa-3072 keys: stored, assigned to web with their comments, listed, they sign, and survive a restart', async () => {
    for (const name of ['ed25519', 'ecdsa', 'rsa'] as const) {
      const added = await sshAdd([keys[name]!.path]);
      expect(added.code, `${name}: ${added.stderr}${daemonLog()}`).toBe(0);
    }
    const web = listed('web');
    for (const name of ['ed25519', 'ecdsa', 'rsa'] as const) {
      const key = web.find((entry) => entry.fingerprint === keys[name]!.fingerprint);
      expect(key, `${name} in key list --scope web`).toBeDefined();
      expect(key!.comment).toBe(`keyhold-test-id_${name}`);
    }
    const agentList = await sshAdd(['-l']);
    for (const name of ['ed25519', 'ecdsa', 'rsa'] as const) expect(agentList.stdout).toContain(keys[name]!.fingerprint);

    const message = join(work, 'message');
    writeFileSync(message, 'signed through ssh-add');
    for (const name of ['ed25519', 'ecdsa', 'rsa'] as const) {
      const signed = await run('ssh-keygen', ['-Y', 'sign', '-n', 'file', '-f', keys[name]!.pubPath, message], agentEnv());
      expect(signed.code, `${name} sign: ${signed.stderr}${daemonLog()}`).toBe(0);
      rmSync(`${message}.sig`, { force: true });
    }
    const audit = auditLines(k).join('\n');
    expect(audit).toContain(`"event":"key-added","scope":"web","fingerprint":"${keys.ed25519!.fingerprint}"`);

    // Adding it again just assigns it.
    expect((await sshAdd([keys.ed25519!.path])).code).toBe(0);

    await serve.stop();
    serve = await startServe(k, ['--listen', `unix:${tokenSocket}`]);
    const afterRestart = await sshAdd(['-l']);
    for (const name of ['ed25519', 'ecdsa', 'rsa'] as const) expect(afterRestart.stdout).toContain(keys[name]!.fingerprint);
  }, 30_000);

  it('refuses an RSA key under 2048 bits (the vault minimum) with a warning', async () => {
    const refused = await sshAdd([keys.smallRsa!.path]);
    expect(refused.code).not.toBe(0);
    await logged('ssh-add cannot add this key: RSA key of 1024 bits refused');
    expect(listed().some((entry) => entry.fingerprint === keys.smallRsa!.fingerprint)).toBe(false);
  });

  it('refuses a DSA key (SHA-1 only): a warning says why and what keyhold holds, and the refusal is audited', async () => {
    const dsa = join(work, 'id_dsa');
    execFileSync('ssh-keygen', ['-q', '-t', 'dsa', '-N', '', '-f', dsa], { stdio: 'ignore' });
    const refused = await sshAdd([dsa]);
    expect(refused.code).not.toBe(0);
    await logged('ssh-add cannot add this: DSA keys are refused (\\"ssh-dss\\" signs with SHA-1 only); keyhold holds ed25519, ECDSA and RSA keys');
    await waitFor(() => auditLines(k).some((line) => line.includes('"event":"agent-operation-refused","scope":"web","operation":"add"') && line.includes('"reason":"unsupported"')), 5000, 'audit line');
  });

  it('refuses an add through a container token, audited and logged', async () => {
    const token = JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--json'])) as { id: string; token: string };
    const { privateKey, publicKey } = generateKeyPairSync('ed25519');
    const jwk = privateKey.export({ format: 'jwk' });
    const seed = Buffer.from(jwk.d!, 'base64url');
    const pub = Buffer.from(publicKey.export({ format: 'jwk' }).x!, 'base64url');
    const add = frame(Buffer.concat([Buffer.from([17]), sshString('ssh-ed25519'), sshString(pub), sshString(Buffer.concat([seed, pub])), sshString('from-a-container')]));
    const conn = await RawConn.open({ kind: 'unix', path: tokenSocket });
    try {
      conn.send(Buffer.concat([tokenHandshake(token.token), add]));
      const reply = await conn.reply();
      expect(reply[0], 'FAILURE').toBe(5);
      // remove-all and lock are refused too: the scope keeps its keys, the daemon stays unlocked.
      const webBefore = listed('web').length;
      conn.send(Buffer.concat([frame(Buffer.from([19])), frame(Buffer.concat([Buffer.from([22]), sshString('lock password')]))]));
      expect((await conn.reply())[0], 'remove-all: FAILURE').toBe(5);
      expect((await conn.reply())[0], 'lock: FAILURE').toBe(5);
      expect(listed('web').length).toBe(webBefore);
      expect(keyhold(k, ['status']).status).toBe(0);
    } finally {
      conn.close();
    }
    expect(listed().some((entry) => entry.comment === 'from-a-container')).toBe(false);
    await logged('ssh-add through a container token cannot add keys');
    const log = serve.stderr();
    // The refusal's audit line is written with the next batch.
    const deadline = Date.now() + 5000;
    while (!auditLines(k).some((line) => line.includes('"event":"agent-operation-refused"') && line.includes(token.id)) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    for (const operation of ['add', 'remove-all', 'lock']) {
      expect(auditLines(k).some((line) => line.includes('"event":"agent-operation-refused"') && line.includes(`"operation":"${operation}"`) && line.includes(token.id)), operation).toBe(true);
    }
    expect(log).not.toContain(seed.toString('hex'));
  });

  it('-d and -D unassign from web only: the keys stay in the vault', async () => {
    const removed = await sshAdd(['-d', keys.ed25519!.path]);
    expect(removed.code, removed.stderr + daemonLog()).toBe(0);
    expect(listed('web').some((entry) => entry.fingerprint === keys.ed25519!.fingerprint)).toBe(false);
    expect(listed().some((entry) => entry.fingerprint === keys.ed25519!.fingerprint)).toBe(true);
    expect(auditLines(k).join('\n')).toContain(`"event":"key-unassigned","scope":"web","fingerprint":"${keys.ed25519!.fingerprint}"`);

    const all = await sshAdd(['-D']);
    expect(all.code, all.stderr + daemonLog()).toBe(0);
    expect(listed('web')).toEqual([]);
    expect(listed().length).toBeGreaterThanOrEqual(4);
    // The socket stays, answering no identities.
    const empty = await sshAdd(['-l']);
    expect(empty.code).toBe(1);
    expect(empty.stdout).toContain('no identities');
  });

  it('-x locks the daemon; -X with a wrong password fails, with the vault passphrase unlocks', async () => {
    expect((await sshAdd([keys.ed25519!.path])).code).toBe(0);
    const locked = await sshAdd(['-x'], askpass('askpass-lock', 'any lock password'));
    expect(locked.code, locked.stderr + daemonLog()).toBe(0);
    // `keyhold status` exits 3 while the daemon is locked.
    expect(keyhold(k, ['status']).status).toBe(3);
    const none = await sshAdd(['-l']);
    expect(none.code).toBe(1);
    expect(none.stdout).toContain('no identities');

    const wrong = await sshAdd(['-X'], askpass('askpass-wrong', 'not the passphrase'));
    expect(wrong.code).not.toBe(0);
    const started = Date.now();
    const right = await sshAdd(['-X'], askpass('askpass-right', k.passphrase));
    expect(right.code, right.stderr + daemonLog()).toBe(0);
    // The failure before it slowed this attempt down.
    expect(Date.now() - started).toBeGreaterThanOrEqual(90);
    const back = await sshAdd(['-l']);
    expect(back.stdout).toContain(keys.ed25519!.fingerprint);
    expect(serve.stderr()).not.toContain(k.passphrase);
    expect(auditLines(k).join('\n')).toMatch(/"event":"lock","reason":"ssh-add -x"/);
    // The wrong password, tried while locked, is in the audit log once the vault could write it.
    await waitFor(() => auditLines(k).some((line) => line.includes('"operation":"unlock"') && line.includes('"reason":"wrong"')), 5000, 'the wrong -X audited');
  }, 20_000);
});
