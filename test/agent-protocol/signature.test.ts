// SSH public key blobs and signature blobs, checked against independent implementations:
// ssh-keygen (fingerprints, PKCS#8 import), ssh2's key parser and ECDSA converter, @noble/ed25519.
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ed from '@noble/ed25519';
import fc from 'fast-check';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  authorizedKeyLine,
  blobKeyType,
  describeKey,
  fingerprint,
  publicKeyFromBlob,
  type SshKeyType,
} from '../../src/agent-protocol/public-key.js';
import {
  ecdsaP1363ToSsh,
  ecdsaSshToP1363,
  parseSignatureBlob,
  signSsh,
  signatureAlgorithmFor,
  verifySsh,
  type SignatureAlgorithm,
} from '../../src/agent-protocol/signature.js';
import { WireFormatError, WireReader, WireWriter } from '../../src/agent-protocol/wire.js';
import { fixture, parseLine } from './golden-fixture.js';

// ssh2's own SSH-ECDSA → DER converter, an implementation independent of ours.
const require = createRequire(import.meta.url);
const { sigSSHToASN1 } = require('ssh2/lib/protocol/utils.js') as {
  sigSSHToASN1: (sig: Buffer, type: string) => Buffer | undefined;
};

interface KeyCase {
  name: string;
  type: SshKeyType;
  bits: number;
  keygenLabel: string; // what `ssh-keygen -l` prints in parentheses
  algorithms: SignatureAlgorithm[];
  curve?: { coordinateBytes: number; order: bigint; hash: string };
  make: () => { privateKey: KeyObject; publicKey: KeyObject };
}

const ORDER = {
  p256: BigInt('0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551'),
  p384: BigInt('0xffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973'),
  p521: BigInt(
    '0x01fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffa51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409',
  ),
};

const CASES: KeyCase[] = [
  {
    name: 'ed25519',
    type: 'ssh-ed25519',
    bits: 256,
    keygenLabel: 'ED25519',
    algorithms: ['ssh-ed25519'],
    make: () => generateKeyPairSync('ed25519'),
  },
  {
    name: 'rsa 2048',
    type: 'ssh-rsa',
    bits: 2048,
    keygenLabel: 'RSA',
    algorithms: ['rsa-sha2-256', 'rsa-sha2-512', 'ssh-rsa'],
    make: () => generateKeyPairSync('rsa', { modulusLength: 2048 }),
  },
  {
    name: 'rsa 3072',
    type: 'ssh-rsa',
    bits: 3072,
    keygenLabel: 'RSA',
    algorithms: ['rsa-sha2-256', 'rsa-sha2-512', 'ssh-rsa'],
    make: () => generateKeyPairSync('rsa', { modulusLength: 3072 }),
  },
  {
    name: 'ecdsa p256',
    type: 'ecdsa-sha2-nistp256',
    bits: 256,
    keygenLabel: 'ECDSA',
    algorithms: ['ecdsa-sha2-nistp256'],
    curve: { coordinateBytes: 32, order: ORDER.p256, hash: 'sha256' },
    make: () => generateKeyPairSync('ec', { namedCurve: 'P-256' }),
  },
  {
    name: 'ecdsa p384',
    type: 'ecdsa-sha2-nistp384',
    bits: 384,
    keygenLabel: 'ECDSA',
    algorithms: ['ecdsa-sha2-nistp384'],
    curve: { coordinateBytes: 48, order: ORDER.p384, hash: 'sha384' },
    make: () => generateKeyPairSync('ec', { namedCurve: 'P-384' }),
  },
  {
    name: 'ecdsa p521',
    type: 'ecdsa-sha2-nistp521',
    bits: 521,
    keygenLabel: 'ECDSA',
    algorithms: ['ecdsa-sha2-nistp521'],
    curve: { coordinateBytes: 66, order: ORDER.p521, hash: 'sha512' },
    make: () => generateKeyPairSync('ec', { namedCurve: 'P-521' }),
  },
];

const DIGEST: Record<SignatureAlgorithm, string | null> = {
  'ssh-ed25519': null,
  'rsa-sha2-256': 'sha256',
  'rsa-sha2-512': 'sha512',
  'ssh-rsa': 'sha1',
  'ecdsa-sha2-nistp256': 'sha256',
  'ecdsa-sha2-nistp384': 'sha384',
  'ecdsa-sha2-nistp521': 'sha512',
};

// Two key pairs per case: the second one is "another key of the same type".
const keys = new Map(CASES.map((c) => [c.name, [c.make(), c.make()] as const]));

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'keyhold-sigtest-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

