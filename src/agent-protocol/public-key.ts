// SSH public key blobs (RFC 4253 §6.6, RFC 5656 §3.1, RFC 8709 §4) to and from node:crypto KeyObjects.
import { createHash, createPublicKey, type KeyObject } from 'node:crypto';
import { WireFormatError, WireReader, WireWriter } from './wire.js';

/** As OpenSSH (SSH_RSA_MINIMUM_MODULUS_SIZE): smaller RSA keys are not accepted for verification. */
export const MIN_RSA_VERIFY_BITS = 1024;

export type SshKeyType =
  | 'ssh-ed25519'
  | 'ssh-rsa'
  | 'ecdsa-sha2-nistp256'
  | 'ecdsa-sha2-nistp384'
  | 'ecdsa-sha2-nistp521';

interface CurveInfo {
  sshType: SshKeyType;
  identifier: string;
  jwkCurve: string;
  coordinateBytes: number;
  hash: 'sha256' | 'sha384' | 'sha512';
  bits: number;
}

export const ECDSA_CURVES: readonly CurveInfo[] = [
  { sshType: 'ecdsa-sha2-nistp256', identifier: 'nistp256', jwkCurve: 'P-256', coordinateBytes: 32, hash: 'sha256', bits: 256 },
  { sshType: 'ecdsa-sha2-nistp384', identifier: 'nistp384', jwkCurve: 'P-384', coordinateBytes: 48, hash: 'sha384', bits: 384 },
  { sshType: 'ecdsa-sha2-nistp521', identifier: 'nistp521', jwkCurve: 'P-521', coordinateBytes: 66, hash: 'sha512', bits: 521 },
];

export function curveBySshType(type: string): CurveInfo | undefined {
  return ECDSA_CURVES.find((c) => c.sshType === type);
}

function curveByJwk(crv: string): CurveInfo {
  const curve = ECDSA_CURVES.find((c) => c.jwkCurve === crv);
  if (!curve) throw new WireFormatError(`unsupported curve ${crv}`);
  return curve;
}

const b64u = (s: string | undefined): Buffer => {
  if (s === undefined) throw new WireFormatError('incomplete key');
  return Buffer.from(s, 'base64url');
};

function leftPad(bytes: Buffer, size: number): Buffer {
  if (bytes.length === size) return bytes;
  if (bytes.length > size) throw new WireFormatError('coordinate too long');
  const out = Buffer.alloc(size);
  bytes.copy(out, size - bytes.length);
  return out;
}

export interface PublicKeyInfo {
  type: SshKeyType;
  /** Modulus size for RSA, curve size for ECDSA, 256 for ed25519. */
  bits: number;
  blob: Buffer;
}

/** Derives the SSH public blob of a private or public KeyObject. */
export function describeKey(key: KeyObject): PublicKeyInfo {
  const jwk = key.export({ format: 'jwk' });
  const w = new WireWriter();
  switch (key.asymmetricKeyType) {
    case 'ed25519': {
      w.string('ssh-ed25519').string(b64u(jwk.x));
      return { type: 'ssh-ed25519', bits: 256, blob: w.toBuffer() };
    }
    case 'rsa': {
      const n = b64u(jwk.n);
      w.string('ssh-rsa').mpint(b64u(jwk.e)).mpint(n);
      return { type: 'ssh-rsa', bits: key.asymmetricKeyDetails?.modulusLength ?? bitLength(n), blob: w.toBuffer() };
    }
    case 'ec': {
      const curve = curveByJwk(String(jwk.crv));
      const point = Buffer.concat([
        Buffer.of(4),
        leftPad(b64u(jwk.x), curve.coordinateBytes),
        leftPad(b64u(jwk.y), curve.coordinateBytes),
      ]);
      w.string(curve.sshType).string(curve.identifier).string(point);
      return { type: curve.sshType, bits: curve.bits, blob: w.toBuffer() };
    }
    default:
      throw new WireFormatError(`unsupported key type ${String(key.asymmetricKeyType)}`);
  }
}

/** Bits of a big-endian magnitude (leading zero bytes ignored). */
export function bitLength(magnitude: Buffer): number {
  let i = 0;
  while (i < magnitude.length && magnitude[i] === 0) i++;
  if (i === magnitude.length) return 0;
  return (magnitude.length - i - 1) * 8 + (32 - Math.clz32(magnitude[i]!));
}

/** The key type named at the start of a public blob (no validation of the rest). */
export function blobKeyType(blob: Buffer): string {
  return new WireReader(blob).utf8();
}

/** Parses and validates a public blob into a KeyObject (for verifying signatures). */
export function publicKeyFromBlob(blob: Buffer): KeyObject {
  const r = new WireReader(blob);
  const type = r.utf8();
  let key: KeyObject;
  if (type === 'ssh-ed25519') {
    const pk = r.string();
    if (pk.length !== 32) throw new WireFormatError('bad ed25519 public key length');
    r.end();
    key = createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: pk.toString('base64url') }, format: 'jwk' });
  } else if (type === 'ssh-rsa') {
    const e = r.mpintUnsigned();
    const n = r.mpintUnsigned();
    r.end();
    if (e.length === 0 || bitLength(n) < MIN_RSA_VERIFY_BITS) throw new WireFormatError('bad or too small rsa public key');
    key = createPublicKey({
      key: { kty: 'RSA', e: e.toString('base64url'), n: n.toString('base64url') },
      format: 'jwk',
    });
  } else {
    const curve = curveBySshType(type);
    if (!curve) throw new WireFormatError(`unsupported key type ${JSON.stringify(type.slice(0, 64))}`);
    const identifier = r.utf8();
    const point = r.string();
    r.end();
    if (identifier !== curve.identifier) throw new WireFormatError('curve identifier mismatch');
    if (point.length !== 1 + 2 * curve.coordinateBytes || point[0] !== 4) {
      throw new WireFormatError('bad ecdsa point');
    }
    const x = point.subarray(1, 1 + curve.coordinateBytes);
    const y = point.subarray(1 + curve.coordinateBytes);
    try {
      key = createPublicKey({
        key: { kty: 'EC', crv: curve.jwkCurve, x: x.toString('base64url'), y: y.toString('base64url') },
        format: 'jwk',
      });
    } catch {
      throw new WireFormatError('ecdsa point not on curve');
    }
  }
  return key;
}

/** What `fingerprint` returns: SHA-256 in base64 without padding. */
export const FINGERPRINT_PATTERN = /^SHA256:[A-Za-z0-9+/]{43}$/;

/** `SHA256:<base64, no padding>` as `ssh-keygen -l` prints it. */
export function fingerprint(blob: Buffer): string {
  return 'SHA256:' + createHash('sha256').update(blob).digest('base64').replace(/=+$/, '');
}

/** An authorized_keys / `ssh-add -L` line. */
export function authorizedKeyLine(blob: Buffer, comment: string): string {
  const line = `${blobKeyType(blob)} ${blob.toString('base64')}`;
  return comment ? `${line} ${comment}` : line;
}
