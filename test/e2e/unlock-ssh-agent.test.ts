// End-to-end: the ssh-agent unlock factor against a real OpenSSH ssh-agent (and a real `ssh -A`
// through a test sshd). Every keyhold process is the real CLI / daemon (bin/keyhold).
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import {
  daemonPid,
  isKeyholdServe,
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
  type RunResult,
} from '../helpers/keyhold.js';
import { agentFingerprints, generateKeyPair, startSshAgent, stopAllSshAgents, type KeyPair, type SshAgentHandle } from '../helpers/ssh-agent.js';
import { startSshd, stopAllSshd } from '../helpers/sshd.js';

// ---------------------------------------------------------------------------------------------
// Fixture and small helpers
// ---------------------------------------------------------------------------------------------

let work: string;
let ed: KeyPair; // the enrolled ed25519 key
let ed2: KeyPair; // another ed25519 key, never enrolled
let rsa: KeyPair; // RSA-3072
let ecdsa: KeyPair; // ECDSA P-256: refused
const envs: KeyholdEnv[] = [];

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), 'keyhold-e2e-unlock-agent-'));
  ed = generateKeyPair(work, 'id_ed25519', 'ed25519');
  ed2 = generateKeyPair(work, 'id_other', 'ed25519');
  rsa = generateKeyPair(work, 'id_rsa', 'rsa', 3072);
  ecdsa = generateKeyPair(work, 'id_ecdsa', 'ecdsa', 256);
}, 60_000);

afterEach(async () => {
  await stopAllServes();
  // Daemons `keyhold unlock` started in the background.
  await Promise.all(envs.map((k) => stopBackgroundDaemon(k.runtime)));
  await stopAllSshAgents();
  await stopAllSshd();
  for (const k of envs.splice(0)) k.cleanup();
}, 30_000);

afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

function freshEnv(): KeyholdEnv {
  const k = makeKeyholdEnv('keyhold-e2e-unlock-agent-');
  envs.push(k);
  return k;
}

/** A copy of `k` whose environment has `changes` applied; `undefined` deletes the variable. */
function variant(k: KeyholdEnv, changes: Record<string, string | undefined>): KeyholdEnv {
  const env: NodeJS.ProcessEnv = { ...k.env };
  for (const [name, value] of Object.entries(changes)) {
    if (value === undefined) delete env[name];
    else env[name] = value;
  }
  return { ...k, env };
}

/** No passphrase source at all (no file, credential or KEYHOLD_PASSPHRASE); the agent at `sock`, or none. */
function agentOnly(k: KeyholdEnv, sock: string | undefined): KeyholdEnv {
  return variant(k, {
    KEYHOLD_PASSPHRASE_FILE: undefined,
    KEYHOLD_PASSPHRASE: undefined,
    CREDENTIALS_DIRECTORY: undefined,
    SSH_AUTH_SOCK: sock,
  });
}

/** The passphrase file and the agent at `sock`. */
function withAgent(k: KeyholdEnv, sock: string): KeyholdEnv {
  return variant(k, { SSH_AUTH_SOCK: sock });
}

