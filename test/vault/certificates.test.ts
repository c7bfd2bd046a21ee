// Certificates in the vault (schema 6): stored per scope with their key kept once in `keys`,
// listed apart from the key's plain assignment, removed alone, deleted with their key; a
// certificate that does not verify or certifies another key is refused; the key cache maps a
// certificate blob to the same parsed key as the plain blob, parsed once per vault version.
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { authorizedKeyLine, describeKey } from '../../src/agent-protocol/public-key.js';
import { KeyholdError } from '../../src/errors.js';
import { SCHEMA_VERSION } from '../../src/vault/database.js';
import { KeyCache } from '../../src/vault/key-cache.js';
import { Vault } from '../../src/vault/vault.js';
import { NO_CONSTRAINTS, storedConstraints } from '../../src/policy/ssh-add-constraints.js';
import { signCertificate } from '../helpers/certificates.js';
import { tempVaults } from '../helpers/temp-vaults.js';

const PASS = 'vault certificate passphrase';
const vaults = tempVaults('keyhold-vault-certs-');

async function newVault(): Promise<Vault> {
  const vault = await Vault.create(vaults.newPaths(), Buffer.from(PASS));
  vaults.closeAfter(vault);
  return vault;
}

const caDir = mkdtempSync(join(vaults.root, 'ca-'));
execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(caDir, 'ca')]);

/** A certificate of `key` by the test CA, made by ssh-keygen. */
function certify(key: KeyObject, keyId: string, options: { host?: boolean } = {}): Buffer {
  const pub = join(caDir, `${keyId}.pub`);
  writeFileSync(pub, authorizedKeyLine(describeKey(key).blob, keyId) + '\n');
  return signCertificate(join(caDir, 'ca'), pub, { keyId, principals: ['p'], ...options }).blob;
}

