// The CLI around the vault: init, passphrase sources, --json shapes, error lines and exit codes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { initVault, keyhold, keyholdOk, makeKeyholdEnv, type KeyholdEnv, type RunResult } from '../helpers/keyhold.js';

const envs: KeyholdEnv[] = [];
function freshEnv(): KeyholdEnv {
  const k = makeKeyholdEnv('keyhold-cli-vault-');
  envs.push(k);
  return k;
}
afterAll(() => {
  for (const k of envs) k.cleanup();
});

/** The contract's error form: every stderr line `keyhold: <what> (<hint>)`, never a stack trace. */
function expectErrorLine(r: RunResult, code: number, pattern?: RegExp): void {
  expect(r.status, `exit code; stderr: ${r.stderr}`).toBe(code);
  const lines = r.stderr.trimEnd().split('\n');
  expect(lines.length, r.stderr).toBeGreaterThan(0);
  const errors = lines.filter((l) => !l.startsWith('keyhold: warning:'));
  expect(errors.length, r.stderr).toBe(1);
  expect(errors[0]).toMatch(/^keyhold: \S.* \([^()]*\S[^()]*\)$/);
  expect(r.stderr).not.toMatch(/^\s+at /m);
  expect(r.stderr).not.toMatch(/Error:|KeyholdError/);
  if (pattern) expect(errors[0]).toMatch(pattern);
}

/** Bytes of every vault file present (db, keys, -wal, -shm), keyed by name, plus the dir listing. */
function snapshot(k: KeyholdEnv): Map<string, Buffer> {
  const dir = dirname(k.vault);
  const files = new Map<string, Buffer>();
  for (const name of readdirSync(dir).sort()) files.set(name, readFileSync(join(dir, name)));
  return files;
}

const withoutPassFile = { KEYHOLD_PASSPHRASE_FILE: undefined, CREDENTIALS_DIRECTORY: undefined, KEYHOLD_PASSPHRASE: undefined };

describe('init', () => {
  it('creates vault.db and vault.db.keys, 0600, and refuses to overwrite an existing vault', () => {
    const k = freshEnv();
    const out = keyholdOk(k, ['init']);
    expect(out).toContain(k.vault);
    expect(statSync(k.vault).mode & 0o777).toBe(0o600);
    expect(statSync(`${k.vault}.keys`).mode & 0o777).toBe(0o600);
    keyholdOk(k, ['key', 'generate', 'web', '--comment', 'survivor']);
    const before = snapshot(k);
    const again = keyhold(k, ['init']);
    expectErrorLine(again, 1, /already exists/);
    expect(snapshot(k)).toEqual(before);
    const again2 = keyhold(k, ['init', '--generate-passphrase']);
    expect(again2.status).toBe(1);
    expect(again2.stdout).toBe('');
    expect(snapshot(k)).toEqual(before);
    // the old vault still opens with the old passphrase and still holds its key
    expect(JSON.parse(keyholdOk(k, ['key', 'list', '--json']))[0].comment).toBe('survivor');
  });

  it('refuses to create a vault when only the key file is missing or only the db is missing', () => {
    const k = freshEnv();
    mkdirSync(dirname(k.vault), { recursive: true });
    writeFileSync(`${k.vault}.keys`, '{}');
    expect(keyhold(k, ['init']).status).toBe(1);
    expect(readFileSync(`${k.vault}.keys`, 'utf8')).toBe('{}');
    expect(existsSync(k.vault)).toBe(false);
  });

  it('--generate-passphrase prints a passphrase that opens the vault', () => {
    const k = freshEnv();
    const r = keyhold(k, ['init', '--generate-passphrase'], { env: withoutPassFile });
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout.split('\n').filter(Boolean);
    expect(lines.length).toBe(1);
    const generated = lines[0]!;
    expect(generated.length).toBeGreaterThanOrEqual(32);
    expect(r.stderr).not.toContain(generated);
    expect(readFileSync(`${k.vault}.keys`, 'utf8')).not.toContain(generated);
    const passFile = join(k.dir, 'generated');
    writeFileSync(passFile, generated + '\n');
    expect(keyhold(k, ['key', 'list'], { env: { KEYHOLD_PASSPHRASE_FILE: passFile } }).status).toBe(0);
    // and the test env's own passphrase does not
    expect(keyhold(k, ['key', 'list']).status).toBe(4);
  });

  it('--generate-passphrase --json includes the passphrase in the document', () => {
    const k = freshEnv();
    const r = keyhold(k, ['init', '--generate-passphrase', '--json'], { env: withoutPassFile });
    expect(r.status, r.stderr).toBe(0);
    const doc = JSON.parse(r.stdout) as { vault: string; keys: string; passphrase: string };
    expect(doc.vault).toBe(k.vault);
    expect(doc.keys).toBe(`${k.vault}.keys`);
    expect(typeof doc.passphrase).toBe('string');
    const passFile = join(k.dir, 'generated');
    writeFileSync(passFile, doc.passphrase);
    expect(keyhold(k, ['scope', 'list'], { env: { KEYHOLD_PASSPHRASE_FILE: passFile } }).status).toBe(0);
  });

  it('--generate-passphrase with --passphrase-file is a usage error', () => {
    const k = freshEnv();
    expectErrorLine(keyhold(k, ['init', '--generate-passphrase', '--passphrase-file', k.passFile]), 2);
    expect(existsSync(k.vault)).toBe(false);
  });

  it('an empty passphrase file is refused and no vault is created', () => {
    const k = freshEnv();
    const empty = join(k.dir, 'empty');
    writeFileSync(empty, '\n');
    const r = keyhold(k, ['init', '--passphrase-file', empty]);
    expect(r.status).not.toBe(0);
    expectErrorLine(r, r.status!, /empty/);
    expect(existsSync(k.vault)).toBe(false);
    expect(existsSync(`${k.vault}.keys`)).toBe(false);
  });
});

