// `keyhold serve` with a config file: its [serve] settings apply, flags win over them, and a
// mistake stops the daemon before it starts, naming the file, the line and the key.
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { initVault, keyholdOk, makeKeyholdEnv, serveExpectingExit, startServe, stopAllServes, type KeyholdEnv } from '../helpers/keyhold.js';
import { run } from '../helpers/sshd.js';

let k: KeyholdEnv;
afterEach(async () => {
  await stopAllServes();
  k?.cleanup();
});

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
