// Policies in the vault: stored and checked again there, versioned with the counter, compiled once
// per version by the PolicyCache, and a vault from before policies migrates on open.
import { describe, expect, it } from 'vitest';
import Database from 'better-sqlite3-multiple-ciphers';
import { readFileSync } from 'node:fs';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { NO_POLICY_COMPILED, PolicyCache } from '../../src/policy/policy-cache.js';
import type { PolicyDocument } from '../../src/policy/policy.js';
import { parseKeyring } from '../../src/vault/keyring.js';
import { unwrapWithPassphrase } from '../../src/unlock/prove.js';
import { SCHEMA_VERSION } from '../../src/vault/database.js';
import { Vault } from '../../src/vault/vault.js';
import { localVaultApi } from '../../src/vault/api.js';
import { parseControlRequest } from '../../src/control/requests.js';
import { tempVaults } from '../helpers/temp-vaults.js';

const PASS = 'policy storage passphrase';
const pass = async () => Buffer.from(PASS);

const vaults = tempVaults('keyhold-policy-storage-');

const FP = 'SHA256:' + 'A'.repeat(43);
const gitOnly: PolicyDocument = {
  default: 'deny',
  rules: [
    { action: 'allow', purpose: 'ssh-login', hosts: [{ name: 'github.com', fingerprints: [FP] }], users: ['git'] },
    { action: 'confirm', purpose: 'sshsig', namespaces: ['git'], remember: '10m' },
  ],
};
const login = { purpose: 'ssh-login' as const, key: FP, user: 'git', hostKey: FP, forwarded: false };

function exitOf(fn: () => unknown): number | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof KeyholdError ? err.exitCode : -1;
  }
  return undefined;
}

async function rawDb(): Promise<Database.Database> {
  const masterKey = await unwrapWithPassphrase(parseKeyring(readFileSync(vaults.paths.keys, 'utf8')), Buffer.from(PASS));
  const db = new Database(vaults.paths.db);
  db.pragma(`cipher = 'sqlcipher'`);
  db.pragma('legacy = 4');
  db.pragma(`key = "x'${masterKey.toString('hex')}'"`);
  return db;
}

describe('policies in the vault', () => {
  it('set, get, replace, list, remove; each change moves the version seen by another connection', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    const b = await Vault.open(vaults.paths, pass);
    vaults.closeAfter(a, b);
    const v0 = b.observedVersion();
    const set = a.setPolicy('web', gitOnly, 'default = "deny"\n');
    expect(set).toMatchObject({ scope: 'web', document: gitOnly, source: 'default = "deny"\n' });
    const v1 = b.observedVersion();
    expect(v1).toBeGreaterThan(v0);
    expect(b.getPolicy('web')).toEqual(set);
    expect(b.scopes()).toEqual([{ name: 'web', keys: 0, secrets: 0, tokens: 0, policy: true }]);

    a.setPolicy('web', { default: 'allow', rules: [] }, '');
    expect(b.observedVersion()).toBeGreaterThan(v1);
    expect(b.getPolicy('web').document).toEqual({ default: 'allow', rules: [] });
    expect(b.policies().map((r) => r.scope)).toEqual(['web']);

    const v2 = b.observedVersion();
    a.removePolicy('web');
    expect(b.observedVersion()).toBeGreaterThan(v2);
    expect(exitOf(() => b.getPolicy('web'))).toBe(EXIT.NOT_FOUND);
    const v3 = b.observedVersion();
    expect(exitOf(() => a.removePolicy('web'))).toBe(EXIT.NOT_FOUND);
    expect(b.observedVersion()).toBe(v3);
    expect(b.scopes()).toEqual([]);
  });

  it('refuses a document the schema or the rules refuse (exit 2), whoever sends it, and stores nothing', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    vaults.closeAfter(a);
    const bad: unknown[] = [
      { default: 'maybe', rules: [] },
      { default: 'deny', rules: [{ action: 'allow', purpose: 'ssh-login', namespaces: ['git'] }] },
      { default: 'deny', rules: [{ action: 'allow', purpose: 'sshsig', hosts: [{ name: 'x', fingerprints: [FP] }] }] },
      { default: 'deny', rules: [{ action: 'allow', remember: '1m' }] },
      { default: 'deny', rules: [{ action: 'allow', keys: ['not-a-fingerprint'] }] },
      { default: 'deny', rules: [{ action: 'allow', users: [] }] },
      { default: 'deny', rules: [{ action: 'allow', rate: '0/m' }] },
      { default: 'deny', rules: [], extra: 1 },
    ];
    for (const doc of bad) expect(exitOf(() => a.setPolicy('web', doc as PolicyDocument, '')), JSON.stringify(doc)).toBe(EXIT.USAGE);
    expect(exitOf(() => a.setPolicy('web', gitOnly, 'x'.repeat(1024 * 1024 + 1)))).toBe(EXIT.USAGE);
    expect(exitOf(() => a.setPolicy('bad scope', gitOnly, ''))).toBe(EXIT.USAGE);
    expect(a.policies()).toEqual([]);
    let message = '';
    try {
      a.setPolicy('web', { default: 'deny', rules: [{ action: 'allow' }, { action: 'allow', purpose: 'other', users: ['git'] }] }, '');
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toMatch(/rule 2: users: only a ssh-login request has users/);
  });

  it('VaultApi audits policy-set and policy-removed; the control schema takes a document and refuses a bad one', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    vaults.closeAfter(a);
    const api = localVaultApi(a, { kind: 'process', pid: process.pid, uid: process.getuid!(), exe: null });
    await api.setPolicy('web', gitOnly, 'src');
    expect((await api.getPolicy('web')).document).toEqual(gitOnly);
    await api.removePolicy('web');
    a.close();
    const log = readFileSync(vaults.paths.audit, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(log.filter((e) => String(e.event).startsWith('policy-')).map((e) => [e.event, e.scope, e.rules])).toEqual([
      ['policy-set', 'web', 2],
      ['policy-removed', 'web', undefined],
    ]);
    const call = (args: unknown) => ({ op: 'call', vaultId: 'v', method: 'setPolicy', args });
    expect(parseControlRequest(call(['web', gitOnly, 'src']))).toMatchObject({ method: 'setPolicy' });
    expect(() => parseControlRequest(call(['web', { default: 'deny', rules: [{ action: 'nope' }] }, 'src']))).toThrow(/setPolicy: document/);
    expect(() => parseControlRequest(call(['web', gitOnly, 'x'.repeat(1024 * 1024 + 1)]))).toThrow(/setPolicy: source/);
  });

  it('a vault at schema 3 (before policies) migrates when opened, and keeps its keys', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    const { fingerprint } = a.addKey('web', (await import('node:crypto')).generateKeyPairSync('ed25519').privateKey, 'old');
    a.close();
    const db = await rawDb();
    // What later migrations added goes too: this is a vault as schema 3 left it.
    db.exec('DROP TABLE policies; DROP TABLE certificates');
    db.exec('ALTER TABLE key_scopes DROP COLUMN expires_at; ALTER TABLE key_scopes DROP COLUMN confirm; ALTER TABLE key_scopes DROP COLUMN destinations');
    db.pragma('user_version = 3');
    db.close();
    const b = await Vault.open(vaults.paths, pass);
    vaults.closeAfter(b);
    expect(b.listKeys().map((k) => k.fingerprint)).toEqual([fingerprint]);
    b.setPolicy('web', gitOnly, '');
    expect(b.getPolicy('web').document).toEqual(gitOnly);
    const check = await rawDb();
    expect(check.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    check.close();
  });
});

