// writeKeyring parses what it is about to write: a keyring the reader would refuse is never
// written, so no change (from this process or through the daemon) can lock the vault for good.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { KeyholdError } from '../../src/errors.js';
import { enrollPassphrase } from '../../src/unlock/passphrase.js';
import { newVaultId, readKeyring, sealKeyring, withFactorAdded, writeKeyring, type Keyring } from '../../src/vault/keyring.js';

const dir = mkdtempSync(join(tmpdir(), 'keyhold-keyring-write-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('writeKeyring', () => {
  it('refuses a keyring the reader would refuse, leaves the file as it was, and quotes nothing', async () => {
    const path = join(dir, 'vault.db.keys');
    const masterKey = randomBytes(32);
    const first = await enrollPassphrase(Buffer.from('pw'), { log2n: 14, r: 8, p: 1 });
    const keyring = sealKeyring(newVaultId(), 'any', [first], masterKey);
    writeKeyring(path, keyring);
    const before = readFileSync(path);
    expect(readKeyring(path)).toEqual(keyring);

    const added = await enrollPassphrase(Buffer.from('pw2'), { log2n: 14, r: 8, p: 1 });
    const marker = 'zQxMark';
    const broken: Keyring[] = [
      withFactorAdded(keyring, masterKey, { ...added, factor: { ...added.factor, id: `pp-${marker}` } }),
      withFactorAdded(keyring, masterKey, { ...added, factor: { ...added.factor, type: marker } as never }),
      withFactorAdded(keyring, masterKey, { ...added, factor: { ...added.factor, kdf: { ...added.factor.kdf, log2n: 30 } } as never }),
      { ...keyring, vault_id: marker },
      { ...keyring, factors: [] },
    ];
    for (const next of broken) {
      let err: unknown;
      try {
        writeKeyring(path, next);
      } catch (e) {
        err = e;
      }
      expect(err, JSON.stringify(next).slice(0, 200)).toBeInstanceOf(KeyholdError);
      expect((err as KeyholdError).message).toMatch(/^refusing to write a vault key file the reader would refuse/);
      expect((err as KeyholdError).message).not.toContain(marker);
      expect(readFileSync(path).equals(before)).toBe(true);
    }
    // A good change still goes through.
    const good = withFactorAdded(keyring, masterKey, added);
    writeKeyring(path, good);
    expect(readKeyring(path).factors.map((f) => f.id)).toEqual([first.factor.id, added.factor.id]);
  });

  it('the reader names the field of a bad factor, not its value', () => {
    const path = join(dir, 'bad.keys');
    const keyring = JSON.parse(readFileSync(join(dir, 'vault.db.keys'), 'utf8')) as Keyring;
    (keyring.factors[1] as { created: unknown }).created = 5;
    writeFileSync(path, JSON.stringify(keyring), { mode: 0o600 });
    expect(() => readKeyring(path)).toThrow('vault key file is malformed: factors[1].created');
  });
});
