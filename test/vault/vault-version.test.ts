// The version counter seen across connections, and the key cache rebuilt only when it moves.
import { describe, expect, it } from 'vitest';
import Database from 'better-sqlite3-multiple-ciphers';
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { formatError, KeyholdError } from '../../src/errors.js';
import { KeyCache } from '../../src/vault/key-cache.js';
import { parseKeyring } from '../../src/vault/keyring.js';
import { unwrapWithPassphrase } from '../../src/unlock/prove.js';
import { Vault } from '../../src/vault/vault.js';
import { tempVaults } from '../helpers/temp-vaults.js';

const PASS = 'vault unit passphrase';
const pass = async () => Buffer.from(PASS);

const vaults = tempVaults('keyhold-vault-unit-');

async function twoConnections(): Promise<[Vault, Vault]> {
  const a = await Vault.create(vaults.paths, Buffer.from(PASS));
  const b = await Vault.open(vaults.paths, pass);
  vaults.closeAfter(a, b);
  return [a, b];
}

const ed25519 = () => generateKeyPairSync('ed25519').privateKey;

describe('Vault.observedVersion', () => {
  it('stays put while nothing changes, also across reads by another connection', async () => {
    const [a, b] = await twoConnections();
    const v0 = a.observedVersion();
    expect(a.observedVersion()).toBe(v0);
    b.listKeys();
    b.scopes();
    expect(a.observedVersion()).toBe(v0);
  });

  it('moves when another Vault instance on the same file commits', async () => {
    const [a, b] = await twoConnections();
    const v0 = a.observedVersion();
    const added = b.addKey('web', ed25519(), 'from b');
    const v1 = a.observedVersion();
    expect(v1).toBeGreaterThan(v0);
    expect(v1).toBe(b.version());
    b.assign('api', added.fingerprint);
    const v2 = a.observedVersion();
    expect(v2).toBeGreaterThan(v1);
    b.unassign('api', added.fingerprint);
    const v3 = a.observedVersion();
    expect(v3).toBeGreaterThan(v2);
    b.removeKey(added.fingerprint);
    const v4 = a.observedVersion();
    expect(v4).toBeGreaterThan(v3);
    expect(a.observedVersion()).toBe(v4);
  });

  it("moves with the instance's own commits, and the other sees them", async () => {
    const [a, b] = await twoConnections();
    const v0 = a.observedVersion();
    const bv0 = b.observedVersion();
    a.addKey('web', ed25519(), 'from a');
    expect(a.observedVersion()).toBeGreaterThan(v0);
    expect(b.observedVersion()).toBeGreaterThan(bv0);
    expect(b.observedVersion()).toBe(a.observedVersion());
  });

  it('a failed change (not found) does not move it', async () => {
    const [a, b] = await twoConnections();
    const added = a.addKey('web', ed25519(), 'k');
    const v0 = a.observedVersion();
    const bv0 = b.observedVersion();
    expect(() => b.unassign('other', added.fingerprint)).toThrow(KeyholdError);
    expect(() => b.removeKey('SHA256:' + 'A'.repeat(43))).toThrow(KeyholdError);
    expect(() => b.assign('web', 'SHA256:' + 'A'.repeat(43))).toThrow(KeyholdError);
    expect(a.observedVersion()).toBe(v0);
    expect(b.observedVersion()).toBe(bv0);
  });

  it('is seen by a connection opened later (persisted in the vault)', async () => {
    const [a] = await twoConnections();
    a.addKey('web', ed25519(), 'k');
    a.addKey('web', ed25519(), 'k2');
    const v = a.observedVersion();
    const c = await Vault.open(vaults.paths, pass);
    vaults.closeAfter(c);
    expect(c.observedVersion()).toBe(v);
    expect(c.version()).toBe(v);
  });
});

