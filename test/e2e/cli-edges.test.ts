// The small edges a new user meets: a missing argument named with the usage line, confirmations
// on success, `key pub` without a passphrase, `socket` of a scope that does not exist, and a
// passphrase too short to protect a vault.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { initVault, keyhold, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, type KeyholdEnv, type RunResult } from '../helpers/keyhold.js';

const noPassphrase = { KEYHOLD_PASSPHRASE_FILE: undefined, CREDENTIALS_DIRECTORY: undefined, KEYHOLD_PASSPHRASE: undefined };

const envs: KeyholdEnv[] = [];
function freshEnv(): KeyholdEnv {
  const k = makeKeyholdEnv('keyhold-cli-edges-');
  envs.push(k);
  return k;
}

let k: KeyholdEnv;
beforeAll(() => {
  k = freshEnv();
  initVault(k);
  keyholdOk(k, ['key', 'generate', 'web']);
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  for (const e of envs) e.cleanup();
}, 30_000);

function oneErrorLine(r: RunResult, code: number): string {
  expect(r.status, r.stderr).toBe(code);
  const lines = r.stderr.trimEnd().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^keyhold: \S.* \(.+\)$/);
  return lines[0]!;
}

describe('a missing argument', () => {
  const cases: [string[], string, string][] = [
    [['key', 'pub'], '<scope>', 'keyhold key pub <scope>'],
    [['key', 'assign', 'web'], '<fingerprint>', 'keyhold key assign <scope> <fingerprint>'],
    [['secret', 'rm', 'web'], '<name>', 'keyhold secret rm <scope> <name>'],
    [['socket'], '<scope>', 'keyhold socket <scope>'],
    [['token', 'revoke'], '<id>', 'keyhold token revoke'],
    [['env', '--', 'true'], '--scope', 'keyhold env'],
  ];
  for (const [args, missing, usage] of cases) {
    it(`keyhold ${args.join(' ')}: names ${missing} and gives the usage line, exit 2`, () => {
      const line = oneErrorLine(keyhold(k, args), 2);
      expect(line).not.toMatch(/Not enough non-option arguments|Missing required argument/);
      expect(line).toContain(`missing ${missing.startsWith('<') ? 'argument' : 'option'} ${missing}`);
      expect(line).toContain(`usage: ${usage}`);
    });
  }
});

describe('confirmations on success', () => {
  it('lock, token revoke and secret rm say what they did in one line; with --json stdout is one JSON document', async () => {
    const serve = await startServe(k);
    try {
      const lock = keyhold(k, ['lock']);
      expect(lock.status, lock.stderr).toBe(0);
      expect(lock.stderr).toMatch(/^keyhold: locked \(daemon pid \d+\).*\n$/);
      expect(lock.stdout).toBe('');
      keyholdOk(k, ['unlock']);
      const lockJson = keyhold(k, ['lock', '--json']);
      expect(lockJson.status, lockJson.stderr).toBe(0);
      expect((JSON.parse(lockJson.stdout) as { locked: boolean }).locked).toBe(true);
      expect(lockJson.stderr).toBe('');
    } finally {
      await serve.stop();
    }

    const { id } = JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--subject', 'ci', '--json'])) as { id: string };
    const revoke = keyhold(k, ['token', 'revoke', id]);
    expect(revoke.status, revoke.stderr).toBe(0);
    expect(revoke.stderr).toMatch(new RegExp(`^keyhold: revoked ${id} \\(scope web, subject ci\\).*\\n$`));
    const second = JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--json'])) as { id: string };
    const revokeJson = keyhold(k, ['token', 'revoke', second.id, '--json']);
    expect(revokeJson.status, revokeJson.stderr).toBe(0);
    expect((JSON.parse(revokeJson.stdout) as { id: string }).id).toBe(second.id);
    expect(revokeJson.stderr).toBe('');

    for (const name of ['ONE', 'TWO']) keyholdOk(k, ['secret', 'set', 'web', name], { input: 'value' });
    const rm = keyhold(k, ['secret', 'rm', 'web', 'ONE']);
    expect(rm.status, rm.stderr).toBe(0);
    expect(rm.stderr).toBe('keyhold: removed secret ONE of web\n');
    const rmJson = keyhold(k, ['secret', 'rm', 'web', 'TWO', '--json']);
    expect(rmJson.status, rmJson.stderr).toBe(0);
    expect(JSON.parse(rmJson.stdout)).toEqual({ scope: 'web', name: 'TWO', removed: true });
    expect(rmJson.stderr).toBe('');
  }, 60_000);
});