describe('certificates in the vault', () => {
  it('schema 6 has the certificates table with the constraint columns', async () => {
    const vault = await newVault();
    expect(SCHEMA_VERSION).toBeGreaterThanOrEqual(6);
    const db = (vault as unknown as { db: { prepare(sql: string): { all(): { name: string }[] } } }).db;
    expect(db.prepare('PRAGMA table_info(certificates)').all().map((c) => c.name)).toEqual([
      'id', 'scope', 'key_id', 'blob', 'comment', 'assigned_at', 'expires_at', 'confirm', 'destinations',
    ]);
  });

  it('a certificate is stored in its scope with its key (kept once), listed and served apart from the plain assignment', async () => {
    const vault = await newVault();
    const key = generateKeyPairSync('ed25519').privateKey;
    const cert = certify(key, 'c1');
    const plain = describeKey(key).blob;
    const first = vault.addCertificate('web', key, cert, 'with cert');
    expect(first).toMatchObject({ keyCreated: true, created: true });
    expect(vault.addCertificate('web', key, cert, 'again')).toMatchObject({ keyCreated: false, created: false });
    vault.addCertificate('api', key, cert, 'api copy');
    const [record] = vault.listKeys();
    expect(record!.scopes).toEqual([]);
    expect(record!.certificates.map((c) => [c.scope, c.comment, c.blob.equals(cert)])).toEqual([['api', 'api copy', true], ['web', 'with cert', true]]);
    expect(vault.listKeys('web')).toHaveLength(1);
    expect(vault.scopes().map((s) => [s.name, s.keys])).toEqual([['api', 1], ['web', 1]]);

    vault.addKey('web', key, 'plain');
    const cache = new KeyCache(vault);
    cache.refresh();
    const web = cache.scope('web');
    expect(web.identities.map((i) => (i.keyBlob.equals(cert) ? 'cert' : i.keyBlob.equals(plain) ? 'plain' : '?')).sort()).toEqual(['cert', 'plain']);
    const byCert = web.byBlob.get(cert.toString('latin1'))!;
    const byPlain = web.byBlob.get(plain.toString('latin1'))!;
    // The same parsed key; the certificate entry says which certificate for the audit line.
    expect(byCert.key).toBe(byPlain.key);
    expect(byCert.fingerprint).toBe(byPlain.fingerprint);
    expect(byCert.certificate).toEqual({ key_id: 'c1', serial: '0' });
    expect(byPlain.certificate).toBeUndefined();
    // A rebuild for another change keeps the parsed key and the certificate entry.
    vault.assign('other', byPlain.fingerprint);
    expect(cache.refresh()).toBe(true);
    expect(cache.scope('web').byBlob.get(cert.toString('latin1'))).toBe(byCert);

    vault.removeCertificate('web', cert);
    expect(() => vault.removeCertificate('web', cert)).toThrow(KeyholdError);
    cache.refresh();
    expect(cache.scope('web').identities.map((i) => i.keyBlob.equals(plain))).toEqual([true]);
    expect(cache.scope('api').identities.map((i) => i.keyBlob.equals(cert))).toEqual([true]);
    vault.removeKey(byPlain.fingerprint);
    expect(vault.listKeys()).toEqual([]);
    cache.refresh();
    expect(cache.scopeNames()).toEqual([]);
  });

  it('refused: a certificate of another key, a forged one, garbage', async () => {
    const vault = await newVault();
    const key = generateKeyPairSync('ed25519').privateKey;
    const other = generateKeyPairSync('ed25519').privateKey;
    const cert = certify(key, 'c2');
    expect(() => vault.addCertificate('web', other, cert, '')).toThrow(/does not certify this key/);
    const forged = Buffer.from(cert);
    const at = forged.indexOf(Buffer.from('c2'));
    forged[at] = forged[at]! ^ 0x01;
    expect(() => vault.addCertificate('web', key, forged, '')).toThrow(/signature does not verify/);
    expect(() => vault.addCertificate('web', key, Buffer.from('garbage'), '')).toThrow(/not a valid certificate/);
    expect(vault.listKeys()).toEqual([]);
  });

  it('ssh-add constraints of a certificate: stored on its row apart from the key\'s, replaced on re-add, compiled per identity blob, swept, shown', async () => {
    const vault = await newVault();
    const key = generateKeyPairSync('ed25519').privateKey;
    const cert = certify(key, 'constrained');
    const plain = describeKey(key).blob;
    const now = Date.now();
    const lifetime = (seconds: number, confirm = false) => storedConstraints({ lifetimeSeconds: seconds, confirm, destinations: [] }, now);
    // As ssh-add sends them: the key, then its certificate, alike.
    const { fingerprint } = vault.addKey('web', key, 'k', lifetime(2, true));
    expect(vault.addCertificate('web', key, cert, 'k', lifetime(2, true)).created).toBe(true);
    expect(vault.scopeConstraints('web')).toEqual([
      { fingerprint, comment: 'k', constraints: lifetime(2, true) },
      { fingerprint, comment: 'k', certificate: { key_id: 'constrained', serial: '0' }, constraints: lifetime(2, true) },
    ]);
    expect(vault.listKeys('web')[0]!.certificates).toMatchObject([{ scope: 'web', expires: new Date(now + 2000).toISOString() }]);

    // A re-add of the certificate alone replaces its constraints only; a plain re-add clears them.
    expect(vault.addCertificate('web', key, cert, 'k', lifetime(60)).created).toBe(false);
    const cache = new KeyCache(vault);
    cache.refresh();
    const web = cache.scope('web');
    expect(web.constraints.get(plain.toString('latin1'))).toMatchObject({ confirm: true, expiresAt: now + 2000 });
    expect(web.constraints.get(cert.toString('latin1'))).toMatchObject({ confirm: false, expiresAt: now + 60_000 });
    vault.addCertificate('web', key, cert, 'k', NO_CONSTRAINTS);
    expect(vault.scopeConstraints('web').filter((c) => c.certificate)).toEqual([]);
    // keyhold's own add (no constraints given) leaves a certificate's as they are.
    vault.addCertificate('web', key, cert, 'k', lifetime(3));
    vault.addCertificate('web', key, cert, 'k');
    expect(vault.nextExpiry()).toBe(new Date(now + 2000).toISOString());

    // The sweep: the key's assignment at 2 s, the certificate at 3 s, each said apart.
    expect(vault.expireAssignments(new Date(now + 2000))).toEqual([{ scope: 'web', fingerprint }]);
    expect(vault.nextExpiry()).toBe(new Date(now + 3000).toISOString());
    expect(vault.expireAssignments(new Date(now + 3000))).toEqual([{ scope: 'web', fingerprint, certificate: { key_id: 'constrained', serial: '0' } }]);
    expect(vault.listKeys()).toMatchObject([{ fingerprint, scopes: [], certificates: [] }]);
    expect(vault.nextExpiry()).toBeNull();
    expect(vault.scopes().find((s) => s.name === 'web')).toBeUndefined();
  });
});