describe('KeyCache.refresh', () => {
  it('is true on first build, false while nothing changed, true after a change by another connection', async () => {
    const [daemon, cli] = await twoConnections();
    daemon.addKey('web', ed25519(), 'first');
    const cache = new KeyCache(daemon);
    expect(cache.refresh()).toBe(true);
    expect(cache.refresh()).toBe(false);
    expect(cache.refresh()).toBe(false);
    expect(cache.scope('web').identities.map((i) => i.comment)).toEqual(['first']);
    cli.listKeys(); // a read is not a change
    expect(cache.refresh()).toBe(false);
    cli.addKey('web', ed25519(), 'second');
    expect(cache.refresh()).toBe(true);
    expect(cache.refresh()).toBe(false);
    expect(cache.scope('web').identities.map((i) => i.comment)).toEqual(['first', 'second']);
  });

  it('reuses the KeyObject of unchanged keys (same object identity) and drops removed ones', async () => {
    const [daemon, cli] = await twoConnections();
    const a = daemon.addKey('web', ed25519(), 'a');
    const cache = new KeyCache(daemon);
    cache.refresh();
    const blobA = a.publicBlob.toString('latin1');
    const keyA = cache.scope('web').byBlob.get(blobA)!.key;
    expect(keyA).toBeDefined();

    const b = cli.addKey('web', ed25519(), 'b');
    expect(cache.refresh()).toBe(true);
    expect(cache.scope('web').byBlob.get(blobA)!.key).toBe(keyA);
    const keyB = cache.scope('web').byBlob.get(b.publicBlob.toString('latin1'))!.key;
    expect(keyB).not.toBe(keyA);

    // assigned to a second scope: one parsed key shared by both scopes
    cli.assign('api', a.fingerprint);
    expect(cache.refresh()).toBe(true);
    expect(cache.scope('api').byBlob.get(blobA)!.key).toBe(keyA);
    expect(cache.scope('web').byBlob.get(blobA)!.key).toBe(keyA);
    expect(cache.scopeNames().sort()).toEqual(['api', 'web']);

    cli.unassign('web', b.fingerprint);
    expect(cache.refresh()).toBe(true);
    expect(cache.scope('web').byBlob.has(b.publicBlob.toString('latin1'))).toBe(false);
    expect(cache.scope('web').byBlob.get(blobA)!.key).toBe(keyA);

    cli.removeKey(a.fingerprint);
    expect(cache.refresh()).toBe(true);
    expect(cache.scope('web').byBlob.size).toBe(0);
    expect(cache.scope('api').identities).toEqual([]);
    expect(cache.scopeNames()).toEqual([]);
    expect(cache.refresh()).toBe(false);
  });

  it('a cached key signs as the stored key (the cache parses the vault key correctly)', async () => {
    const [daemon] = await twoConnections();
    const pair = generateKeyPairSync('ed25519');
    const added = daemon.addKey('web', pair.privateKey, 'sig');
    const cache = new KeyCache(daemon);
    cache.refresh();
    const cached = cache.scope('web').byBlob.get(added.publicBlob.toString('latin1'))!;
    const { sign, verify } = await import('node:crypto');
    const data = Buffer.from('payload');
    expect(verify(null, data, pair.publicKey, sign(null, data, cached.key))).toBe(true);
    expect(cached.fingerprint).toBe(added.fingerprint);
  });
});

describe('vault versions on disk', () => {
  it('a database schema newer than this keyhold is refused with an error naming an upgrade', async () => {
    const v = await Vault.create(vaults.paths, Buffer.from(PASS));
    v.close();
    const masterKey = await unwrapWithPassphrase(parseKeyring(readFileSync(vaults.paths.keys, 'utf8')), Buffer.from(PASS));
    const db = new Database(vaults.paths.db);
    db.pragma(`cipher = 'sqlcipher'`);
    db.pragma('legacy = 4');
    db.pragma(`key = "x'${masterKey.toString('hex')}'"`);
    db.pragma('user_version = 99');
    db.close();
    let err: unknown;
    try {
      vaults.closeAfter(await Vault.open(vaults.paths, pass));
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KeyholdError);
    expect(formatError(err as KeyholdError)).toMatch(/upgrade/i);
  });

  it('a key file of an unknown version is refused by Vault.open naming an upgrade', async () => {
    const v = await Vault.create(vaults.paths, Buffer.from(PASS));
    v.close();
    const { writeFileSync } = await import('node:fs');
    const doc = JSON.parse(readFileSync(vaults.paths.keys, 'utf8'));
    writeFileSync(vaults.paths.keys, JSON.stringify({ ...doc, version: 2 }));
    let asked = false;
    let err: unknown;
    try {
      vaults.closeAfter(
        await Vault.open(vaults.paths, async () => {
          asked = true;
          return Buffer.from(PASS);
        }),
      );
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KeyholdError);
    expect(formatError(err as KeyholdError)).toMatch(/upgrade/i);
    expect(asked).toBe(false); // refused before asking for a passphrase
  });
});