describe('key pub without a passphrase', () => {
  it('reads the public keys from a running, unlocked daemon; with nothing to unlock the vault, exit 3 saying why', async () => {
    const expected = keyholdOk(k, ['key', 'pub', 'web']);
    const none = keyhold(k, ['key', 'pub', 'web'], { env: noPassphrase });
    const line = oneErrorLine(none, 3);
    expect(line).toContain('inside the encrypted vault');
    expect(line).toContain('keyhold unlock');
    const serve = await startServe(k);
    try {
      const viaDaemon = keyhold(k, ['key', 'pub', 'web'], { env: noPassphrase });
      expect(viaDaemon.status, viaDaemon.stderr).toBe(0);
      expect(viaDaemon.stdout).toBe(expected);
    } finally {
      await serve.stop();
    }
  }, 60_000);
});

describe('keyhold socket SCOPE', () => {
  it('a scope that does not exist: exit 5 when a passphrase source or an unlocked daemon can tell; else the path with a warning', async () => {
    const path = join(k.runtime, 'scopes', 'nosuch.sock');
    const local = keyhold(k, ['socket', 'nosuch']);
    expect(local.stdout).toBe('');
    expect(oneErrorLine(local, 5)).toMatch(/no scope nosuch.*keyhold scope list/);
    expect(keyholdOk(k, ['socket', 'web'])).toBe(`${join(k.runtime, 'scopes', 'web.sock')}\n`);

    const blind = keyhold(k, ['socket', 'nosuch'], { env: noPassphrase });
    expect(blind.status, blind.stderr).toBe(0);
    expect(blind.stdout).toBe(`${path}\n`);
    expect(blind.stderr).toMatch(/^keyhold: warning: cannot check that scope nosuch exists/);

    const serve = await startServe(k);
    try {
      const viaDaemon = keyhold(k, ['socket', 'nosuch'], { env: noPassphrase });
      expect(viaDaemon.stdout).toBe('');
      oneErrorLine(viaDaemon, 5);
      const web = keyhold(k, ['socket', 'web'], { env: noPassphrase });
      expect(web.status, web.stderr).toBe(0);
      expect(web.stderr).toBe('');
      keyholdOk(k, ['lock']);
      // Locked: the daemon still knows its open sockets.
      const lockedWeb = keyhold(k, ['socket', 'web'], { env: noPassphrase });
      expect(lockedWeb.status, lockedWeb.stderr).toBe(0);
      expect(lockedWeb.stderr).toBe('');
    } finally {
      await serve.stop();
    }
  }, 60_000);
});

describe('a passphrase too short for a vault (OpenSSH refuses fewer than 5 characters)', () => {
  it('init refuses a 1- and a 4-character passphrase with exit 2 and creates nothing; 5 characters are accepted', () => {
    for (const short of ['x', 'abcd', 'ééé']) {
      const e = freshEnv();
      writeFileSync(e.passFile, `${short}\n`);
      const line = oneErrorLine(keyhold(e, ['init']), 2);
      expect(line).toMatch(/passphrase too short \(\d characters?; at least 5\)/);
      expect(line).not.toContain(short);
      expect(existsSync(e.vault) || existsSync(`${e.vault}.keys`)).toBe(false);
    }
    const e = freshEnv();
    writeFileSync(e.passFile, 'fivec\n');
    keyholdOk(e, ['init']);
    keyholdOk(e, ['key', 'list']);
  });

  it('passphrase change refuses a short new one (exit 2) and the old passphrase still opens the vault', () => {
    const e = freshEnv();
    initVault(e);
    const newFile = join(e.dir, 'new-pass');
    writeFileSync(newFile, 'abc\n', { mode: 0o600 });
    const line = oneErrorLine(keyhold(e, ['passphrase', 'change', '--new-passphrase-file', newFile]), 2);
    expect(line).toContain('passphrase too short');
    keyholdOk(e, ['key', 'list']);
  });
});
