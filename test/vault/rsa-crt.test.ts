// RSA keys imported from OpenSSH files must carry correct CRT values: OpenSSL signs with wrong ones
// too (it checks and falls back), only four times slower. The values are checked here, not timed.
import { describe, expect, it } from 'vitest';
import { createPrivateKey, sign, verify, type KeyObject } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sshpk from 'sshpk';
import { fromPkcs8, parsePrivateKeyFile, toPkcs8 } from '../../src/vault/key-material.js';

const big = (b64u: string) => BigInt(`0x${Buffer.from(b64u, 'base64url').toString('hex')}`);

function crtSound(key: KeyObject): boolean {
  const jwk = key.export({ format: 'jwk' });
  if (![jwk.d, jwk.p, jwk.q, jwk.dp, jwk.dq, jwk.qi].every((v) => typeof v === 'string' && v.length > 0)) return false;
  const [d, p, q, dp, dq, qi] = [jwk.d!, jwk.p!, jwk.q!, jwk.dp!, jwk.dq!, jwk.qi!].map(big) as bigint[];
  return dp === d! % (p! - 1n) && dq === d! % (q! - 1n) && (q! * qi!) % p! === 1n;
}

describe('RSA CRT values', () => {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-crt-'));
  const file = join(dir, 'id_rsa');
  execFileSync('ssh-keygen', ['-q', '-t', 'rsa', '-b', '2048', '-N', '', '-f', file]);

  it('an OpenSSH RSA key imports with sound CRT values, and signs verifiably', () => {
    const { key } = parsePrivateKeyFile(readFileSync(file), 'id_rsa');
    expect(crtSound(key)).toBe(true);
    const data = Buffer.from('crt');
    expect(verify('sha512', data, key, sign('sha512', data, key))).toBe(true);
  });

  it('a stored key with bad CRT values (as earlier imports wrote them) is repaired when loaded', () => {
    const viaSshpk = createPrivateKey({ key: sshpk.parsePrivateKey(readFileSync(file), 'openssh').toBuffer('pkcs8'), format: 'pem' });
    expect(crtSound(viaSshpk)).toBe(false);
    const loaded = fromPkcs8(toPkcs8(viaSshpk));
    expect(crtSound(loaded)).toBe(true);
    expect(loaded.export({ format: 'jwk' }).n).toBe(viaSshpk.export({ format: 'jwk' }).n);
    rmSync(dir, { recursive: true, force: true });
  });
});
