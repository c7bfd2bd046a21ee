// A second process holds the vault's write lock (BEGIN IMMEDIATE) for 11 s, longer than SQLite's
// busy timeout: the daemon must keep signing from its cache (each signature audited: the audit
// log needs no database lock), keep answering the owner, make a change wait for the lock rather
// than fail or freeze, and never die (PRODUCT.md, "Guarantees"); an ssh-add -t lifetime that ends
// meanwhile is hidden at once and swept out of the vault once the lock is gone.
import { afterEach, describe, expect, it } from 'vitest';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { auditLines, bare, completeEntries, expectAuditVerifies, killLaunched, launch, sleep, SigningLoad, unauditedSignatures } from '../helpers/audit.js';
import { initVault, keyhold, keyholdOk, makeKeyholdEnv, REPO, startServe, stopAllServes, waitFor, type KeyholdEnv } from '../helpers/keyhold.js';

const HOLD_MS = 11_000;
const envs: KeyholdEnv[] = [];
const holders: ChildProcess[] = [];

afterEach(async () => {
  for (const h of holders.splice(0)) if (h.exitCode === null) h.kill('SIGKILL');
  killLaunched();
  await stopAllServes();
  for (const k of envs.splice(0)) k.cleanup();
});

/** Another process that opens the vault and holds its write lock for `ms`; resolves once it holds it. */
async function holdWriteLock(k: KeyholdEnv, ms: number): Promise<{ released: Promise<number | null> }> {
  const url = (p: string) => JSON.stringify(pathToFileURL(join(REPO, 'dist', p)).href);
  const script = `
    const { Vault } = await import(${url('vault/vault.js')});
    const { vaultPaths } = await import(${url('vault/paths.js')});
    const { readFileSync } = await import('node:fs');
    const pass = readFileSync(process.env.KEYHOLD_PASSPHRASE_FILE, 'utf8').trim();
    const vault = await Vault.open(vaultPaths(process.env.KEYHOLD_VAULT), async () => Buffer.from(pass));
    vault.db.exec('BEGIN IMMEDIATE');
    console.log('held');
    await new Promise((r) => setTimeout(r, ${ms}));
    vault.db.exec('COMMIT');
    vault.close();
  `;
  const proc = spawn(process.execPath, ['--input-type=module', '-e', script], { env: k.env, stdio: ['ignore', 'pipe', 'pipe'] });
  holders.push(proc);
  let out = '';
  let err = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const released = new Promise<number | null>((resolve) => proc.once('exit', resolve));
  await waitFor(() => out.includes('held') || proc.exitCode !== null, 10_000, 'the lock holder');
  if (!out.includes('held')) throw new Error(`lock holder failed: ${err}`);
  return { released };
}

describe('another process holds the vault write lock for 11 s', () => {
  it('signing goes on (audited), status answers, a change waits for the lock, the daemon lives', async () => {
    const k = makeKeyholdEnv('kh-lock-held-');
    envs.push(k);
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web']);
    const serve = await startServe(k);
    const load = new SigningLoad(serve.socket('web'), 4, 4);
    await sleep(300);

    const { released } = await holdWriteLock(k, HOLD_MS);
    const heldAt = Date.now();
    const before = load.received.size;
    await sleep(1_000);
    const launchedAt = Date.now();
    const change = launch(bare(k), ['secret', 'set', 'ci', 'WHILE_HELD'], 'value-written-after-the-lock');
    // Each second of the hold: signatures keep coming, and the owner's status answers at once.
    const perSecond: number[] = [];
    let last = load.received.size;
    for (let s = 0; s < 6; s++) {
      await sleep(1_000);
      perSecond.push(load.received.size - last);
      last = load.received.size;
      const started = Date.now();
      const status = keyhold(bare(k), ['status', '--quiet']);
      expect(status.status, status.stderr).toBe(0);
      expect(Date.now() - started, 'status answered while the lock is held').toBeLessThan(5_000);
    }
    console.log(`lock held: signatures per second while held ${perSecond.join(', ')} (before: ${before})`);
    for (const n of perSecond) expect(n, 'signatures in each second of the hold').toBeGreaterThan(50);

    expect(await released).toBe(0);
    const outcome = await change.done;
    expect(outcome.code, outcome.stderr).toBe(0);
    // It could only commit once the holder let go (its start-up counted in, so a second of slack).
    expect(outcome.ms, 'the change waited for the lock').toBeGreaterThan(heldAt + HOLD_MS - launchedAt - 1_000);
    await sleep(500);
    await load.stop();
    expect(serve.proc.exitCode, serve.stderr().slice(-2000)).toBeNull();
    expect(serve.proc.signalCode).toBeNull();
    expect(keyholdOk(k, ['secret', 'get', 'ci', 'WHILE_HELD'])).toBe('value-written-after-the-lock');
    await serve.stop();
    expect(unauditedSignatures(k, load.received)).toEqual([]);
    expect(completeEntries(k).some((e) => e.event === 'secret-set' && e.name === 'WHILE_HELD')).toBe(true);
    await expectAuditVerifies(k);
  }, 60_000);
});

