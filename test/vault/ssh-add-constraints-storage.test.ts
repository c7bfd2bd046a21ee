// ssh-add's constraints as the vault keeps them: with the assignment (schema 5), replaced by a
// re-add, dropped by unassign, swept when their lifetime ends, compiled by the key cache.
import { describe, expect, it } from 'vitest';
import Database from 'better-sqlite3-multiple-ciphers';
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseKeyring } from '../../src/vault/keyring.js';
import { unwrapWithPassphrase } from '../../src/unlock/prove.js';
import { Vault } from '../../src/vault/vault.js';
import { KeyCache } from '../../src/vault/key-cache.js';
import { SCHEMA_VERSION } from '../../src/vault/database.js';
import { describeKey } from '../../src/agent-protocol/public-key.js';
import { storedConstraints, NO_CONSTRAINTS } from '../../src/policy/ssh-add-constraints.js';
import { tempVaults } from '../helpers/temp-vaults.js';

const PASS = 'constraints storage passphrase';
const pass = async () => Buffer.from(PASS);
const vaults = tempVaults('keyhold-constraints-storage-');

async function rawDb(): Promise<Database.Database> {
  const masterKey = await unwrapWithPassphrase(parseKeyring(readFileSync(vaults.paths.keys, 'utf8')), Buffer.from(PASS));
  const db = new Database(vaults.paths.db);
  db.pragma(`cipher = 'sqlcipher'`);
  db.pragma('legacy = 4');
  db.pragma(`key = "x'${masterKey.toString('hex')}'"`);
  return db;
}

async function created(): Promise<Vault> {
  const vault = await Vault.create(vaults.paths, Buffer.from(PASS));
  vaults.closeAfter(vault);
  return vault;
}

const HOST = describeKey(generateKeyPairSync('ed25519').publicKey).blob;
const everything = (now: number) =>
  storedConstraints(
    { lifetimeSeconds: 60, confirm: true, destinations: [{ from: { user: null, hostname: null, hostKeys: [] }, to: { user: 'alice', hostname: 'host_a', hostKeys: [{ keyBlob: HOST, isCa: false }] } }] },
    now,
  );

describe('ssh-add constraints in the vault', () => {
  it('a vault at schema 4 migrates (5, then 6): its assignments keep their keys, unconstrained', async () => {
    const a = await created();
    const key = generateKeyPairSync('ed25519').privateKey;
    const { fingerprint } = a.addKey('web', key, 'old');
    a.close();
    const db = await rawDb();
    // A vault as schema 4 left it: neither 5's columns nor 6's certificates table.
    db.exec('ALTER TABLE key_scopes DROP COLUMN expires_at; ALTER TABLE key_scopes DROP COLUMN confirm; ALTER TABLE key_scopes DROP COLUMN destinations');
    db.exec('DROP TABLE certificates');
    db.pragma('user_version = 4');
    db.close();
    const b = await Vault.open(vaults.paths, pass);
    vaults.closeAfter(b);
    expect(b.listKeys('web').map((k) => k.fingerprint)).toEqual([fingerprint]);
    expect(b.scopeConstraints('web')).toEqual([]);
    const check = await rawDb();
    expect(check.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    check.close();
  });

  it('stored with the assignment; a re-add replaces them, a plain re-add clears them; keyhold import leaves them', async () => {
    const vault = await created();
    const key = generateKeyPairSync('ed25519').privateKey;
    const now = Date.now();
    const { fingerprint } = vault.addKey('web', key, 'laptop', everything(now));
    expect(vault.scopeConstraints('web')).toEqual([{ fingerprint, comment: 'laptop', constraints: everything(now) }]);
    expect(vault.listKeys('web')[0]!.expires).toEqual({ web: new Date(now + 60_000).toISOString() });
    expect(vault.scopes().find((s) => s.name === 'web')).toMatchObject({ keys: 1, constrained: 1, policy: false });
    // Another scope's assignment of the same key is its own.
    vault.addKey('ops', key, 'laptop');
    expect(vault.scopeConstraints('ops')).toEqual([]);
    // keyhold key import of a key already there: the assignment stays as ssh-add left it.
    vault.addKey('web', key, 'laptop');
    expect(vault.scopeConstraints('web')).toHaveLength(1);
    // ssh-add -c only: replaces all three.
    vault.addKey('web', key, 'laptop', storedConstraints({ lifetimeSeconds: null, confirm: true, destinations: [] }, now));
    expect(vault.scopeConstraints('web')[0]!.constraints).toEqual({ expiresAt: null, confirm: true, destinations: null });
    // A plain ssh-add: none left.
    vault.addKey('web', key, 'laptop', NO_CONSTRAINTS);
    expect(vault.scopeConstraints('web')).toEqual([]);
    expect(vault.scopes().find((s) => s.name === 'web')).not.toHaveProperty('constrained');
  });

  it('unassign drops them with the assignment; a later add starts without', async () => {
    const vault = await created();
    const key = generateKeyPairSync('ed25519').privateKey;
    const { fingerprint } = vault.addKey('web', key, 'k', everything(Date.now()));
    vault.unassign('web', fingerprint);
    vault.assign('web', fingerprint);
    expect(vault.scopeConstraints('web')).toEqual([]);
  });

  it('expireAssignments removes exactly the assignments due, and moves the version only when it does', async () => {
    const vault = await created();
    const now = Date.now();
    const soon = vault.addKey('web', generateKeyPairSync('ed25519').privateKey, 'soon', storedConstraints({ lifetimeSeconds: 2, confirm: false, destinations: [] }, now));
    const later = vault.addKey('web', generateKeyPairSync('ed25519').privateKey, 'later', storedConstraints({ lifetimeSeconds: 60, confirm: false, destinations: [] }, now));
    vault.addKey('web', generateKeyPairSync('ed25519').privateKey, 'never');
    expect(vault.nextExpiry()).toBe(new Date(now + 2000).toISOString());
    const version = vault.version();
    expect(vault.expireAssignments(new Date(now + 1999))).toEqual([]);
    expect(vault.version()).toBe(version);
    expect(vault.expireAssignments(new Date(now + 2000))).toEqual([{ scope: 'web', fingerprint: soon.fingerprint }]);
    expect(vault.version()).toBe(version + 1);
    expect(vault.listKeys('web').map((k) => k.comment).sort()).toEqual(['later', 'never']);
    expect(vault.listKeys().length).toBe(3); // the key stays in the vault
    expect(vault.nextExpiry()).toBe(new Date(now + 60_000).toISOString());
    expect(later.fingerprint).toBeTruthy();
  });

  it('the key cache compiles them per scope, keyed by the public blob, with the earliest expiry', async () => {
    const vault = await created();
    const now = Date.now();
    const key = generateKeyPairSync('ed25519').privateKey;
    const added = vault.addKey('web', key, 'k', everything(now));
    vault.addKey('ops', key, 'k');
    const cache = new KeyCache(vault);
    cache.refresh();
    const web = cache.scope('web');
    const compiled = web.constraints.get(added.publicBlob.toString('latin1'))!;
    expect(compiled).toMatchObject({ confirm: true, expiresAt: now + 60_000 });
    expect(compiled.destinations).toHaveLength(1);
    expect(web.nextExpiry).toBe(now + 60_000);
    expect(cache.scope('ops').constraints.size).toBe(0);
    expect(cache.nextExpiry()).toBe(now + 60_000);
  });
});
