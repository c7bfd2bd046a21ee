// key assign / unassign / rm semantics and exit codes, key generate options, and the vault file
// holding nothing in the clear.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync } from 'node:fs';
import {
  initVault,
  keyhold,
  keyholdOk,
  makeKeyholdEnv,
  startServe,
  stopAllServes,
  type KeyholdEnv,
} from '../helpers/keyhold.js';

interface KeyJson {
  fingerprint: string;
  type: string;
  bits: number;
  comment: string;
  scopes: string[];
}

const envs: KeyholdEnv[] = [];
afterAll(async () => {
  await stopAllServes();
  for (const k of envs) k.cleanup();
});
function freshVault(): KeyholdEnv {
  const k = makeKeyholdEnv('keyhold-cli-keys-');
  envs.push(k);
  initVault(k);
  return k;
}

const list = (k: KeyholdEnv, scope?: string) =>
  JSON.parse(keyholdOk(k, ['key', 'list', '--json', ...(scope ? ['--scope', scope] : [])])) as KeyJson[];
const generate = (k: KeyholdEnv, scope: string, comment: string, extra: string[] = []) =>
  JSON.parse(keyholdOk(k, ['key', 'generate', scope, '--comment', comment, '--json', ...extra])) as KeyJson;
const scopesOf = (k: KeyholdEnv, fp: string) => list(k).find((key) => key.fingerprint === fp)?.scopes;
const scopeNames = (k: KeyholdEnv) => (JSON.parse(keyholdOk(k, ['scope', 'list', '--json'])) as { name: string }[]).map((s) => s.name);

