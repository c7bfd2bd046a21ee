// OpenSSH certificates made by the real ssh-keygen -s (user and host, each CA kind): parsed field
// by field, the certified key's blob and fingerprint are the key's, the CA signature verifies and a
// changed byte does not; host certificates matched as OpenSSH's match_key_hop; and a fuzzed parser
// that only ever returns or throws WireFormatError.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CERT_FOREVER,
  describeCertificate,
  hostCertificateMatches,
  matchPattern,
  parseCertificate,
  parseVerifiedCertificate,
  verifyCertificate,
  boundPlainHostKey,
} from '../../src/agent-protocol/certificate.js';
import { fingerprint } from '../../src/agent-protocol/public-key.js';
import { WireFormatError } from '../../src/agent-protocol/wire.js';
import { generateKeyPair, type KeyPair } from '../helpers/ssh-agent.js';
import { lineBlob, signCertificate } from '../helpers/certificates.js';

let dir: string;
const cas: Record<string, KeyPair> = {};
const users: Record<string, KeyPair> = {};

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'keyhold-cert-unit-'));
  cas.ed25519 = generateKeyPair(dir, 'ca_ed25519', 'ed25519');
  cas.ecdsa256 = generateKeyPair(dir, 'ca_ecdsa256', 'ecdsa', 256);
  cas.ecdsa384 = generateKeyPair(dir, 'ca_ecdsa384', 'ecdsa', 384);
  cas.ecdsa521 = generateKeyPair(dir, 'ca_ecdsa521', 'ecdsa', 521);
  cas.rsa = generateKeyPair(dir, 'ca_rsa', 'rsa', 2048);
  users.ed25519 = generateKeyPair(dir, 'id_ed25519', 'ed25519');
  users.ecdsa256 = generateKeyPair(dir, 'id_ecdsa256', 'ecdsa', 256);
  users.ecdsa384 = generateKeyPair(dir, 'id_ecdsa384', 'ecdsa', 384);
  users.ecdsa521 = generateKeyPair(dir, 'id_ecdsa521', 'ecdsa', 521);
  users.rsa = generateKeyPair(dir, 'id_rsa', 'rsa', 2048);
}, 60_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

const CERT_TYPE = {
  ed25519: 'ssh-ed25519-cert-v01@openssh.com',
  ecdsa256: 'ecdsa-sha2-nistp256-cert-v01@openssh.com',
  ecdsa384: 'ecdsa-sha2-nistp384-cert-v01@openssh.com',
  ecdsa521: 'ecdsa-sha2-nistp521-cert-v01@openssh.com',
  rsa: 'ssh-rsa-cert-v01@openssh.com',
} as const;