let fileCounter = 0;
function sshKeygen(args: string[], fileContent: string): string {
  const file = join(dir, `k${fileCounter++}`);
  writeFileSync(file, fileContent);
  return execFileSync('ssh-keygen', [...args, '-f', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

function flip(buf: Buffer, index: number): Buffer {
  const copy = Buffer.from(buf);
  copy[index] = copy[index]! ^ 0x80;
  return copy;
}

function resign(sigBlob: Buffer, algorithm: string, raw?: Buffer): Buffer {
  const parsed = parseSignatureBlob(sigBlob);
  return new WireWriter().string(algorithm).string(raw ?? parsed.signature).toBuffer();
}

const message = Buffer.from('keyhold signature test: the quick brown fox');

describe.each(CASES)('$name', (c) => {
  const [{ privateKey, publicKey }, other] = keys.get(c.name)!;
  const info = describeKey(privateKey);

  it('describeKey gives the type, size and the same blob for the private and the public key', () => {
    expect(info.type).toBe(c.type);
    expect(info.bits).toBe(c.bits);
    expect(describeKey(publicKey)).toEqual(info);
    expect(blobKeyType(info.blob)).toBe(c.type);
    expect(describeKey(other.publicKey).blob).not.toEqual(info.blob);
  });

  it('the blob round-trips through publicKeyFromBlob to the very same key', () => {
    const back = publicKeyFromBlob(info.blob);
    expect(back.type).toBe('public');
    expect(back.export({ type: 'spki', format: 'der' })).toEqual(publicKey.export({ type: 'spki', format: 'der' }));
    expect(describeKey(back).blob).toEqual(info.blob);
  });

  it('publicKeyFromBlob rejects the blob with a trailing byte or truncated', () => {
    expect(() => publicKeyFromBlob(Buffer.concat([info.blob, Buffer.of(0)]))).toThrow(WireFormatError);
    expect(() => publicKeyFromBlob(info.blob.subarray(0, info.blob.length - 1))).toThrow(WireFormatError);
  });

  it('the blob matches an independent encoding of the key', () => {
    if (c.type === 'ssh-ed25519') {
      // SPKI DER of an Ed25519 key ends with the raw 32-byte public key (RFC 8410).
      const raw = (publicKey.export({ type: 'spki', format: 'der' }) as Buffer).subarray(-32);
      expect(info.blob).toEqual(new WireWriter().string('ssh-ed25519').string(raw).toBuffer());
    } else {
      const pem = publicKey.export({ type: 'spki', format: 'pem' }) as string;
      const line = sshKeygen(['-i', '-m', 'PKCS8'], pem);
      expect(parseLine(line).type).toBe(c.type);
      expect(parseLine(line).blob).toEqual(info.blob);
    }
  });

  it('authorizedKeyLine is accepted by ssh2 with the same blob and comment', () => {
    const line = authorizedKeyLine(info.blob, 'user@host');
    expect(line).toBe(`${c.type} ${info.blob.toString('base64')} user@host`);
    expect(authorizedKeyLine(info.blob, '')).toBe(`${c.type} ${info.blob.toString('base64')}`);
    const parsed = ssh2.utils.parseKey(line);
    if (parsed instanceof Error) throw parsed;
    expect(parsed.type).toBe(c.type);
    expect(parsed.comment).toBe('user@host');
    expect(parsed.getPublicSSH()).toEqual(info.blob);
  });

  it('fingerprint() and bits equal what ssh-keygen -l prints', () => {
    const out = sshKeygen(['-l'], authorizedKeyLine(info.blob, 'fp-test') + '\n');
    expect(out).toBe(`${c.bits} ${fingerprint(info.blob)} fp-test (${c.keygenLabel})`);
    expect(fingerprint(info.blob)).not.toBe(fingerprint(describeKey(other.publicKey).blob));
  });

  describe.each(c.algorithms)('%s', (algorithm) => {
    const sha1 = algorithm === 'ssh-rsa';
    const sig = signSsh(privateKey, algorithm, message);
    const parsed = parseSignatureBlob(sig);

    it('signSsh produces `string alg, string sig` and verifySsh accepts it', () => {
      expect(parsed.algorithm).toBe(algorithm);
      if (c.type === 'ssh-rsa') expect(parsed.signature.length).toBe(c.bits / 8);
      if (c.type === 'ssh-ed25519') expect(parsed.signature.length).toBe(64);
      expect(verifySsh(info.blob, sig, message, sha1)).toBe(true);
    });

    it('verifySsh fails when one byte of the data, the signature or the key changes', () => {
      for (const at of [0, message.length >> 1, message.length - 1]) {
        expect(verifySsh(info.blob, sig, flip(message, at), sha1)).toBe(false);
      }
      const rawStart = sig.length - parsed.signature.length;
      for (const at of [rawStart, rawStart + (parsed.signature.length >> 1), sig.length - 1]) {
        expect(verifySsh(info.blob, flip(sig, at), message, sha1)).toBe(false);
      }
      expect(verifySsh(describeKey(other.publicKey).blob, sig, message, sha1)).toBe(false);
      expect(verifySsh(info.blob, Buffer.concat([sig, Buffer.of(0)]), message, sha1)).toBe(false);
      expect(verifySsh(info.blob, sig, Buffer.concat([message, Buffer.of(0)]), sha1)).toBe(false);
    });

    it('verifySsh refuses the signature under another algorithm name', () => {
      const names: SignatureAlgorithm[] = [
        'ssh-ed25519',
        'rsa-sha2-256',
        'rsa-sha2-512',
        'ssh-rsa',
        'ecdsa-sha2-nistp256',
        'ecdsa-sha2-nistp384',
        'ecdsa-sha2-nistp521',
      ];
      for (const name of names.filter((n) => n !== algorithm)) {
        expect(verifySsh(info.blob, resign(sig, name), message, true), name).toBe(false);
      }
    });

    it('an independent verifier accepts the signature', async () => {
      const theirs = ssh2.utils.parseKey(authorizedKeyLine(info.blob, ''));
      if (theirs instanceof Error) throw theirs;
      const pem = theirs.getPublicPEM();
      if (c.type === 'ssh-ed25519') {
        const rawPub = info.blob.subarray(-32);
        expect(await ed.verifyAsync(parsed.signature, message, rawPub)).toBe(true);
        expect(await ed.verifyAsync(parsed.signature, flip(message, 3), rawPub)).toBe(false);
        expect(await ed.verifyAsync(flip(parsed.signature, 10), message, rawPub)).toBe(false);
        expect(cryptoVerify(null, message, pem, parsed.signature)).toBe(true);
      } else if (c.curve) {
        const der = sigSSHToASN1(parsed.signature, c.type);
        expect(der).toBeDefined();
        expect(cryptoVerify(c.curve.hash, message, pem, der!)).toBe(true);
        expect(cryptoVerify(c.curve.hash, flip(message, 3), pem, der!)).toBe(false);
      } else {
        expect(cryptoVerify(DIGEST[algorithm], message, pem, parsed.signature)).toBe(true);
        expect(cryptoVerify(DIGEST[algorithm], flip(message, 3), pem, parsed.signature)).toBe(false);
      }
    });

    if (sha1) {
      it('an ssh-rsa (SHA-1) signature is refused unless allowSha1', () => {
        expect(verifySsh(info.blob, sig, message)).toBe(false);
        expect(verifySsh(info.blob, sig, message, false)).toBe(false);
        expect(verifySsh(info.blob, sig, message, true)).toBe(true);
      });
    }
  });

  if (c.type === 'ssh-ed25519') {
    it('the blob holds the public key noble derives from the private seed', async () => {
      // PKCS#8 DER of an Ed25519 key ends with the 32-byte seed (RFC 8410).
      const seed = (privateKey.export({ type: 'pkcs8', format: 'der' }) as Buffer).subarray(-32);
      expect(Buffer.from(await ed.getPublicKeyAsync(seed))).toEqual(info.blob.subarray(-32));
    });
  }

  if (c.curve) {
    const curve = c.curve;
    it('ECDSA signatures are `mpint r, mpint s`, minimally encoded, 0 < r,s < n', () => {
      let padded = 0;
      let unpadded = 0;
      for (let i = 0; i < 64; i++) {
        const data = Buffer.from(`message ${i}`);
        const blob = signSsh(privateKey, c.type, data);
        const { algorithm, signature } = parseSignatureBlob(blob);
        expect(algorithm).toBe(c.type);
        const r = new WireReader(signature);
        const parts = [r.string(), r.string()];
        r.end();
        for (const part of parts) {
          expect(part.length).toBeGreaterThan(0);
          expect(part[0]! & 0x80).toBe(0); // never negative
          if (part[0] === 0) {
            expect(part.length).toBeGreaterThan(1);
            expect(part[1]! & 0x80).toBe(0x80); // 0x00 only in front of a high bit
            padded++;
          } else {
            unpadded++;
          }
          const magnitude = part[0] === 0 ? part.subarray(1) : part;
          expect(magnitude.length).toBeLessThanOrEqual(curve.coordinateBytes);
          const value = BigInt('0x' + magnitude.toString('hex'));
          expect(value > 0n).toBe(true);
          expect(value < curve.order).toBe(true);
        }
        expect(verifySsh(info.blob, blob, data)).toBe(true);
      }
      // 128 components: both encodings occur (a miss has probability < 2^-40).
      expect(padded).toBeGreaterThan(0);
      expect(unpadded).toBeGreaterThan(0);
    });
  }
});

describe('ECDSA r||s <-> mpint conversion', () => {
  const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

  it('trims leading zeros and pads high bits', () => {
    const r = Buffer.alloc(32);
    r[31] = 1;
    const s = Buffer.alloc(32, 0);
    s[0] = 0x80;
    const ssh = ecdsaP1363ToSsh(Buffer.concat([r, s]));
    expect(ssh).toEqual(hex('00000001 01' + '00000021 00 80' + '00'.repeat(31)));
    expect(ecdsaSshToP1363(ssh, 32)).toEqual(Buffer.concat([r, s]));
  });

  it('round-trips any fixed-width r||s', () => {
    fc.assert(
      fc.property(
        fc.constantFrom(32, 48, 66).chain((n) => fc.tuple(fc.constant(n), fc.uint8Array({ minLength: 2 * n, maxLength: 2 * n }))),
        ([n, bytes]) => {
          const p1363 = Buffer.from(bytes);
          expect(ecdsaSshToP1363(ecdsaP1363ToSsh(p1363), n)).toEqual(p1363);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('rejects a component longer than the curve, a negative one, and trailing bytes', () => {
    const long = new WireWriter().string(Buffer.alloc(33, 0x11)).string(Buffer.of(1)).toBuffer();
    expect(() => ecdsaSshToP1363(long, 32)).toThrow(WireFormatError);
    const negative = new WireWriter().string(Buffer.of(0x80, 1)).string(Buffer.of(1)).toBuffer();
    expect(() => ecdsaSshToP1363(negative, 32)).toThrow(WireFormatError);
    const trailing = Buffer.concat([new WireWriter().string(Buffer.of(1)).string(Buffer.of(1)).toBuffer(), Buffer.of(0)]);
    expect(() => ecdsaSshToP1363(trailing, 32)).toThrow(WireFormatError);
    // 33 bytes is fine when the first one is just the sign pad.
    const padded = new WireWriter().mpint(Buffer.alloc(32, 0xff)).mpint(Buffer.of(1)).toBuffer();
    expect(ecdsaSshToP1363(padded, 32).subarray(0, 32)).toEqual(Buffer.alloc(32, 0xff));
  });
});

describe('signatureAlgorithmFor', () => {
  it.each([
    [2, 'rsa-sha2-256'],
    [4, 'rsa-sha2-512'],
    [6, 'rsa-sha2-256'], // OpenSSH's agent: SHA-256 wins when both are set
    [0, 'ssh-rsa'],
    [1, 'ssh-rsa'], // other bits are ignored
    [8, 'ssh-rsa'],
    [0xfffffff9, 'ssh-rsa'],
    [0xffffffff, 'rsa-sha2-256'],
    [0xfffffffd, 'rsa-sha2-512'],
  ] as const)('ssh-rsa with flags %i → %s', (flags, expected) => {
    expect(signatureAlgorithmFor('ssh-rsa', flags)).toBe(expected);
  });

  it.each(['ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521'] as const)(
    '%s ignores the flags',
    (type) => {
      for (const flags of [0, 1, 2, 4, 6, 0xffffffff]) expect(signatureAlgorithmFor(type, flags)).toBe(type);
    },
  );
});

describe('fixture keys (made by ssh-keygen) against ssh-keygen -l', () => {
  const lines = [...Object.values(fixture.publicKeys), fixture.sshdHostKey];

  it.each(lines.map((l) => [parseLine(l).comment, l] as const))('%s', (_comment, line) => {
    const { blob, comment } = parseLine(line);
    const out = sshKeygen(['-l'], line + '\n');
    const [bits, fp, ...rest] = out.split(' ');
    expect(fp).toBe(fingerprint(blob));
    expect(Number(bits)).toBe(describeKey(publicKeyFromBlob(blob)).bits);
    expect(rest.join(' ')).toMatch(new RegExp(`^${comment} \\(`));
    expect(authorizedKeyLine(blob, comment)).toBe(line);
  });
});

describe('verifySsh on malformed input', () => {
  const [{ privateKey }] = keys.get('ed25519')!;
  const blob = describeKey(privateKey).blob;
  const sig = signSsh(privateKey, 'ssh-ed25519', message);

  it('answers false (never throws) for garbage keys and signatures', () => {
    expect(verifySsh(Buffer.alloc(0), sig, message)).toBe(false);
    expect(verifySsh(Buffer.from('not a key blob'), sig, message)).toBe(false);
    expect(verifySsh(blob, Buffer.alloc(0), message)).toBe(false);
    expect(verifySsh(blob, sig.subarray(0, sig.length - 1), message)).toBe(false);
    const shortRaw = resign(sig, 'ssh-ed25519', parseSignatureBlob(sig).signature.subarray(0, 63));
    expect(verifySsh(blob, shortRaw, message)).toBe(false);
    const unknownType = new WireWriter().string('ssh-dss').string(Buffer.alloc(20)).toBuffer();
    expect(verifySsh(unknownType, sig, message)).toBe(false);
  });
});

describe('public key blob edge cases', () => {
  it('an ECDSA key whose x coordinate starts with 0x00 keeps a full-width point (as ssh-keygen encodes it)', () => {
    let found: KeyObject | undefined;
    for (let i = 0; i < 5000 && !found; i++) {
      const { publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const spki = publicKey.export({ type: 'spki', format: 'der' }) as Buffer;
      // Uncompressed point 04||x||y is the last 65 bytes of the SPKI DER.
      if (spki[spki.length - 64] === 0) found = publicKey;
    }
    expect(found, 'no P-256 key with a leading zero x byte in 5000 tries').toBeDefined();
    const info = describeKey(found!);
    const point = new WireReader(info.blob);
    point.utf8();
    point.utf8();
    expect(point.string()).toHaveLength(65);
    const line = sshKeygen(['-i', '-m', 'PKCS8'], found!.export({ type: 'spki', format: 'pem' }) as string);
    expect(parseLine(line).blob).toEqual(info.blob);
    expect(describeKey(publicKeyFromBlob(info.blob)).blob).toEqual(info.blob);
  });

  it('publicKeyFromBlob rejects inconsistent or malformed blobs with WireFormatError', () => {
    const [{ publicKey: p256 }] = keys.get('ecdsa p256')!;
    const good = new WireReader(describeKey(p256).blob);
    good.utf8();
    good.utf8();
    const point = Buffer.from(good.string());
    const ec = (type: string, id: string, pt: Buffer) => new WireWriter().string(type).string(id).string(pt).toBuffer();

    expect(() => publicKeyFromBlob(ec('ecdsa-sha2-nistp256', 'nistp384', point))).toThrow(WireFormatError);
    expect(() => publicKeyFromBlob(ec('ecdsa-sha2-nistp384', 'nistp384', point))).toThrow(WireFormatError);
    const compressed = Buffer.concat([Buffer.of(2 + (point[64]! & 1)), point.subarray(1, 33)]);
    expect(() => publicKeyFromBlob(ec('ecdsa-sha2-nistp256', 'nistp256', compressed))).toThrow(WireFormatError);
    const offCurve = Buffer.from(point);
    offCurve[64] = offCurve[64]! ^ 1;
    expect(() => publicKeyFromBlob(ec('ecdsa-sha2-nistp256', 'nistp256', offCurve))).toThrow(WireFormatError);

    const edBlob = (raw: Buffer) => new WireWriter().string('ssh-ed25519').string(raw).toBuffer();
    expect(() => publicKeyFromBlob(edBlob(Buffer.alloc(31, 1)))).toThrow(WireFormatError);
    expect(() => publicKeyFromBlob(edBlob(Buffer.alloc(33, 1)))).toThrow(WireFormatError);

    const rsa = (e: Buffer, n: Buffer) => new WireWriter().string('ssh-rsa').mpint(e).mpint(n).toBuffer();
    expect(() => publicKeyFromBlob(rsa(Buffer.alloc(0), Buffer.alloc(256, 0x7f)))).toThrow(WireFormatError);
    expect(() => publicKeyFromBlob(rsa(Buffer.of(1, 0, 1), Buffer.alloc(0)))).toThrow(WireFormatError);
    const negativeN = new WireWriter().string('ssh-rsa').mpint(Buffer.of(1, 0, 1)).string(Buffer.alloc(256, 0xff)).toBuffer();
    expect(() => publicKeyFromBlob(negativeN)).toThrow(WireFormatError);

    expect(() => publicKeyFromBlob(new WireWriter().string('ssh-dss').toBuffer())).toThrow(WireFormatError);
    expect(() => publicKeyFromBlob(Buffer.alloc(0))).toThrow(WireFormatError);
  });
});