describe('passphrase sources', () => {
  let k: KeyholdEnv;
  beforeAll(() => {
    k = freshEnv();
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web', '--comment', 'pp-src']);
  });

  it('a wrong passphrase exits 4 and leaves every vault file byte-identical', () => {
    const wrong = join(k.dir, 'wrong');
    writeFileSync(wrong, 'not-the-passphrase\n');
    const before = snapshot(k);
    expect(before.has('vault.db')).toBe(true);
    expect(before.has('vault.db.keys')).toBe(true);
    for (const args of [['key', 'list'], ['key', 'generate', 'web'], ['key', 'rm', 'SHA256:x'], ['scope', 'list']]) {
      const r = keyhold(k, [...args, '--passphrase-file', wrong]);
      expectErrorLine(r, 4, /passphrase/);
    }
    const after = snapshot(k);
    expect([...after.keys()]).toEqual([...before.keys()]);
    for (const [name, bytes] of before) expect(after.get(name)!.equals(bytes), `${name} changed`).toBe(true);
  });

  it('no passphrase source (no file, no env, stdin not a TTY) exits 3 naming --passphrase-file and KEYHOLD_PASSPHRASE_FILE', () => {
    const r = keyhold(k, ['key', 'list'], { env: withoutPassFile });
    expectErrorLine(r, 3);
    expect(r.stderr).toContain('--passphrase-file');
    expect(r.stderr).toContain('KEYHOLD_PASSPHRASE_FILE');
    expect(r.stdout).toBe('');
  });

  it('KEYHOLD_PASSPHRASE works, with a warning on stderr that does not echo it', () => {
    const r = keyhold(k, ['key', 'list', '--json'], { env: { ...withoutPassFile, KEYHOLD_PASSPHRASE: k.passphrase } });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)[0].comment).toBe('pp-src');
    expect(r.stderr).toMatch(/^keyhold: warning: .*KEYHOLD_PASSPHRASE/m);
    expect(r.stderr).not.toContain(k.passphrase);
    const wrong = keyhold(k, ['key', 'list'], { env: { ...withoutPassFile, KEYHOLD_PASSPHRASE: 'nope' } });
    expect(wrong.status).toBe(4);
  });

  it('--passphrase-file / KEYHOLD_PASSPHRASE_FILE win over KEYHOLD_PASSPHRASE (no warning)', () => {
    const r = keyhold(k, ['key', 'list'], { env: { KEYHOLD_PASSPHRASE: 'wrong-one' } });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).not.toMatch(/warning/);
  });

  it('--passphrase-file=- reads standard input', () => {
    const r = keyhold(k, ['key', 'list', '--json', '--passphrase-file=-'], { env: withoutPassFile, input: `${k.passphrase}\n` });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)[0].comment).toBe('pp-src');
  });

  it('--passphrase-file - reads standard input', () => {
    const r = keyhold(k, ['key', 'list', '--json', '--passphrase-file', '-'], { env: withoutPassFile, input: `${k.passphrase}\n` });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)[0].comment).toBe('pp-src');
    const wrong = keyhold(k, ['key', 'list', '--passphrase-file', '-'], { env: withoutPassFile, input: 'wrong\n' });
    expect(wrong.status).toBe(4);
    const empty = keyhold(k, ['key', 'list', '--passphrase-file', '-'], { env: withoutPassFile, input: '' });
    expect(empty.status).not.toBe(0);
    expect(empty.stderr).toMatch(/empty/);
  });

  it('$CREDENTIALS_DIRECTORY/keyhold-passphrase works', () => {
    const creds = join(k.dir, 'creds');
    mkdirSync(creds, { mode: 0o700 });
    writeFileSync(join(creds, 'keyhold-passphrase'), k.passphrase);
    const r = keyhold(k, ['key', 'list', '--json'], { env: { ...withoutPassFile, CREDENTIALS_DIRECTORY: creds } });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)[0].comment).toBe('pp-src');
    // a credentials dir without that file is not a source
    const other = join(k.dir, 'creds-empty');
    mkdirSync(other, { mode: 0o700 });
    expect(keyhold(k, ['key', 'list'], { env: { ...withoutPassFile, CREDENTIALS_DIRECTORY: other } }).status).toBe(3);
  });

  it('an empty passphrase file is refused', () => {
    const empty = join(k.dir, 'empty-pass');
    writeFileSync(empty, '');
    const r = keyhold(k, ['key', 'list', '--passphrase-file', empty]);
    expect(r.status).not.toBe(0);
    expect(r.status).not.toBe(4);
    expectErrorLine(r, r.status!, /empty/);
    const viaEnv = keyhold(k, ['key', 'list'], { env: { KEYHOLD_PASSPHRASE_FILE: empty } });
    expect(viaEnv.status).toBe(r.status);
    const viaEnvVar = keyhold(k, ['key', 'list'], { env: { ...withoutPassFile, KEYHOLD_PASSPHRASE: '' } });
    expect(viaEnvVar.status).not.toBe(0);
  });

  it('a passphrase file that does not exist is an error naming it, without a stack', () => {
    const missing = join(k.dir, 'no-such-file');
    const r = keyhold(k, ['key', 'list', '--passphrase-file', missing]);
    expect(r.status).not.toBe(0);
    expectErrorLine(r, r.status!);
    expect(r.stderr).toContain(missing);
  });
});