describe('key assign / unassign / rm', () => {
  let k: KeyholdEnv;
  let a: KeyJson;
  let b: KeyJson;
  beforeAll(() => {
    k = freshVault();
    a = generate(k, 'web', 'key-a');
    b = generate(k, 'web', 'key-b');
  });

  it('assign offers a key in another scope too; it is idempotent; the short fingerprint works', () => {
    const r = keyhold(k, ['key', 'assign', 'api', a.fingerprint]);
    expect(r.status, r.stderr).toBe(0);
    expect(scopesOf(k, a.fingerprint)).toEqual(['api', 'web']);
    expect(keyhold(k, ['key', 'assign', 'api', a.fingerprint]).status).toBe(0);
    expect(scopesOf(k, a.fingerprint)).toEqual(['api', 'web']);
    expect(keyhold(k, ['key', 'assign', 'ops', b.fingerprint.replace(/^SHA256:/, '')]).status).toBe(0);
    expect(scopesOf(k, b.fingerprint)).toEqual(['ops', 'web']);
    expect(list(k).length).toBe(2); // still two keys
    expect(list(k, 'api').map((key) => key.comment)).toEqual(['key-a']);
    expect(scopeNames(k)).toEqual(['api', 'ops', 'web']);
    const pub = keyholdOk(k, ['key', 'pub', 'api']);
    expect(pub.trim().split('\n').length).toBe(1);
    expect(pub).toMatch(/ key-a\n$/);
  });

  it('assign --json prints the change', () => {
    const doc = JSON.parse(keyholdOk(k, ['key', 'assign', 'api', a.fingerprint, '--json']));
    expect(doc).toMatchObject({ scope: 'api', fingerprint: a.fingerprint });
  });

  it('assign of an unknown key → 5, to a bad scope → 2; nothing changes', () => {
    const before = list(k);
    expect(keyhold(k, ['key', 'assign', 'api', 'SHA256:' + 'Z'.repeat(43)]).status).toBe(5);
    expect(keyhold(k, ['key', 'assign', 'api', 'not-a-fingerprint']).status).toBe(5);
    expect(keyhold(k, ['key', 'assign', 'bad/scope', a.fingerprint]).status).toBe(2);
    expect(keyhold(k, ['key', 'assign', '', a.fingerprint]).status).toBe(2);
    expect(list(k)).toEqual(before);
  });

  it('the same answers through a running daemon (no passphrase source): 5 for a fingerprint or id that names nothing', async () => {
    const serve = await startServe(k);
    const viaDaemon = { env: { KEYHOLD_PASSPHRASE_FILE: '' } };
    try {
      for (const args of [
        ['key', 'assign', 'api', 'not-a-fingerprint'],
        ['key', 'unassign', 'api', 'SHA256:' + 'Z'.repeat(43)],
        ['key', 'rm', 'MD5:00:11'],
        ['token', 'revoke', 'tok_nope'],
        ['factor', 'rm', 'xx-nope'],
      ]) {
        const result = keyhold(k, args, viaDaemon);
        expect(result.status, `${args.join(' ')}: ${result.stderr}`).toBe(5);
        expect(result.stderr).not.toMatch(/bad control request/);
      }
      expect(keyhold(k, ['key', 'assign', 'bad/scope', a.fingerprint], viaDaemon).status).toBe(2);
    } finally {
      await serve.stop();
    }
  });

  it('unassign stops offering a key in one scope; the key stays in the vault', () => {
    expect(keyhold(k, ['key', 'unassign', 'web', a.fingerprint]).status).toBe(0);
    expect(scopesOf(k, a.fingerprint)).toEqual(['api']);
    expect(list(k, 'web').map((key) => key.comment)).toEqual(['key-b']);
    // a second unassign of the same pair → 5
    expect(keyhold(k, ['key', 'unassign', 'web', a.fingerprint]).status).toBe(5);
    // unknown key → 5, bad scope → 2
    expect(keyhold(k, ['key', 'unassign', 'web', 'SHA256:' + 'Z'.repeat(43)]).status).toBe(5);
    expect(keyhold(k, ['key', 'unassign', 'bad/scope', a.fingerprint]).status).toBe(2);
    expect(scopesOf(k, a.fingerprint)).toEqual(['api']);
  });

  it('unassigning the last scope keeps the key (no scopes) and the scope disappears', () => {
    expect(keyhold(k, ['key', 'unassign', 'api', a.fingerprint]).status).toBe(0);
    expect(scopesOf(k, a.fingerprint)).toEqual([]);
    expect(scopeNames(k)).not.toContain('api');
    expect(keyhold(k, ['key', 'pub', 'api']).status).toBe(5);
    // it can be assigned again
    expect(keyhold(k, ['key', 'assign', 'api', a.fingerprint]).status).toBe(0);
    expect(scopesOf(k, a.fingerprint)).toEqual(['api']);
  });

  it('rm deletes a key from the vault and every scope; rm again → 5; assign after rm → 5', () => {
    expect(scopesOf(k, b.fingerprint)).toEqual(['ops', 'web']);
    const doc = JSON.parse(keyholdOk(k, ['key', 'rm', b.fingerprint, '--json']));
    expect(doc).toMatchObject({ fingerprint: b.fingerprint });
    expect(scopesOf(k, b.fingerprint)).toBeUndefined();
    expect(list(k).map((key) => key.comment)).toEqual(['key-a']);
    expect(scopeNames(k)).toEqual(['api']);
    expect(keyhold(k, ['key', 'rm', b.fingerprint]).status).toBe(5);
    expect(keyhold(k, ['key', 'assign', 'web', b.fingerprint]).status).toBe(5);
    expect(keyhold(k, ['key', 'pub', 'ops']).status).toBe(5);
  });

  it('rm accepts the fingerprint without the SHA256: prefix', () => {
    const c = generate(k, 'tmp', 'key-c');
    expect(keyhold(k, ['key', 'rm', c.fingerprint.slice('SHA256:'.length)]).status).toBe(0);
    expect(scopesOf(k, c.fingerprint)).toBeUndefined();
  });

  it('missing arguments are usage errors (2)', () => {
    expect(keyhold(k, ['key', 'rm']).status).toBe(2);
    expect(keyhold(k, ['key', 'assign', 'web']).status).toBe(2);
    expect(keyhold(k, ['key', 'unassign']).status).toBe(2);
  });
});

