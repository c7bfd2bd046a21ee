// A wrong passphrase on an encrypted PEM or PKCS#8 file usually fails OpenSSL's padding check
// ("bad decrypt"), but about one time in 256 the garbage ends in valid padding and the failure
// comes later, from the ASN.1 parser. Either way it is a wrong passphrase (exit 4), as OpenSSH's
// ssh-keygen says, not "not a private key" (a CI run once hit that case with a random key).
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { createPrivateKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { parsePrivateKeyFile } from '../../src/vault/key-material.js';

const RIGHT = 'right passphrase';

/** A wrong passphrase whose decryption passes the padding check: found by trying, bounded. */
function paddingPassingWrongPassphrase(pem: string): Buffer {
  for (let i = 0; i < 20_000; i += 1) {
    const candidate = Buffer.from(`wrong-${i}`);
    try {
      createPrivateKey({ key: pem, format: 'pem', passphrase: candidate });
    } catch (err) {
      if (!/bad decrypt/i.test(`${(err as { code?: string }).code} ${(err as Error).message}`)) return candidate;
    }
  }
  throw new Error('no wrong passphrase passed the padding check in 20,000 tries');
}

function refusal(pem: string, passphrase: Buffer): KeyholdError {
  try {
    parsePrivateKeyFile(Buffer.from(pem), 'key.pem', passphrase);
  } catch (err) {
    if (err instanceof KeyholdError) return err;
    throw err;
  }
  throw new Error('the wrong passphrase was accepted');
}

describe('key files: a wrong passphrase is always "wrong passphrase"', () => {
  const rsa: KeyObject = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const ed: KeyObject = generateKeyPairSync('ed25519').privateKey;
  const files: Array<[string, string]> = [
    ['PEM PKCS#1 (Proc-Type: 4,ENCRYPTED)', rsa.export({ format: 'pem', type: 'pkcs1', cipher: 'aes-128-cbc', passphrase: RIGHT }) as string],
    ['encrypted PKCS#8', ed.export({ format: 'pem', type: 'pkcs8', cipher: 'aes-256-cbc', passphrase: RIGHT }) as string],
  ];

  for (const [label, pem] of files) {
    it(`${label}: garbage that passes the padding check → 4`, () => {
      const err = refusal(pem, paddingPassingWrongPassphrase(pem));
      expect(err.message).toBe('wrong passphrase for key.pem');
      expect(err.exitCode).toBe(EXIT.DENIED);
    });

    it(`${label}: the right passphrase still imports`, () => {
      expect(parsePrivateKeyFile(Buffer.from(pem), 'key.pem', Buffer.from(RIGHT)).key.type).toBe('private');
    });
  }

  it('an unencrypted PEM that is damaged is still "not a private key", passphrase or not', () => {
    const pem = rsa.export({ format: 'pem', type: 'pkcs1' }) as string;
    const damaged = pem.replace(/\n[A-Za-z0-9+/]{10}/, '\nAAAAAAAAAA');
    expect(refusal(damaged, Buffer.from('x')).message).toMatch(/not a private key keyhold can read/);
  });
});

describe('key files: a cipher OpenSSL 3 keeps in its legacy provider', () => {
  it('DES-encrypted PKCS#8 is refused as such, with the right passphrase or a wrong one, never as "wrong passphrase"', () => {
    const dir = mkdtempSync(join(tmpdir(), 'keyhold-des-'));
    try {
      const file = join(dir, 'des.pem');
      // The openssl tool can still write one when asked for the legacy provider (Debian ships it).
      execFileSync('openssl', ['genpkey', '-provider', 'legacy', '-provider', 'default', '-algorithm', 'ed25519', '-des', '-pass', 'pass:right', '-out', file], { stdio: 'pipe' });
      for (const passphrase of ['right', 'wrong']) {
        const err = refusal(readFileSync(file, 'utf8'), Buffer.from(passphrase));
        expect(err.message).toBe('key.pem is encrypted with a cipher OpenSSL 3 no longer offers (such as DES)');
        expect(err.hint).toContain('-provider legacy');
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