describe('--json shapes', () => {
  let k: KeyholdEnv;
  beforeAll(() => {
    k = freshEnv();
    const init = JSON.parse(keyholdOk(k, ['init', '--json'])) as Record<string, unknown>;
    expect(init.vault).toBe(k.vault);
    expect(init).not.toHaveProperty('passphrase');
  });

  it('key generate / key list / key pub / scope list / socket print one JSON document with the contract fields', () => {
    const gen = JSON.parse(keyholdOk(k, ['key', 'generate', 'web', '--json', '--comment', 'json-one'])) as Record<string, unknown>;
    expect(gen).toMatchObject({ type: 'ed25519', bits: 256, comment: 'json-one', scopes: ['web'] });
    expect(gen.fingerprint).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    keyholdOk(k, ['key', 'generate', 'web', '--type', 'ecdsa', '--bits', '384', '--comment', 'json-two']);
    keyholdOk(k, ['key', 'generate', 'api', '--type', 'rsa', '--bits', '2048', '--comment', 'json-three']);
    keyholdOk(k, ['key', 'assign', 'api', String(gen.fingerprint)]);

    const list = JSON.parse(keyholdOk(k, ['key', 'list', '--json'])) as Record<string, unknown>[];
    expect(Array.isArray(list)).toBe(true);
    expect(list.length).toBe(3);
    for (const entry of list) {
      for (const field of ['fingerprint', 'type', 'bits', 'comment', 'scopes']) expect(entry).toHaveProperty(field);
      expect(typeof entry.fingerprint).toBe('string');
      expect(typeof entry.bits).toBe('number');
      expect(Array.isArray(entry.scopes)).toBe(true);
    }
    const byComment = Object.fromEntries(list.map((e) => [e.comment, e]));
    expect(byComment['json-one']).toMatchObject({ type: 'ed25519', bits: 256, scopes: ['api', 'web'] });
    expect(byComment['json-two']).toMatchObject({ type: 'ecdsa', bits: 384, scopes: ['web'] });
    expect(byComment['json-three']).toMatchObject({ type: 'rsa', bits: 2048, scopes: ['api'] });

    const scoped = JSON.parse(keyholdOk(k, ['key', 'list', '--scope', 'api', '--json'])) as { comment: string }[];
    expect(scoped.map((e) => e.comment).sort()).toEqual(['json-one', 'json-three']);

    const pub = JSON.parse(keyholdOk(k, ['key', 'pub', 'web', '--json'])) as Record<string, unknown>[];
    expect(pub.length).toBe(2);

    const scopes = JSON.parse(keyholdOk(k, ['scope', 'list', '--json'])) as Record<string, unknown>[];
    expect(scopes).toEqual([
      { name: 'api', keys: 2, secrets: 0, tokens: 0, policy: false },
      { name: 'web', keys: 2, secrets: 0, tokens: 0, policy: false },
    ]);

    const socket = JSON.parse(keyholdOk(k, ['socket', 'web', '--json'])) as Record<string, unknown>;
    expect(socket.path).toBe(join(k.runtime, 'scopes', 'web.sock'));
    expect(keyholdOk(k, ['socket', 'web']).trim()).toBe(join(k.runtime, 'scopes', 'web.sock'));
  });

  it('an empty vault lists as empty JSON arrays', () => {
    const e = freshEnv();
    initVault(e);
    expect(JSON.parse(keyholdOk(e, ['key', 'list', '--json']))).toEqual([]);
    expect(JSON.parse(keyholdOk(e, ['scope', 'list', '--json']))).toEqual([]);
  });
});

