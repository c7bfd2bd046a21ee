// Fail closed when the audit log cannot be written (PRODUCT.md, "Guarantees"): on a real tmpfs
// that fills up, the daemon stays up, refuses to sign (FAILURE) while still answering identities,
// says why in its log, refuses changes, and resumes by itself once a write succeeds; every
// signature it did hand out has its line, and the log verifies afterwards.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, rmSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { bare, completeEntries, expectAuditVerifies, killLaunched, run, sha256, sleep, unauditedSignatures } from '../helpers/audit.js';
import { initVault, keyhold, KEYHOLD_BIN, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, stopBackgroundDaemon, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { freePort, identitiesFrame, parseIdentities, RawConn, signRequestFrame, tokenHandshake } from '../helpers/raw-wire.js';

const isRoot = process.getuid?.() === 0;
// Mounting a tmpfs needs root; CI runs as root, so there the test always runs.
if (!isRoot) console.log('audit-disk-full: skipped, mounting a tmpfs needs root (uid 0)');
const mounts: string[] = [];
const envs: KeyholdEnv[] = [];

afterEach(async () => {
  killLaunched();
  await stopAllServes();
  // `keyhold unlock` starts a daemon of its own if the one under test is gone: stop that too.
  for (const k of envs) await stopBackgroundDaemon(k.runtime);
  for (const dir of mounts.splice(0)) spawnSync('umount', ['-l', dir]);
  for (const k of envs.splice(0)) k.cleanup();
});

/** A vault whose directory is a tmpfs of `size`, so that the disk under the audit log can fill. */
function vaultOnTmpfs(size: string): KeyholdEnv {
  const k = makeKeyholdEnv('kh-disk-full-');
  envs.push(k);
  const dir = dirname(k.vault);
  mkdirSync(dir, { mode: 0o700 });
  const mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', dir], { encoding: 'utf8' });
  if (mounted.status !== 0) throw new Error(`mount tmpfs: ${mounted.stderr}`);
  mounts.push(dir);
  return k;
}

/** Fills the file system under `dir` to the last byte; returns the filler's path. */
function fill(dir: string): string {
  const path = join(dir, 'filler');
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(4096);
  try {
    for (;;) writeSync(fd, chunk);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
  } finally {
    closeSync(fd);
  }
  return path;
}

/** The daemon still runs (after a moment, so that an exit that already happened is seen). */
async function expectAlive(serve: ServeHandle): Promise<void> {
  await sleep(50);
  const { exitCode, signalCode } = serve.proc;
  expect({ exitCode, signalCode }, `the daemon died: ${serve.stderr().slice(-2000)}`).toEqual({ exitCode: null, signalCode: null });
}

class Signer {
  readonly received = new Set<string>();
  private n = 0;
  private constructor(
    private readonly conn: RawConn,
    private readonly blob: Buffer,
  ) {}

  static async open(path: string): Promise<Signer> {
    const conn = await RawConn.connect(path);
    conn.send(identitiesFrame());
    return new Signer(conn, parseIdentities(await conn.reply())[0]!.blob);
  }

  /** One sign request; the reply's type (14 signature, 5 failure). */
  async sign(): Promise<number> {
    const data = Buffer.from(`disk-full-${this.n++}-${Math.random()}`);
    this.conn.send(signRequestFrame(this.blob, data));
    const reply = await this.conn.reply(5_000);
    if (reply[0] === 14) this.received.add(sha256(data));
    return reply[0]!;
  }

  async identities(): Promise<number> {
    this.conn.send(identitiesFrame());
    return parseIdentities(await this.conn.reply(5_000)).length;
  }

  close(): void {
    this.conn.close();
  }
}

describe.runIf(isRoot)('the disk under the audit log fills up (a real 2 MiB tmpfs)', () => {
  it('refuses to sign, keeps serving, says why, refuses changes, resumes by itself; every signature audited', async () => {
    const k = vaultOnTmpfs('2m');
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web']);
    const serve = await startServe(k);
    const signer = await Signer.open(serve.socket('web'));
    for (let i = 0; i < 10; i++) expect(await signer.sign()).toBe(14);

    const filler = fill(dirname(k.vault));
    // The log's last page may still hold a few lines; past it, every request is refused.
    let firstRefusal = -1;
    for (let i = 0; i < 3000 && firstRefusal < 0; i++) if ((await signer.sign()) === 5) firstRefusal = i;
    expect(firstRefusal, 'a sign request is refused once the disk is full').toBeGreaterThanOrEqual(0);
    for (let i = 0; i < 20; i++) expect(await signer.sign(), 'refused while the disk is full').toBe(5);
    expect(await signer.identities(), 'identities still answered').toBe(1);
    await expectAlive(serve);
    expect(serve.stderr()).toMatch(/cannot write the audit log.*ENOSPC|ENOSPC.*cannot write the audit log/);

    const change = await run(bare(k), ['secret', 'set', 'ci', 'WHILE_FULL'], 'value');
    expect(change.code, change.stderr).toBe(1);
    expect(change.stderr).toMatch(/audit log cannot be written \(ENOSPC\).*nothing was done/);

    rmSync(filler);
    let resumed = false;
    for (const deadline = Date.now() + 5_000; Date.now() < deadline && !resumed; await sleep(100)) resumed = (await signer.sign()) === 14;
    expect(resumed, 'signing resumes by itself once the disk has room').toBe(true);
    expect(serve.stderr()).toMatch(/audit log can be written again/);

    // A lock while the disk is full keeps the events for the next unlock; the daemon lives on.
    const filler2 = fill(dirname(k.vault));
    for (let i = 0; i < 3000; i++) if ((await signer.sign()) === 5) break;
    expect(keyhold(bare(k), ['lock']).status).toBe(0);
    await expectAlive(serve);
    expect(keyhold(bare(k), ['status', '--quiet']).status).toBe(3);
    rmSync(filler2);
    const unlocked = keyhold(k, ['unlock']);
    expect(unlocked.status, unlocked.stderr).toBe(0);
    await expectAlive(serve);
    expect(await signer.sign()).toBe(14);
    signer.close();
    await serve.stop();

    const entries = completeEntries(k);
    expect(unauditedSignatures(k, signer.received), 'every signature handed out has its line').toEqual([]);
    const resumedLine = entries.find((e) => e.event === 'audit-resumed');
    expect(resumedLine?.reason).toBe('ENOSPC');
    expect(resumedLine?.refused).toBeGreaterThanOrEqual(21);
    expect(entries.some((e) => e.event === 'lock')).toBe(true);
    expect(entries.some((e) => e.event === 'secret-set' && e.name === 'WHILE_FULL')).toBe(false);
    expect(keyhold(k, ['secret', 'get', 'ci', 'WHILE_FULL']).status).toBe(5);
    await expectAuditVerifies(k);
  }, 60_000);
});

describe("the daemon's own log cannot be written (stderr on /dev/full)", () => {
  it('it signs, answers status, and survives the lines that protocol errors and bad handshakes log', async () => {
    const k = makeKeyholdEnv('kh-log-full-');
    envs.push(k);
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web']);
    const port = await freePort();
    const full = openSync('/dev/full', 'w');
    const daemon = spawn(process.execPath, [KEYHOLD_BIN, 'serve', '--listen', `tcp:127.0.0.1:${port}`], { env: { ...k.env, KEYHOLD_LOG_LEVEL: 'debug' }, stdio: ['ignore', 'ignore', full] });
    closeSync(full);
    try {
      const socket = join(k.runtime, 'scopes', 'web.sock');
      await waitFor(() => existsSync(socket) || daemon.exitCode !== null, 15_000, 'the scope socket');
      const signer = await Signer.open(socket);
      expect(await signer.sign()).toBe(14);
      for (let i = 0; i < 5; i++) {
        const bad = await RawConn.open({ kind: 'tcp', port });
        bad.send(tokenHandshake('khp_not-a-token'));
        await bad.waitClosed(5_000);
        const garbage = await RawConn.connect(socket);
        garbage.send(Buffer.alloc(4)); // a zero-length frame: a protocol error, logged
        await garbage.waitClosed(5_000);
      }
      expect(await signer.sign()).toBe(14);
      signer.close();
      expect(keyhold(bare(k), ['status', '--quiet']).status).toBe(0);
      expect({ exitCode: daemon.exitCode, signalCode: daemon.signalCode }).toEqual({ exitCode: null, signalCode: null });
    } finally {
      daemon.kill('SIGTERM');
      await new Promise((resolve) => (daemon.exitCode !== null ? resolve(null) : daemon.once('exit', resolve)));
    }
  }, 60_000);
});
