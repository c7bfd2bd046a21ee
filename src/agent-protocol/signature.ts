// SSH signature blobs: `string algorithm, string signature` (RFC 4253 §6.6, RFC 8332, RFC 5656 §3.1.2,
// RFC 8709 §6), produced from and checked with node:crypto.
import { sign as cryptoSign, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { curveBySshType, publicKeyFromBlob, blobKeyType, type SshKeyType } from './public-key.js';
import { WireFormatError, WireReader, WireWriter } from './wire.js';

export const SIGN_FLAG_RSA_SHA2_256 = 2;
export const SIGN_FLAG_RSA_SHA2_512 = 4;

export type SignatureAlgorithm =
  | 'ssh-ed25519'
  | 'rsa-sha2-256'
  | 'rsa-sha2-512'
  | 'ssh-rsa'
  | 'ecdsa-sha2-nistp256'
  | 'ecdsa-sha2-nistp384'
  | 'ecdsa-sha2-nistp521';

/**
 * The signature algorithm a sign request asks for. Flags matter only for RSA; when both 2 and 4
 * are set, 2 wins, as in OpenSSH's agent. Neither means SHA-1 `ssh-rsa`, which callers refuse
 * unless allowed. Other flag bits are ignored.
 */
export function signatureAlgorithmFor(keyType: SshKeyType, flags: number): SignatureAlgorithm {
  if (keyType !== 'ssh-rsa') return keyType;
  if (flags & SIGN_FLAG_RSA_SHA2_256) return 'rsa-sha2-256';
  if (flags & SIGN_FLAG_RSA_SHA2_512) return 'rsa-sha2-512';
  return 'ssh-rsa';
}

function digestFor(algorithm: SignatureAlgorithm): string | null {
  switch (algorithm) {
    case 'ssh-ed25519':
      return null;
    case 'rsa-sha2-256':
      return 'sha256';
    case 'rsa-sha2-512':
      return 'sha512';
    case 'ssh-rsa':
      return 'sha1';
    default:
      return curveBySshType(algorithm)!.hash;
  }
}

/** Converts node's fixed-width r||s (ieee-p1363) into SSH's `mpint r, mpint s`. */
export function ecdsaP1363ToSsh(p1363: Buffer): Buffer {
  const half = p1363.length / 2;
  return new WireWriter().mpint(p1363.subarray(0, half)).mpint(p1363.subarray(half)).toBuffer();
}

/** Converts SSH's `mpint r, mpint s` into fixed-width r||s. */
export function ecdsaSshToP1363(body: Buffer, coordinateBytes: number): Buffer {
  const r = new WireReader(body);
  const rs = [r.mpintUnsigned(), r.mpintUnsigned()];
  r.end();
  const out = Buffer.alloc(2 * coordinateBytes);
  rs.forEach((part, i) => {
    if (part.length > coordinateBytes) throw new WireFormatError('ecdsa signature component too long');
    part.copy(out, (i + 1) * coordinateBytes - part.length);
  });
  return out;
}

/** Signs `data` with a private KeyObject and returns the SSH signature blob. */
export function signSsh(key: KeyObject, algorithm: SignatureAlgorithm, data: Buffer): Buffer {
  const digest = digestFor(algorithm);
  let raw: Buffer;
  if (algorithm.startsWith('ecdsa-')) {
    raw = ecdsaP1363ToSsh(cryptoSign(digest, data, { key, dsaEncoding: 'ieee-p1363' }));
  } else {
    raw = cryptoSign(digest, data, key);
  }
  return new WireWriter().string(algorithm).string(raw).toBuffer();
}

export interface ParsedSignature {
  algorithm: string;
  signature: Buffer;
}

export function parseSignatureBlob(blob: Buffer): ParsedSignature {
  const r = new WireReader(blob);
  const algorithm = r.utf8();
  const signature = r.string();
  r.end();
  return { algorithm, signature };
}

/**
 * Verifies an SSH signature blob over `data` by the key in `publicBlob`. The algorithm must fit the
 * key type; SHA-1 `ssh-rsa` is accepted only when `allowSha1` is set. Returns false on any mismatch.
 */
export function verifySsh(publicBlob: Buffer, signatureBlob: Buffer, data: Buffer, allowSha1 = false): boolean {
  let parsed: ParsedSignature;
  let key: KeyObject;
  let keyType: string;
  try {
    parsed = parseSignatureBlob(signatureBlob);
    keyType = blobKeyType(publicBlob);
    key = publicKeyFromBlob(publicBlob);
  } catch {
    return false;
  }
  const algorithm = parsed.algorithm as SignatureAlgorithm;
  try {
    if (keyType === 'ssh-rsa') {
      if (!['rsa-sha2-256', 'rsa-sha2-512', ...(allowSha1 ? ['ssh-rsa'] : [])].includes(algorithm)) return false;
      return cryptoVerify(digestFor(algorithm), data, key, parsed.signature);
    }
    if (algorithm !== keyType) return false;
    const curve = curveBySshType(keyType);
    if (curve) {
      const p1363 = ecdsaSshToP1363(parsed.signature, curve.coordinateBytes);
      return cryptoVerify(curve.hash, data, { key, dsaEncoding: 'ieee-p1363' }, p1363);
    }
    return cryptoVerify(null, data, key, parsed.signature);
  } catch {
    return false;
  }
}