describe('errors: `keyhold: <msg> (<hint>)`, exit codes, no stack trace', () => {
  let k: KeyholdEnv;
  beforeAll(() => {
    k = freshEnv();
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web']);
  });

  it('unknown command → 2', () => {
    expectErrorLine(keyhold(k, ['frobnicate']), 2);
    expectErrorLine(keyhold(k, ['key', 'frobnicate']), 2);
    expectErrorLine(keyhold(k, []), 2);
  });

  it('unknown option → 2', () => {
    expectErrorLine(keyhold(k, ['key', 'list', '--no-such-option']), 2);
  });

  it('bad scope name → 2', () => {
    for (const scope of ['bad/scope', '-dash', '.dot', 'a'.repeat(65), 'sp ace', '']) {
      expectErrorLine(keyhold(k, ['key', 'generate', '--', scope]), 2);
    }
    expectErrorLine(keyhold(k, ['key', 'pub', 'x/y']), 2);
    expectErrorLine(keyhold(k, ['socket', '../etc']), 2);
    expect(JSON.parse(keyholdOk(k, ['scope', 'list', '--json'])).map((s: { name: string }) => s.name)).toEqual(['web']);
  });

  it('a 64-character scope name is fine', () => {
    const name = 'a' + 'b'.repeat(62) + 'c';
    expect(keyhold(k, ['key', 'generate', name]).status).toBe(0);
  });

  it('missing fingerprint → 5', () => {
    const missing = 'SHA256:' + 'A'.repeat(43);
    expectErrorLine(keyhold(k, ['key', 'rm', missing]), 5);
    expectErrorLine(keyhold(k, ['key', 'assign', 'web', missing]), 5);
    expectErrorLine(keyhold(k, ['key', 'unassign', 'web', missing]), 5);
  });

  it('`key pub` of an empty scope → 5', () => {
    expectErrorLine(keyhold(k, ['key', 'pub', 'nothing-here']), 5);
  });

  it('no vault → 5 (not found), naming the path and `keyhold init`', () => {
    const missingVault = join(k.dir, 'nowhere', 'vault.db');
    const r = keyhold(k, ['key', 'list', '--vault', missingVault]);
    expectErrorLine(r, 5, /keyhold init/);
    expect(r.stderr).toContain(missingVault);
    expect(existsSync(missingVault)).toBe(false);
    for (const args of [['scope', 'list'], ['key', 'pub', 'web'], ['lock'], ['socket', 'web'], ['serve']]) {
      const viaEnv = keyhold(k, args, { env: { KEYHOLD_VAULT: missingVault } });
      expectErrorLine(viaEnv, 5, /keyhold init/);
    }
  });

  it('a key file that is not JSON → 1 with a hint, no stack', () => {
    const e = freshEnv();
    initVault(e);
    writeFileSync(`${e.vault}.keys`, 'garbage');
    expectErrorLine(keyhold(e, ['key', 'list']), 1, /malformed/);
  });

  it('--help exits 0 on stdout', () => {
    const r = keyhold(k, ['key', '--help']);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/generate/);
  });
});
