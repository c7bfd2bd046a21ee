// The daemon makes itself non-dumpable and sets its core limit to 0 at start (PRODUCT.md,
// "Guarantees"). Non-dumpable shows from outside as /proc/PID/* owned by root, which needs a daemon
// that is not root itself: it runs as uid 65534 here, with a vault and runtime dir of its own.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KEYHOLD_BIN, waitFor } from '../helpers/keyhold.js';
import { randomBytes } from 'node:crypto';
import { Vault } from '../../src/vault/vault.js';
import { vaultPaths } from '../../src/vault/paths.js';

const NOBODY = 65534;

describe('daemon hardening', () => {
  let dir: string;
  let daemon: ChildProcess | null = null;
  let stderr = '';
  let env: NodeJS.ProcessEnv;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'keyhold-harden-'));
    chownSync(dir, NOBODY, NOBODY);
    const home = join(dir, 'home');
    mkdirSync(home, { mode: 0o700 });
    chownSync(home, NOBODY, NOBODY);
    writeFileSync(join(home, 'pass'), 'hardening-test-pass\n', { mode: 0o600 });
    chownSync(join(home, 'pass'), NOBODY, NOBODY);
    env = {
      PATH: process.env.PATH,
      HOME: home,
      KEYHOLD_VAULT: join(home, 'vault.db'),
      KEYHOLD_RUNTIME_DIR: join(home, 'run'),
      KEYHOLD_PASSPHRASE_FILE: join(home, 'pass'),
      KEYHOLD_KDF_LOG2N: '14',
    };
    const asNobody = { uid: NOBODY, gid: NOBODY, cwd: '/', env, encoding: 'utf8' as const, timeout: 30_000 };
    const init = spawnSync(process.execPath, [KEYHOLD_BIN, 'init'], asNobody);
    expect(init.status, init.stderr).toBe(0);
    const gen = spawnSync(process.execPath, [KEYHOLD_BIN, 'key', 'generate', 'web'], asNobody);
    expect(gen.status, gen.stderr).toBe(0);
    daemon = spawn(process.execPath, [KEYHOLD_BIN, 'serve'], { uid: NOBODY, gid: NOBODY, cwd: '/', env, stdio: ['ignore', 'ignore', 'pipe'] });
    daemon.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    await waitFor(() => stderr.includes('keyhold daemon ready') || daemon!.exitCode !== null, 15_000, 'daemon as nobody');
    expect(daemon.exitCode, stderr).toBeNull();
  });

  afterAll(async () => {
    if (daemon && daemon.exitCode === null) {
      const exited = new Promise((r) => daemon!.once('exit', r));
      daemon.kill('SIGTERM');
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('a CLI process of the same uid is dumpable (its /proc entries belong to it): the check can tell', () => {
    const probe = spawnSync(process.execPath, ['-e', 'console.log(require("fs").statSync("/proc/self/status").uid)'], {
      uid: NOBODY,
      gid: NOBODY,
      cwd: '/',
      encoding: 'utf8',
    });
    expect(probe.stdout.trim()).toBe(String(NOBODY));
  });

  it('the daemon is non-dumpable: its /proc/PID files belong to root although it runs as 65534', () => {
    const pid = daemon!.pid!;
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    expect(status).toMatch(new RegExp(`^Uid:\\s+${NOBODY}\\s`, 'm'));
    expect(statSync(`/proc/${pid}/status`).uid).toBe(0);
    expect(statSync(`/proc/${pid}/environ`).uid).toBe(0);
  });

  it('its core file size limit is 0 (soft and hard)', () => {
    const limits = readFileSync(`/proc/${daemon!.pid}/limits`, 'utf8');
    expect(limits).toMatch(/^Max core file size\s+0\s+0\s+bytes/m);
  });

  it('nobody else of that uid can read its memory', () => {
    const probe = spawnSync(
      process.execPath,
      ['-e', `try { require("fs").readFileSync("/proc/${daemon!.pid}/environ"); console.log("read") } catch (e) { console.log(e.code) }`],
      { uid: NOBODY, gid: NOBODY, cwd: '/', encoding: 'utf8' },
    );
    expect(probe.stdout.trim()).toBe('EACCES');
  });
});

describe('master key in memory', () => {
  it('is zeroed when the vault is closed (lock drops it)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'keyhold-zero-'));
    try {
      process.env.KEYHOLD_KDF_LOG2N = '14';
      const vault = await Vault.create(vaultPaths(join(dir, 'vault.db')), Buffer.from(randomBytes(8).toString('hex')));
      const held = (vault as unknown as { masterKey: Buffer }).masterKey;
      expect(held.length).toBe(32);
      expect(held.some((b) => b !== 0)).toBe(true);
      vault.close();
      expect(held.every((b) => b === 0)).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