function expectCode(r: RunResult, code: number, what: string): void {
  expect(r.status, `${what}: exit ${r.status}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(code);
}

function statusCode(k: KeyholdEnv): number | null {
  return keyhold(agentOnly(k, undefined), ['status', '--quiet']).status;
}

/** Bytes of every file in the vault's directory, by name. */
function snapshot(k: KeyholdEnv): Map<string, Buffer> {
  const dir = dirname(k.vault);
  const files = new Map<string, Buffer>();
  if (!existsSync(dir)) return files;
  for (const name of readdirSync(dir).sort()) files.set(name, readFileSync(join(dir, name)));
  return files;
}

interface FactorJson {
  id: string;
  type: string;
  created: string;
  policy: string;
  key_type?: string;
  fingerprint?: string;
}

function factorList(k: KeyholdEnv): FactorJson[] {
  return JSON.parse(keyholdOk(agentOnly(k, undefined), ['factor', 'list', '--json'])) as FactorJson[];
}

function scopeSocket(k: KeyholdEnv, scope: string): string {
  return join(k.runtime, 'scopes', `${scope}.sock`);
}

/**
 * A locked daemon offers no key on a scope socket: a daemon that has never been unlocked has not
 * opened it yet; one locked after an unlock keeps it and answers an empty list.
 */
function expectNoKeysOffered(k: KeyholdEnv, scope: string): void {
  const sock = scopeSocket(k, scope);
  if (existsSync(sock)) expect(agentFingerprints(sock)).toEqual([]);
}

/** Generates a vault key in `scope`; returns its fingerprint. */
function generateVaultKey(k: KeyholdEnv, scope: string): string {
  return (JSON.parse(keyholdOk(k, ['key', 'generate', scope, '--json'])) as { fingerprint: string }).fingerprint;
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 30_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs, killSignal: 'SIGKILL' });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

// ---------------------------------------------------------------------------------------------
// 1, 2. Enroll an ed25519 / RSA key and unlock with it alone
// ---------------------------------------------------------------------------------------------

/**
 * init with a passphrase, enroll `key` from the agent (by .pub file or by fingerprint), then unlock
 * a locked daemon (started by `serve --locked`, or autostarted by `unlock`) with no passphrase
 * source at all.
 */
async function enrollAndUnlock(key: KeyPair, keyType: string, spec: 'pubfile' | 'fingerprint', start: 'serve' | 'autostart'): Promise<void> {
  const agent = await startSshAgent();
  agent.add(key.path);
  expect(agent.fingerprints()).toEqual([key.fingerprint]);
  const k = freshEnv();
  keyholdOk(k, ['init', '--passphrase-file', k.passFile]);

  const added = JSON.parse(
    keyholdOk(withAgent(k, agent.sock), ['factor', 'add', 'ssh-agent', '--key', spec === 'pubfile' ? key.pubPath : key.fingerprint, '--json']),
  ) as FactorJson;
  expect(added).toMatchObject({ type: 'ssh-agent', key_type: keyType, fingerprint: key.fingerprint, policy: 'any' });
  expect(added.id).toMatch(/^sa-[0-9a-f]{8}$/);
  const factors = factorList(k);
  expect(factors.map((f) => f.type).sort()).toEqual(['passphrase', 'ssh-agent']);
  expect(factors.find((f) => f.type === 'ssh-agent')).toEqual(added);
  // The keyring stores the public blob and fingerprint, never a private part.
  const keysText = readFileSync(`${k.vault}.keys`, 'utf8');
  expect(keysText).toContain(key.fingerprint);
  expect(keysText).not.toContain(readFileSync(key.path, 'utf8').split('\n')[1]!);

  const vaultKey = generateVaultKey(k, 'web');
  const a = agentOnly(k, agent.sock);

  if (start === 'serve') {
    await startServe(k, ['--locked']);
    expect(statusCode(k)).toBe(3);
  } else {
    expect(existsSync(join(k.runtime, 'daemon.pid'))).toBe(false);
  }

  const unlocked = keyhold(a, ['unlock', '--factor', 'ssh-agent']);
  expectCode(unlocked, 0, 'unlock --factor ssh-agent');
  expect(unlocked.stderr).toMatch(/unlocked/);
  if (start === 'autostart') {
    const pid = daemonPid(k.runtime);
    expect(pid).not.toBeNull();
    expect(processAlive(pid!)).toBe(true);
  }
  expect(statusCode(k)).toBe(0);
  expect(agentFingerprints(scopeSocket(k, 'web'))).toEqual([vaultKey]);

  expectCode(keyhold(a, ['lock']), 0, 'lock');
  expect(statusCode(k)).toBe(3);
  expect(agentFingerprints(scopeSocket(k, 'web'))).toEqual([]);

  // Control: with neither a passphrase source nor an agent, unlock has nothing to use.
  const nothing = keyhold(agentOnly(k, undefined), ['unlock']);
  expectCode(nothing, 3, 'unlock with no source at all');
  expect(nothing.stderr).toMatch(/SSH_AUTH_SOCK/);
  expect(statusCode(k)).toBe(3);

  // Without --factor and with no passphrase source, the agent is picked by itself.
  expectCode(keyhold(a, ['unlock']), 0, 'unlock (no --factor)');
  expect(statusCode(k)).toBe(0);
  expect(agentFingerprints(scopeSocket(k, 'web'))).toEqual([vaultKey]);
}

describe('ssh-agent factor: enroll and unlock', () => {
  it('ed25519 enrolled from its .pub file unlocks a `serve --locked` daemon with no passphrase source', async () => {
    await enrollAndUnlock(ed, 'ssh-ed25519', 'pubfile', 'serve');
  });

  it('ed25519 enrolled by its SHA256 fingerprint (ssh-keygen -lf) unlocks, starting the daemon itself', async () => {
    expect(ed.fingerprint).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    await enrollAndUnlock(ed, 'ssh-ed25519', 'fingerprint', 'autostart');
  });

  it('RSA-3072 in the agent works the same way (rsa-sha2-512 signatures)', async () => {
    await enrollAndUnlock(rsa, 'ssh-rsa', 'pubfile', 'autostart');
  });
});

// ---------------------------------------------------------------------------------------------
// 3. A vault with only an ssh-agent factor
// ---------------------------------------------------------------------------------------------

describe('init --ssh-key alone', () => {
  it('creates a vault whose only factor is the agent key; key commands work with the agent alone', async () => {
    const agent = await startSshAgent();
    agent.add(ed.path);
    const k = freshEnv();
    const a = agentOnly(k, agent.sock);
    const init = keyhold(a, ['init', '--ssh-key', ed.pubPath, '--json']);
    expectCode(init, 0, 'init --ssh-key');
    const created = JSON.parse(init.stdout) as { policy: string; factors: Array<{ id: string; type: string }> };
    expect(created.policy).toBe('any');
    expect(created.factors.map((f) => f.type)).toEqual(['ssh-agent']);

    const factors = factorList(k);
    expect(factors).toHaveLength(1);
    expect(factors[0]).toMatchObject({ type: 'ssh-agent', key_type: 'ssh-ed25519', fingerprint: ed.fingerprint });
    expect(factors[0]!.id).toBe(created.factors[0]!.id);

    // No daemon runs: `key generate` opens the vault in the CLI with the agent's signature.
    const gen = keyhold(a, ['key', 'generate', 'web', '--json']);
    expectCode(gen, 0, 'key generate with only the agent');
    const vaultKey = (JSON.parse(gen.stdout) as { fingerprint: string }).fingerprint;
    const listed = JSON.parse(keyholdOk(a, ['key', 'list', '--json'])) as Array<{ fingerprint: string }>;
    expect(listed.map((x) => x.fingerprint)).toEqual([vaultKey]);
    // Control: without the agent there is nothing to open it with.
    expectCode(keyhold(agentOnly(k, undefined), ['key', 'list']), 3, 'key list with no agent and no passphrase');
    // A passphrase, even a real file, is no factor of this vault.
    expectCode(keyhold(variant(a, { KEYHOLD_PASSPHRASE_FILE: k.passFile }), ['key', 'list']), 4, 'key list with a passphrase file');

    const pp = keyhold(variant(a, { KEYHOLD_PASSPHRASE_FILE: k.passFile }), ['unlock', '--factor', 'passphrase']);
    expectCode(pp, 4, 'unlock --factor passphrase');
    expect(pp.stderr).toMatch(/no passphrase factor/);
    const ppNoSource = keyhold(a, ['unlock', '--factor', 'passphrase']);
    expectCode(ppNoSource, 4, 'unlock --factor passphrase without a passphrase source');
    expect(statusCode(k)).toBe(3);

    expectCode(keyhold(a, ['unlock', '--factor', 'ssh-agent']), 0, 'unlock --factor ssh-agent');
    expect(statusCode(k)).toBe(0);
    expect(agentFingerprints(scopeSocket(k, 'web'))).toEqual([vaultKey]);
  });
});

// ---------------------------------------------------------------------------------------------
// 4. The agent holds a different key
// ---------------------------------------------------------------------------------------------

describe('agent without the enrolled key', () => {
  it('unlock --factor ssh-agent exits 4 naming the enrolled fingerprint; the daemon stays locked, the vault unchanged', async () => {
    const agent = await startSshAgent();
    agent.add(ed.path);
    const k = freshEnv();
    keyholdOk(k, ['init']);
    keyholdOk(withAgent(k, agent.sock), ['factor', 'add', 'ssh-agent', '--key', ed.pubPath]);
    generateVaultKey(k, 'web');
    agent.removeAll();
    agent.add(ed2.path);
    expect(agent.fingerprints()).toEqual([ed2.fingerprint]);

    await startServe(k, ['--locked']);
    const before = snapshot(k);
    expect([...before.keys()]).toEqual(expect.arrayContaining(['vault.db', 'vault.db.keys']));
    const a = agentOnly(k, agent.sock);

    const r = keyhold(a, ['unlock', '--factor', 'ssh-agent']);
    expectCode(r, 4, 'unlock with the wrong key in the agent');
    expect(r.stderr).toContain(ed.fingerprint);
    expect(r.stderr).not.toContain(ed2.fingerprint);
    expect(r.stderr).not.toMatch(/^\s+at /m);
    expect(statusCode(k)).toBe(3);
    expectNoKeysOffered(k, 'web');

    // Without --factor the agent does not apply, and there is no other source: exit 3.
    const auto = keyhold(a, ['unlock']);
    expectCode(auto, 3, 'unlock (no --factor) with the wrong key in the agent');
    expect(statusCode(k)).toBe(3);

    // A key command without a daemon-side unlock cannot open the vault with that agent either.
    expectCode(keyhold(a, ['key', 'list']), 3, 'key list with the wrong key in the agent');
    expect(snapshot(k)).toEqual(before);
  });
});

// ---------------------------------------------------------------------------------------------
// 5. ECDSA is refused
// ---------------------------------------------------------------------------------------------

describe('ECDSA keys are refused', () => {
  it('factor add ssh-agent with an ECDSA key exits 4 saying why; vault.db.keys is unchanged', async () => {
    const agent = await startSshAgent();
    agent.add(ed.path, ecdsa.path);
    const k = freshEnv();
    keyholdOk(k, ['init']);
    const keysBefore = readFileSync(`${k.vault}.keys`);
    const all = snapshot(k);

    for (const spec of [ecdsa.pubPath, ecdsa.fingerprint]) {
      const r = keyhold(withAgent(k, agent.sock), ['factor', 'add', 'ssh-agent', '--key', spec]);
      expectCode(r, 4, `factor add ssh-agent --key ${spec}`);
      expect(r.stderr).toMatch(/randomized/);
      expect(r.stderr).toMatch(/ecdsa/i);
      expect(r.stderr).not.toMatch(/^\s+at /m);
      expect(readFileSync(`${k.vault}.keys`).equals(keysBefore)).toBe(true);
    }
    expect(snapshot(k)).toEqual(all);
    expect(factorList(k).map((f) => f.type)).toEqual(['passphrase']);
  });

  it('init --ssh-key with an ECDSA key exits 4 and creates no vault files', async () => {
    const agent = await startSshAgent();
    agent.add(ecdsa.path);
    const k = freshEnv();
    const alone = keyhold(agentOnly(k, agent.sock), ['init', '--ssh-key', ecdsa.pubPath]);
    expectCode(alone, 4, 'init --ssh-key ecdsa.pub');
    expect(alone.stderr).toMatch(/randomized/);
    expect(existsSync(k.vault)).toBe(false);
    expect(existsSync(`${k.vault}.keys`)).toBe(false);
    expect(snapshot(k).size).toBe(0);

    const withPass = keyhold(withAgent(k, agent.sock), ['init', '--passphrase-file', k.passFile, '--ssh-key', ecdsa.fingerprint]);
    expectCode(withPass, 4, 'init --passphrase-file F --ssh-key <ecdsa fingerprint>');
    expect(withPass.stderr).toMatch(/randomized/);
    expect(existsSync(k.vault)).toBe(false);
    expect(existsSync(`${k.vault}.keys`)).toBe(false);
    expect(snapshot(k).size).toBe(0);
  });
});

// ---------------------------------------------------------------------------------------------
// 6. factor add ssh-agent: usage and lookup errors
// ---------------------------------------------------------------------------------------------

describe('factor add ssh-agent errors', () => {
  it('no --key exits 2 listing the eligible keys; a key the agent lacks exits 5; no agent exits 3', async () => {
    const agent = await startSshAgent();
    agent.add(ed.path, rsa.path, ecdsa.path);
    const k = freshEnv();
    keyholdOk(k, ['init']);
    const before = snapshot(k);

    const noKey = keyhold(withAgent(k, agent.sock), ['factor', 'add', 'ssh-agent']);
    expectCode(noKey, 2, 'factor add ssh-agent without --key');
    expect(noKey.stderr).toContain(ed.fingerprint);
    expect(noKey.stderr).toContain(rsa.fingerprint);
    // ECDSA is not eligible, so it is not offered.
    expect(noKey.stderr).not.toContain(ecdsa.fingerprint);
    expect(noKey.stderr).toMatch(/--key/);

    for (const spec of [ed2.pubPath, ed2.fingerprint]) {
      const missing = keyhold(withAgent(k, agent.sock), ['factor', 'add', 'ssh-agent', '--key', spec]);
      expectCode(missing, 5, `factor add ssh-agent --key ${spec} (not in the agent)`);
      expect(missing.stderr).toContain(ed2.fingerprint);
    }

    const noSock = keyhold(variant(k, { SSH_AUTH_SOCK: undefined }), ['factor', 'add', 'ssh-agent', '--key', ed.pubPath]);
    expectCode(noSock, 3, 'factor add ssh-agent with no SSH_AUTH_SOCK');
    expect(noSock.stderr).toMatch(/SSH_AUTH_SOCK/);

    const deadSock = keyhold(variant(k, { SSH_AUTH_SOCK: join(k.dir, 'no-such-agent.sock') }), ['factor', 'add', 'ssh-agent', '--key', ed.pubPath]);
    expectCode(deadSock, 3, 'factor add ssh-agent with SSH_AUTH_SOCK naming no socket');

    expect(snapshot(k)).toEqual(before);
    expect(factorList(k).map((f) => f.type)).toEqual(['passphrase']);
  });
});

// ---------------------------------------------------------------------------------------------
// 7. Policy all
// ---------------------------------------------------------------------------------------------

describe('policy all', () => {
  it('needs both the passphrase and the agent', async () => {
    const agent = await startSshAgent();
    agent.add(ed.path);
    const k = freshEnv();
    const both = withAgent(k, agent.sock);
    keyholdOk(both, ['init', '--passphrase-file', k.passFile, '--ssh-key', ed.pubPath, '--policy', 'all']);
    const factors = factorList(k);
    expect(factors.map((f) => [f.type, f.policy]).sort()).toEqual([
      ['passphrase', 'all'],
      ['ssh-agent', 'all'],
    ]);
    const vaultKey = generateVaultKey(both, 'web');
    const wrongFile = join(k.dir, 'wrong-pass');
    writeFileSync(wrongFile, 'not-the-passphrase\n', { mode: 0o600 });

    // Only the passphrase: the agent part is missing.
    const passOnly = keyhold(variant(k, { SSH_AUTH_SOCK: undefined }), ['unlock']);
    expectCode(passOnly, 3, 'unlock with only the passphrase');
    expect(passOnly.stderr).toMatch(/SSH_AUTH_SOCK|SSH agent/);
    expect(statusCode(k)).toBe(3); // the autostarted daemon stays locked
    // Only the agent: the passphrase part is missing.
    const agentOnlyRun = keyhold(agentOnly(k, agent.sock), ['unlock', '--factor', 'ssh-agent']);
    expectCode(agentOnlyRun, 3, 'unlock with only the agent');
    expect(agentOnlyRun.stderr).toMatch(/passphrase/);
    expect(statusCode(k)).toBe(3);
    // The agent and a wrong passphrase.
    const wrong = keyhold(variant(both, { KEYHOLD_PASSPHRASE_FILE: wrongFile }), ['unlock']);
    expectCode(wrong, 4, 'unlock with the agent and a wrong passphrase');
    expect(statusCode(k)).toBe(3);
    // The passphrase and an agent holding another key.
    const other = await startSshAgent();
    other.add(ed2.path);
    const otherKey = keyhold(withAgent(k, other.sock), ['unlock']);
    expectCode(otherKey, 4, 'unlock with the passphrase and an agent without the enrolled key');
    expect(otherKey.stderr).toContain(ed.fingerprint);
    expect(statusCode(k)).toBe(3);
    expectNoKeysOffered(k, 'web');

    // Both: unlocked.
    expectCode(keyhold(both, ['unlock']), 0, 'unlock with the passphrase and the agent');
    expect(statusCode(k)).toBe(0);
    expect(agentFingerprints(scopeSocket(k, 'web'))).toEqual([vaultKey]);
    expectCode(keyhold(both, ['lock']), 0, 'lock');
    expect(statusCode(k)).toBe(3);
  });
});

// ---------------------------------------------------------------------------------------------
// 8. Through a real `ssh -A`
// ---------------------------------------------------------------------------------------------

describe('unlock over ssh -A', () => {
  async function setup(): Promise<{ agent: SshAgentHandle; k: KeyholdEnv; vaultKey: string; sshArgs: (cmd: string) => string[]; sshEnv: NodeJS.ProcessEnv }> {
    const agent = await startSshAgent();
    agent.add(ed.path);
    const k = freshEnv();
    keyholdOk(k, ['init']);
    keyholdOk(withAgent(k, agent.sock), ['factor', 'add', 'ssh-agent', '--key', ed.pubPath]);
    const vaultKey = generateVaultKey(k, 'web');
    const sshd = await startSshd({ authorizedKeys: [ed.pubLine] });
    const sshEnv: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: process.env.HOME, SSH_AUTH_SOCK: agent.sock };
    return { agent, k, vaultKey, sshEnv, sshArgs: (cmd) => [...sshd.sshArgs(['-o', 'ForwardAgent=yes']), cmd] };
  }

  function remoteUnlock(k: KeyholdEnv): string {
    const env = [`KEYHOLD_VAULT=${shellQuote(k.vault)}`, `KEYHOLD_RUNTIME_DIR=${shellQuote(k.runtime)}`, 'KEYHOLD_KDF_LOG2N=14'];
    // Print the forwarded socket first so the test can see it is not the local agent's.
    return `printf 'fwd=%s\\n' "$SSH_AUTH_SOCK"; env ${env.join(' ')} ${shellQuote(process.execPath)} ${shellQuote(KEYHOLD_BIN)} unlock --factor ssh-agent`;
  }

  function forwardedSock(stdout: string): string {
    const m = /^fwd=(.*)$/m.exec(stdout);
    expect(m, stdout).not.toBeNull();
    return m![1]!;
  }

  it('unlocks a daemon started locked, from the far side of ssh -A', async () => {
    const { agent, k, vaultKey, sshArgs, sshEnv } = await setup();
    await startServe(k, ['--locked']);
    expect(statusCode(k)).toBe(3);

    const r = await run('ssh', sshArgs(remoteUnlock(k)), sshEnv);
    expect(r.code, `stdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
    const fwd = forwardedSock(r.stdout);
    expect(fwd).not.toBe('');
    expect(fwd).not.toBe(agent.sock);
    expect(r.stderr).toMatch(/unlocked/);

    expect(statusCode(k)).toBe(0);
    expect(agentFingerprints(scopeSocket(k, 'web'))).toEqual([vaultKey]);
  });

  it('with no daemon running, the remote unlock starts one in the background', async () => {
    const { agent, k, vaultKey, sshArgs, sshEnv } = await setup();
    expect(daemonPid(k.runtime)).toBeNull();
    expect(statusCode(k)).toBe(3);

    const r = await run('ssh', sshArgs(remoteUnlock(k)), sshEnv);
    expect(r.code, `stdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
    expect(forwardedSock(r.stdout)).not.toBe(agent.sock);

    expect(statusCode(k)).toBe(0);
    expect(agentFingerprints(scopeSocket(k, 'web'))).toEqual([vaultKey]);
    const pid = daemonPid(k.runtime);
    expect(pid).not.toBeNull();
    expect(processAlive(pid!)).toBe(true);
    expect(isKeyholdServe(pid!)).toBe(true);
    // The daemon outlives the ssh session, and its environment has no agent or passphrase.
    const environ = readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');
    expect(environ.some((e) => e.startsWith('SSH_AUTH_SOCK='))).toBe(false);

    await stopBackgroundDaemon(k.runtime);
    expect(processAlive(pid!)).toBe(false);
    expect(statusCode(k)).toBe(3);
  });
});

// ---------------------------------------------------------------------------------------------
// 9. passphrase change, proven with the agent
// ---------------------------------------------------------------------------------------------

describe('passphrase change unlocked by the agent', () => {
  it('sets a new passphrase without the old one; both the new passphrase and the agent factor still unlock', async () => {
    const agent = await startSshAgent();
    agent.add(ed.path);
    const k = freshEnv();
    keyholdOk(k, ['init']);
    keyholdOk(withAgent(k, agent.sock), ['factor', 'add', 'ssh-agent', '--key', ed.pubPath]);
    const vaultKey = generateVaultKey(k, 'web');
    const before = factorList(k);
    const newFile = join(k.dir, 'new-pass');
    writeFileSync(newFile, `new-pass-${Math.random().toString(36).slice(2)}\n`, { mode: 0o600 });

    const a = agentOnly(k, agent.sock);
    const change = keyhold(a, ['passphrase', 'change', '--new-passphrase-file', newFile]);
    expectCode(change, 0, 'passphrase change via the agent');
    const after = factorList(k);
    expect(after.map((f) => f.id).sort()).toEqual(before.map((f) => f.id).sort());
    expect(after.find((f) => f.type === 'ssh-agent')).toEqual(before.find((f) => f.type === 'ssh-agent'));

    // The new passphrase opens the vault (no agent); the old one no longer does.
    const withNew = variant(agentOnly(k, undefined), { KEYHOLD_PASSPHRASE_FILE: newFile });
    const listed = JSON.parse(keyholdOk(withNew, ['key', 'list', '--json'])) as Array<{ fingerprint: string }>;
    expect(listed.map((x) => x.fingerprint)).toEqual([vaultKey]);
    expectCode(keyhold(variant(k, { SSH_AUTH_SOCK: undefined }), ['key', 'list']), 4, 'key list with the old passphrase');
    // The agent factor still opens it.
    expectCode(keyhold(a, ['key', 'list']), 0, 'key list with the agent');
  });
});