describe('certificates made by ssh-keygen -s', () => {
  it('every key kind certified by every CA kind: fields, certified key and fingerprint, CA signature', () => {
    for (const [userKind, user] of Object.entries(users)) {
      for (const [caKind, ca] of Object.entries(cas)) {
        const made = signCertificate(ca.path, user.pubPath, { keyId: `${userKind}-by-${caKind}`, principals: ['alice', 'bob'], serial: 4242, validity: '20200101:20991231' });
        const cert = parseVerifiedCertificate(made.blob);
        expect(cert.certType).toBe(CERT_TYPE[userKind as keyof typeof CERT_TYPE]);
        expect(cert.publicBlob.equals(lineBlob(user.pubLine))).toBe(true);
        expect(cert.fingerprint).toBe(user.fingerprint);
        expect(cert.kind).toBe('user');
        expect(cert.keyId).toBe(`${userKind}-by-${caKind}`);
        expect(cert.principals).toEqual(['alice', 'bob']);
        expect(cert.serial).toBe(4242n);
        // ssh-keygen reads -V in local time: within a day of 2020-01-01 UTC.
        expect(Number(cert.validAfter) - Date.UTC(2020, 0, 1) / 1000).toBeLessThanOrEqual(86_400);
        expect(cert.signatureKey.equals(lineBlob(ca.pubLine))).toBe(true);
        // ssh-keygen's default user certificate extensions, sorted.
        expect(cert.extensions.map((e) => e.name)).toContain('permit-pty');
        expect(cert.criticalOptions).toEqual([]);
        expect(cert.signatureAlgorithm).toBe(caKind === 'rsa' ? 'rsa-sha2-512' : lineBlob(ca.pubLine).subarray(4, 4 + lineBlob(ca.pubLine).readUInt32BE(0)).toString());
        expect(verifyCertificate(cert)).toBe(true);
      }
    }
  }, 60_000);

  it('host certificates; RSA CA signatures rsa-sha2-256 and SHA-1 ssh-rsa; critical options', () => {
    const host = signCertificate(cas.ed25519!.path, users.ecdsa256!.pubPath, { keyId: 'web-host', principals: ['web.example', '*.internal'], host: true, validity: 'always:forever' });
    const cert = parseVerifiedCertificate(host.blob);
    expect(cert.kind).toBe('host');
    expect(cert.validAfter).toBe(0n);
    expect(cert.validBefore).toBe(CERT_FOREVER);
    expect(cert.extensions).toEqual([]);
    expect(describeCertificate(cert)).toBe('host certificate "web-host" serial 0 for web.example,*.internal valid always');

    for (const algorithm of ['rsa-sha2-256', 'ssh-rsa']) {
      const made = signCertificate(cas.rsa!.path, users.ed25519!.pubPath, { keyId: algorithm, rsaSignatureAlgorithm: algorithm });
      const parsed = parseVerifiedCertificate(made.blob);
      expect(parsed.signatureAlgorithm).toBe(algorithm);
      expect(verifyCertificate(parsed)).toBe(true);
      expect(verifyCertificate(parsed, ['rsa-sha2-512', 'rsa-sha2-256'])).toBe(algorithm !== 'ssh-rsa');
    }

    const forced = parseVerifiedCertificate(signCertificate(cas.ed25519!.path, users.ed25519!.pubPath, { keyId: 'forced', options: ['force-command=/bin/true', 'source-address=127.0.0.1'] }).blob);
    expect(forced.criticalOptions.map((o) => o.name)).toEqual(['force-command', 'source-address']);
    expect(describeCertificate(forced, Date.now())).toContain('any principal');
  });

  it('an expired certificate parses and says so; a changed byte anywhere before the signature fails it', () => {
    const expired = signCertificate(cas.ecdsa256!.path, users.ed25519!.pubPath, { keyId: 'old', validity: '20200101:20200102' });
    const cert = parseVerifiedCertificate(expired.blob);
    expect(describeCertificate(cert)).toMatch(/\(expired\)$/);
    // Every byte of the signed part: the structure may still parse, but the CA signature never verifies.
    for (let i = 0; i < cert.signedBytes.length; i += 7) {
      const damaged = Buffer.from(expired.blob);
      damaged[i] = damaged[i]! ^ 0x20;
      let parsed;
      try {
        parsed = parseCertificate(damaged);
      } catch (err) {
        expect(err).toBeInstanceOf(WireFormatError);
        continue;
      }
      expect(verifyCertificate(parsed), `byte ${i}`).toBe(false);
      expect(() => parseVerifiedCertificate(damaged)).toThrow(WireFormatError);
    }
  });
});