describe('PolicyCache', () => {
  it('compiles once per version; a scope without a policy is the shared inactive NO_POLICY', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    const b = await Vault.open(vaults.paths, pass);
    vaults.closeAfter(a, b);
    const cache = new PolicyCache(a);
    expect(cache.refresh()).toBe(true);
    expect(cache.refresh()).toBe(false);
    expect(cache.forScope('web')).toBe(NO_POLICY_COMPILED);
    expect(cache.forScope('web').active).toBe(false);

    b.setPolicy('web', gitOnly, '');
    expect(cache.refresh()).toBe(true);
    const web = cache.forScope('web');
    expect(web.active).toBe(true);
    expect(web.decide(login)).toEqual({ action: 'allow', rule: 0 });
    expect(web.decide({ ...login, user: 'root' })).toEqual({ action: 'deny', rule: null });
    expect(cache.refresh()).toBe(false);
    expect(cache.forScope('web')).toBe(web);
    expect(cache.forScope('other')).toBe(NO_POLICY_COMPILED);

    b.removePolicy('web');
    cache.refresh();
    expect(cache.forScope('web')).toBe(NO_POLICY_COMPILED);
    expect(cache.problems()).toEqual([]);
  });

  it('a damaged stored row fails closed (deny everything) and is reported by problems()', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    vaults.closeAfter(a);
    a.setPolicy('web', gitOnly, '');
    a.setPolicy('ops', { default: 'allow', rules: [] }, '');
    const db = await rawDb();
    db.prepare(`UPDATE policies SET document = ? WHERE scope = 'web'`).run('{"default":"allow","rules":[{"action":"allow","purpose":"ssh-login","namespaces":["x"]}]}');
    db.prepare(`UPDATE policies SET document = ? WHERE scope = 'ops'`).run('{not json');
    db.prepare(`UPDATE meta SET value = value + 1 WHERE name = 'version'`).run();
    db.close();
    const cache = new PolicyCache(a);
    cache.refresh();
    for (const scope of ['web', 'ops']) {
      expect(cache.forScope(scope).active).toBe(true);
      expect(cache.forScope(scope).decide(login)).toEqual({ action: 'deny', rule: null });
    }
    expect(cache.problems()).toEqual([
      expect.stringMatching(/scope ops is damaged \(not JSON\)/),
      expect.stringMatching(/scope web is damaged \(rule 1: namespaces: only a sshsig request/),
    ]);
    expect(exitOf(() => a.getPolicy('web'))).toBe(EXIT.ERROR);
  });

  it('keeps what it has when the vault cannot be read', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    vaults.closeAfter(a);
    a.setPolicy('web', gitOnly, '');
    let version = a.version();
    const cache = new PolicyCache(a, () => version);
    cache.refresh();
    const web = cache.forScope('web');
    a.close();
    version += 1;
    expect(cache.refresh()).toBe(false);
    expect(cache.forScope('web')).toBe(web);
  });

  it('refuses every scope until the policies could be read once (fail closed, not "no policy")', async () => {
    const a = await Vault.create(vaults.paths, Buffer.from(PASS));
    a.setPolicy('web', gitOnly, '');
    const cache = new PolicyCache(a, () => 1);
    a.close(); // the first read fails
    expect(cache.refresh()).toBe(false);
    expect(cache.loaded).toBe(false);
    for (const scope of ['web', 'no-policy-here']) {
      expect(cache.forScope(scope).active).toBe(true);
      expect(cache.forScope(scope).decide(login)).toEqual({ action: 'deny', rule: null });
    }
  });
});
