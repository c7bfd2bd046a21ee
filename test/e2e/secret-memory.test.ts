// The daemon's master key and KEKs in memfd_secret pages (PRODUCT.md, "Unlock factors and the
// platform", Memory): `status` says which memory, and the daemon's /proc/PID/smaps shows the page
// that unlock writes them to is a secretmem mapping, mlocked and left out of core dumps, which
// /proc/PID/mem (what gdb's gcore reads) cannot read. With RLIMIT_MEMLOCK 0 and no CAP_IPC_LOCK
// the daemon says `plain`, and warns once at start with the reason.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { KEYHOLD_BIN, initVault, keyhold, keyholdOk, makeKeyholdEnv, startServe, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { countInReadableMemory, isSecretmem, readProcessMemory, readSmaps } from '../helpers/smaps.js';
import { Vault } from '../../src/vault/vault.js';
import { vaultPaths } from '../../src/vault/paths.js';

/** The vault's KEK and audit MAC key, from opening it here with the passphrase (test only). */
async function vaultSecrets(k: KeyholdEnv): Promise<Record<string, Buffer>> {
  const vault = await Vault.open(vaultPaths(k.vault), async () => Buffer.from(k.passphrase));
  try {
    const held = vault as unknown as { keks: Map<string, Buffer>; auditMacKey: Buffer };
    const [kek] = [...held.keks.values()];
    return { kek: Buffer.from(kek!), auditMacKey: Buffer.from(held.auditMacKey) };
  } finally {
    vault.close();
  }
}

const statusJson = (k: KeyholdEnv) => JSON.parse(keyhold(k, ['status', '--json']).stdout) as { locked: boolean; memory?: string };
const memoryWarnings = (stderr: string) => stderr.split('\n').filter((line) => line.includes('not memfd_secret'));

describe('secret memory in the daemon', () => {
  let k: KeyholdEnv;
  let serve: ServeHandle;

  beforeAll(async () => {
    k = makeKeyholdEnv('keyhold-secmem-');
    initVault(k);
    serve = await startServe(k, ['--locked']);
  });

  afterAll(async () => {
    await serve?.stop();
    k?.cleanup();
  });

  it('status says memory: secret; unlock writes the keys into a secretmem page that is locked, not dumpable, unreadable from outside', () => {
    const pid = serve.proc.pid!;
    const atStart = readSmaps(pid).filter(isSecretmem);
    expect(atStart, 'one page mapped at start, before any key').toHaveLength(1);
    expect(atStart[0]!.fields.get('Rss'), 'not written while locked').toBe('0 kB');
    expect(statusJson(k)).toMatchObject({ locked: true, memory: 'secret' });

    keyholdOk(k, ['unlock']);
    expect(statusJson(k)).toMatchObject({ locked: false, memory: 'secret' });
    expect(keyholdOk(k, ['status'])).toContain('keys in memfd_secret memory');

    const [page] = readSmaps(pid).filter(isSecretmem);
    expect(page!.start).toBe(atStart[0]!.start);
    expect(page!.flags).toEqual(expect.arrayContaining(['lo', 'dd']));
    expect(page!.fields.get('Rss'), 'unlock wrote the master key, the KEK and the audit MAC key to it').toBe('4 kB');
    expect(page!.fields.get('Locked')).toBe('4 kB');
    expect(readProcessMemory(pid, page!.start)).toBe('EIO');
    // The control: the daemon's ordinary memory is readable the same way (so EIO is the page, not the method).
    const ordinary = readSmaps(pid).find((m) => / rw-p /.test(m.header) && m.fields.get('Rss') !== '0 kB' && !m.flags.includes('dd'));
    expect(readProcessMemory(pid, ordinary!.start)).toBeInstanceOf(Buffer);
    expect(memoryWarnings(serve.stderr())).toEqual([]);
  });

  it('what a core dump would hold (every readable page) has neither the KEK nor the audit MAC key', async () => {
    const secrets = await vaultSecrets(k);
    const { counts, unreadable } = countInReadableMemory(serve.proc.pid!, secrets);
    // Not the master key: SQLCipher keeps its own copies (README, "Secret memory"). Nor the KEK's
    // base64 text, which `keyhold unlock` sent in the control request's JSON (V8 strings).
    expect(counts).toEqual({ kek: 0, auditMacKey: 0 });
    expect(unreadable, 'the secretmem page').toBe(1);
  });
});

describe('a daemon with RLIMIT_MEMLOCK 0 and no CAP_IPC_LOCK', () => {
  it('reports memory: plain and warns once at start, saying why', async () => {
    const k = makeKeyholdEnv('keyhold-secmem-plain-');
    initVault(k);
    const daemon = spawn('setpriv', ['--bounding-set=-ipc_lock', 'prlimit', '--memlock=0', '--', process.execPath, KEYHOLD_BIN, 'serve', '--locked'], {
      env: k.env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    daemon.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise((resolve) => daemon.once('exit', resolve));
    try {
      await waitFor(() => stderr.includes('keyhold daemon ready') || daemon.exitCode !== null, 15_000, 'keyhold serve without memlock');
      expect(daemon.exitCode, stderr).toBeNull();
      keyholdOk(k, ['unlock']);
      expect(statusJson(k)).toMatchObject({ locked: false, memory: 'plain' });
      expect(keyholdOk(k, ['status'])).toContain('keys in ordinary (swappable, dumpable) memory');
      const warnings = memoryWarnings(stderr);
      expect(warnings).toHaveLength(1);
      const warning = JSON.parse(warnings[0]!) as { level: number; memory: string; reason: string };
      expect(warning.level).toBe(40);
      expect(warning.memory).toBe('plain');
      expect(warning.reason).toMatch(/memfd_secret.*RLIMIT_MEMLOCK.*; mlock: .*RLIMIT_MEMLOCK/);
      expect(readSmaps(daemon.pid!).filter(isSecretmem)).toEqual([]);
      // The control for the test above: the same scan finds them in ordinary memory.
      const { counts } = countInReadableMemory(daemon.pid!, await vaultSecrets(k));
      expect(counts.kek).toBeGreaterThan(0);
      expect(counts.auditMacKey).toBeGreaterThan(0);
    } finally {
      daemon.kill('SIGTERM');
      await exited;
      k.cleanup();
    }
  });
});
