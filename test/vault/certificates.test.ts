// Certificates in the vault (schema 6): stored per scope with their key kept once in `keys`,
// listed apart from the key's plain assignment, removed alone, deleted with their key; a
// certificate that does not verify or certifies another key is refused; the key cache maps a
// certificate blob to the same parsed key as the plain blob, parsed once per vault version.
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { authorizedKeyLine, describeKey } from '../../src/agent-protocol/public-key.js';
import { KeyholdError } from '../../src/errors.js';
import { SCHEMA_VERSION } from '../../src/vault/database.js';
import { KeyCache } from '../../src/vault/key-cache.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';
import { signCertificate } from '../helpers/certificates.js';

process.env.KEYHOLD_KDF_LOG2N = '14';
const PASS = 'vault certificate passphrase';
const root = mkdtempSync(join(tmpdir(), 'keyhold-vault-certs-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let open: Vault[] = [];
afterEach(() => {
  for (const v of open) v.close();
  open = [];
});

async function newVault(): Promise<Vault> {
  const vault = await Vault.create(vaultPaths(join(mkdtempSync(join(root, 'v-')), 'vault.db')), Buffer.from(PASS));
  open.push(vault);
  return vault;
}

const caDir = mkdtempSync(join(root, 'ca-'));
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
});