describe('key generate options', () => {
  let k: KeyholdEnv;
  beforeAll(() => {
    k = freshVault();
  });

  it('types and sizes', () => {
    expect(generate(k, 'g', 'ed', ['--type', 'ed25519'])).toMatchObject({ type: 'ed25519', bits: 256 });
    expect(generate(k, 'g', 'ec', ['--type', 'ecdsa', '--bits', '521'])).toMatchObject({ type: 'ecdsa', bits: 521 });
    expect(generate(k, 'g', 'ec-default', ['--type', 'ecdsa'])).toMatchObject({ type: 'ecdsa', bits: 256 });
    expect(generate(k, 'g', 'rsa', ['--type', 'rsa', '--bits', '2048'])).toMatchObject({ type: 'rsa', bits: 2048 });
    const line = keyholdOk(k, ['key', 'generate', 'g', '--comment', 'plain line']);
    expect(line).toMatch(/^ssh-ed25519 [A-Za-z0-9+/=]+ plain line\n$/);
  });

  it('bad sizes and types are usage errors and store nothing', () => {
    const before = list(k);
    for (const args of [
      ['--type', 'rsa', '--bits', '1024'],
      ['--type', 'rsa', '--bits', '16392'],
      ['--type', 'ecdsa', '--bits', '255'],
      ['--type', 'ed25519', '--bits', '512'],
      ['--type', 'dsa'],
    ]) {
      const r = keyhold(k, ['key', 'generate', 'g', ...args]);
      expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(/^keyhold: /);
      expect(r.stderr).not.toMatch(/^\s+at /m);
    }
    expect(list(k)).toEqual(before);
  });

  it('an invalid choice (--type dsa) is reported as one `keyhold: <msg> (<hint>)` line', () => {
    const r = keyhold(k, ['key', 'generate', 'g', '--type', 'dsa']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^keyhold: [^\n]+ \([^\n]+\)\n$/);
  });
});

describe('the vault file holds no plaintext', () => {
  it('vault.db (and its -wal) hold neither the SQLite header, the public blobs (raw or base64) nor the comments; vault.db.keys holds no passphrase', async () => {
    const k = freshVault();
    keyholdOk(k, ['key', 'generate', 'seed', '--comment', 'seed']);
    // A daemon holding the vault open keeps the WAL file in place for the writes below.
    const serve = await startServe(k);
    const marker = `zq-distinctive-comment-${Math.random().toString(36).slice(2)}`;
    const lines = [
      keyholdOk(k, ['key', 'generate', 'web', '--comment', `${marker}-ed`]),
      keyholdOk(k, ['key', 'generate', 'web', '--type', 'ecdsa', '--comment', `${marker}-ec`]),
      keyholdOk(k, ['key', 'generate', 'web', '--type', 'rsa', '--bits', '2048', '--comment', `${marker}-rsa`]),
    ];
    const blobs = lines.map((l) => Buffer.from(l.split(' ')[1]!, 'base64'));
    const checkFile = (path: string) => {
      const bytes = readFileSync(path);
      expect(bytes.length).toBeGreaterThan(0);
      expect(bytes.subarray(0, 16).toString('latin1')).not.toBe('SQLite format 3\0');
      expect(bytes.includes('SQLite format 3')).toBe(false);
      for (const [i, blob] of blobs.entries()) {
        expect(bytes.includes(blob), `${path} holds public blob ${i}`).toBe(false);
        // a distinctive part of the key material too (the last 32 bytes: the key itself)
        expect(bytes.includes(blob.subarray(blob.length - 32)), `${path} holds key bytes ${i}`).toBe(false);
        expect(bytes.includes(blob.toString('base64')), `${path} holds base64 blob ${i}`).toBe(false);
      }
      expect(bytes.includes(marker), `${path} holds the comment`).toBe(false);
      expect(bytes.includes(Buffer.from(marker, 'utf16le')), `${path} holds the comment (utf16)`).toBe(false);
      expect(bytes.includes('key_scopes')).toBe(false); // the schema is not in the clear either
      expect(bytes.includes(k.passphrase)).toBe(false);
    };
    const wal = `${k.vault}-wal`;
    expect(existsSync(wal), 'the WAL file exists while the daemon holds the vault').toBe(true);
    expect(readFileSync(wal).length).toBeGreaterThan(0);
    checkFile(k.vault);
    checkFile(wal);
    // after the daemon stops (checkpoint into vault.db) the main file is still opaque
    await serve.stop();
    checkFile(k.vault);
    if (existsSync(wal)) checkFile(wal);
    const keys = readFileSync(`${k.vault}.keys`);
    expect(keys.includes(k.passphrase)).toBe(false);
    expect(keys.includes(marker)).toBe(false);
    // and the key file is the versioned JSON of the contract
    const doc = JSON.parse(keys.toString()) as { version: number; factors: unknown[] };
    expect(doc.version).toBe(1);
    expect(doc.factors.length).toBe(1);
  });
});