describe("another process holds the audit log's own lock", () => {
  it('a short hold delays replies; a long one fails closed (FAILURE, logged), then signing resumes by itself', async () => {
    const k = makeKeyholdEnv('kh-audit-lock-');
    envs.push(k);
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web']);
    const serve = await startServe(k);
    const load = new SigningLoad(serve.socket('web'), 2, 2);
    await sleep(300);
    const audit = `${k.vault}.audit.jsonl`;
    const hold = (seconds: number) =>
      new Promise<number | null>((resolve) => spawn('flock', ['-x', audit, 'sleep', String(seconds)], { stdio: 'ignore' }).once('exit', resolve));

    // 0.5 s: appends wait for it, nothing is refused.
    await hold(0.5);
    expect(load.refused, 'refused during a short hold').toBe(0);
    // 4 s, past the 2 s an append may wait: sign requests fail closed, then resume after.
    const before = load.received.size;
    await hold(4);
    expect(load.refused, 'refused while the lock is held for long').toBeGreaterThan(0);
    expect(serve.stderr()).toMatch(/"code":"locked by another process".*cannot write the audit log/);
    await waitFor(() => load.received.size > before + 100, 5_000, 'signing to resume');
    await load.stop();
    expect(serve.proc.exitCode).toBeNull();
    await serve.stop();
    expect(unauditedSignatures(k, load.received)).toEqual([]);
    expect(completeEntries(k).some((e) => e.event === 'audit-resumed' && e.reason === 'locked by another process')).toBe(true);
    await expectAuditVerifies(k);
  }, 60_000);
});

describe('another process holds the vault write lock when an ssh-add -t lifetime ends', () => {
  it('the key is hidden at once; the sweep says it failed and retries, and removes it once the lock is gone', async () => {
    const k = makeKeyholdEnv('kh-lock-expiry-');
    envs.push(k);
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web']);
    const serve = await startServe(k);
    const keyFile = join(k.dir, 'id_expiring');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'expiring', '-f', keyFile], { stdio: 'ignore' });
    const fingerprint = execFileSync('ssh-keygen', ['-l', '-f', `${keyFile}.pub`], { encoding: 'utf8' }).split(' ')[1]!;
    const sshAdd = (args: string[]) => spawnSync('ssh-add', args, { env: { ...process.env, SSH_AUTH_SOCK: serve.socket('web') }, encoding: 'utf8', timeout: 15_000 });
    const added = sshAdd(['-t', '6', keyFile]);
    expect(added.status, added.stderr).toBe(0);
    const addedAt = Date.now();

    // Held from before the expiry (the holder's start-up, scrypt included, must fit in the 6 s)
    // until after the first sweep has given up (10 s of waiting).
    const { released } = await holdWriteLock(k, 20_000);
    expect(Date.now() - addedAt, 'the lock was taken before the expiry').toBeLessThan(5_500);
    await sleep(Math.max(0, addedAt + 6_500 - Date.now()));
    expect(sshAdd(['-l']).stdout, 'the expired key is hidden before the vault can be changed').not.toContain(fingerprint);
    await waitFor(() => serve.stderr().includes('could not remove keys whose ssh-add lifetime ended; retrying'), 20_000, 'the failed sweep to say so');
    expect(keyhold(bare(k), ['status', '--quiet']).status).toBe(0);
    expect(await released).toBe(0);
    await waitFor(() => auditLines(k).some((line) => line.includes('"event":"key-expired"') && line.includes(fingerprint)), 15_000, 'the retried sweep to remove it');
    const listed = JSON.parse(keyholdOk(bare(k), ['key', 'list', '--json'])) as { fingerprint: string; scopes: string[] }[];
    expect(listed.find((key) => key.fingerprint === fingerprint)?.scopes, 'still in the vault, no longer in web').toEqual([]);
    expect(serve.proc.exitCode).toBeNull();
  }, 60_000);
});