describe('host certificates as OpenSSH matches a hop (match_key_hop, sshkey_cert_check_host)', () => {
  it('CA, host type, validity, principals as wildcard patterns, no principals, critical options, allowed CA algorithms', () => {
    const ca = lineBlob(cas.ed25519!.pubLine);
    const otherCa = lineBlob(cas.ecdsa256!.pubLine);
    const host = signCertificate(cas.ed25519!.path, users.ecdsa384!.pubPath, { keyId: 'h', principals: ['web.example', 'host_*'], host: true }).blob;
    expect(hostCertificateMatches(host, ca, 'web.example')).toBe(true);
    expect(hostCertificateMatches(host, ca, 'host_a')).toBe(true);
    expect(hostCertificateMatches(host, ca, 'other.example')).toBe(false);
    expect(hostCertificateMatches(host, otherCa, 'web.example')).toBe(false);
    // The certificate's own key is not its CA; a plain key is never matched here.
    expect(hostCertificateMatches(host, lineBlob(users.ecdsa384!.pubLine), 'web.example')).toBe(false);
    expect(hostCertificateMatches(lineBlob(users.ecdsa384!.pubLine), ca, 'web.example')).toBe(false);
    expect(boundPlainHostKey(host).equals(lineBlob(users.ecdsa384!.pubLine))).toBe(true);
    expect(fingerprint(boundPlainHostKey(host))).toBe(users.ecdsa384!.fingerprint);

    // No principals: no name at all (OpenSSH since 10.3; 9.2 matched any, failing open).
    const anyName = signCertificate(cas.ed25519!.path, users.ecdsa521!.pubPath, { keyId: 'any', host: true }).blob;
    expect(hostCertificateMatches(anyName, ca, 'whatever')).toBe(false);
    expect(hostCertificateMatches(anyName, ca, '(ORIGIN)')).toBe(false);

    const user = signCertificate(cas.ed25519!.path, users.ecdsa521!.pubPath, { keyId: 'u', principals: ['web.example'] }).blob;
    expect(hostCertificateMatches(user, ca, 'web.example')).toBe(false);
    const expired = signCertificate(cas.ed25519!.path, users.ecdsa521!.pubPath, { keyId: 'e', host: true, principals: ['web.example'], validity: '20200101:20200102' }).blob;
    expect(hostCertificateMatches(expired, ca, 'web.example')).toBe(false);
    const future = signCertificate(cas.ed25519!.path, users.ecdsa521!.pubPath, { keyId: 'f', host: true, principals: ['web.example'], validity: '+1d:+2d' }).blob;
    expect(hostCertificateMatches(future, ca, 'web.example')).toBe(false);
    expect(hostCertificateMatches(future, ca, 'web.example', Date.now() + 36 * 3600_000)).toBe(true);
    const sha1 = signCertificate(cas.rsa!.path, users.ecdsa521!.pubPath, { keyId: 's', host: true, principals: ['web.example'], rsaSignatureAlgorithm: 'ssh-rsa' }).blob;
    expect(hostCertificateMatches(sha1, lineBlob(cas.rsa!.pubLine), 'web.example')).toBe(false);
    const sha2 = signCertificate(cas.rsa!.path, users.ecdsa521!.pubPath, { keyId: 's2', host: true, principals: ['web.example'], rsaSignatureAlgorithm: 'rsa-sha2-256' }).blob;
    expect(hostCertificateMatches(sha2, lineBlob(cas.rsa!.pubLine), 'web.example')).toBe(true);
    // A forged host certificate (a byte of the key id changed): its CA signature fails.
    const forged = Buffer.from(host);
    const at = forged.indexOf(Buffer.from('web.example')) + 1;
    forged[at] = forged[at]! ^ 0x01;
    expect(hostCertificateMatches(forged, ca, 'wfb.example')).toBe(false);
    expect(hostCertificateMatches(forged, ca, 'web.example')).toBe(false);
  }, 30_000);

  it('match_pattern: * and ? only, whole string', () => {
    expect(matchPattern('host_a', 'host_*')).toBe(true);
    expect(matchPattern('host_', 'host_*')).toBe(true);
    expect(matchPattern('ahost_a', 'host_*')).toBe(false);
    expect(matchPattern('web1.example', 'web?.example')).toBe(true);
    expect(matchPattern('web12.example', 'web?.example')).toBe(false);
    expect(matchPattern('a.b.c', '*.*')).toBe(true);
    expect(matchPattern('abc', 'a[b]c')).toBe(false);
    expect(matchPattern('x'.repeat(2000), '*x*x*x*y')).toBe(false);
  });
});

describe('the parser under fuzzing', () => {
  const expectOnlyWireErrors = (bytes: Buffer) => {
    try {
      const cert = parseCertificate(bytes);
      expect(cert.blob.equals(bytes)).toBe(true);
      verifyCertificate(cert);
    } catch (err) {
      expect(err).toBeInstanceOf(WireFormatError);
    }
  };

  it('random bytes and damaged real certificates: parsed or refused with WireFormatError, nothing else', () => {
    const real = [
      signCertificate(cas.ed25519!.path, users.rsa!.pubPath, { keyId: 'fuzz-rsa', principals: ['a'] }).blob,
      signCertificate(cas.rsa!.path, users.ecdsa256!.pubPath, { keyId: 'fuzz-ecdsa', host: true, principals: ['h'] }).blob,
      signCertificate(cas.ecdsa521!.path, users.ed25519!.pubPath, { keyId: 'fuzz-ed', options: ['force-command=x'] }).blob,
    ];
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), (bytes) => expectOnlyWireErrors(Buffer.from(bytes))),
      { numRuns: 300 },
    );
    fc.assert(
      fc.property(
        fc.constantFrom(...real),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }),
        fc.option(fc.nat(), { nil: undefined }),
        (cert, edits, cut) => {
          const bytes = Buffer.from(cert);
          for (const [at, value] of edits) bytes[at % bytes.length] = value;
          expectOnlyWireErrors(cut === undefined ? bytes : bytes.subarray(0, cut % bytes.length));
        },
      ),
      { numRuns: 400 },
    );
  }, 60_000);
});
