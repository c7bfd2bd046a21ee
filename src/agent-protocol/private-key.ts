// Private keys in OpenSSH's agent wire encoding (draft-ietf-sshm-ssh-agent §4.2.3, PROTOCOL.agent),
// as SSH_AGENTC_ADD_IDENTITY carries them, to and from node:crypto KeyObjects:
//   ssh-ed25519          string pub(32), string priv(64 = seed || pub)
//   ecdsa-sha2-nistpN    string curve, string Q, mpint d
//   ssh-rsa              mpint n, e, d, iqmp, p, q
//   <type>-cert-v01@openssh.com   string certificate, then the private fields without those the
//                        certificate already holds (ed25519: string pub, string priv; ecdsa: mpint d;
//                        rsa: mpint d, iqmp, p, q), as OpenSSH's sshkey_private_deserialize
// Every key is checked to be one key: its public part must be the one its private part makes.
//
// Secret hygiene: the key is handed to OpenSSL as DER built in buffers owned here, which are zeroed
// once the KeyObject exists. Out of reach, and said so: the request bytes the fields are read from
// (the caller's; the agent connection wipes the frame it parsed), OpenSSL's own copy inside the
// KeyObject, and for RSA the BigInt values of the CRT parameters and checks (immutable, in the V8
// heap until collected). No message of an error thrown here quotes key bytes.
import { createPrivateKey, createPublicKey, type KeyObject } from 'node:crypto';
import { fromBigInt, modInverse, toBigInt } from './bignum.js';
import { CERTIFICATE_TYPES, parseVerifiedCertificate, type Certificate } from './certificate.js';
import { bitLength, curveBySshType, describeKey, fingerprint, MIN_RSA_VERIFY_BITS, type SshKeyType } from './public-key.js';
import { WireFormatError, WireReader, WireWriter } from './wire.js';

/**
 * An add this agent refuses although it may be well formed: a key it does not hold (security
 * keys, DSA, XMSS, …) or a constraint it does not know. The message says which, for the log.
 */
export class UnsupportedAddError extends WireFormatError {
  override name = 'UnsupportedAddError';
}

/** As OpenSSH (SSHBUF_MAX_BIGNUM): larger RSA moduli are refused. */
export const MAX_RSA_BITS = 16384;

export interface AgentPrivateKey {
  type: SshKeyType;
  /** The private key; its public half is `publicBlob`. */
  key: KeyObject;
  publicBlob: Buffer;
  /** `SHA256:…` of `publicBlob`, as `ssh-keygen -l` prints it. */
  fingerprint: string;
  /** Added as a certificate: the certificate (its CA signature verified), which certifies `publicBlob`. */
  certificate?: Certificate;
}

const ED25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

/** DER of each curve's OID, and its group order (for OpenSSH's range check of d). */
const CURVE_DER: Record<string, { oid: Buffer; order: Buffer }> = {
  nistp256: {
    oid: Buffer.from('06082a8648ce3d030107', 'hex'),
    order: Buffer.from('ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551', 'hex'),
  },
  nistp384: {
    oid: Buffer.from('06052b81040022', 'hex'),
    order: Buffer.from('ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973', 'hex'),
  },
  nistp521: {
    oid: Buffer.from('06052b81040023', 'hex'),
    order: Buffer.from(
      '01ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffa51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409',
      'hex',
    ),
  },
};

/** n − 1 of a curve order (every order here ends in a nonzero byte). */
function orderMinusOne(order: Buffer): Buffer {
  const out = Buffer.from(order);
  out[out.length - 1] = out[out.length - 1]! - 1;
  return out;
}

const mismatch = () => new WireFormatError('private key does not match its public key');

/** A key type this agent refuses, named for the log (truncated: it is the peer's text). */
function unsupported(type: string): UnsupportedAddError {
  const shown = JSON.stringify(type.slice(0, 64));
  if (type.endsWith('-cert-v01@openssh.com')) return new UnsupportedAddError(`certificates of this key type are not supported (${shown})`);
  if (type.startsWith('sk-')) return new UnsupportedAddError(`security keys are not supported (${shown}): keyhold loads no FIDO provider`);
  // Refused as SHA-1 ssh-rsa signatures are: DSA has no other hash.
  if (type === 'ssh-dss') return new UnsupportedAddError('DSA keys are refused ("ssh-dss" signs with SHA-1 only)');
  return new UnsupportedAddError(`unsupported key type ${shown}`);
}

/** Reads one private key (type name first) from `r` and makes it a checked KeyObject. */
export function readPrivateKey(r: WireReader): AgentPrivateKey {
  const type = r.utf8();
  const certifiedType = CERTIFICATE_TYPES.get(type);
  if (certifiedType) return certifiedKey(r, type, certifiedType);
  if (type === 'ssh-ed25519') return ed25519Key(r);
  if (type === 'ssh-rsa') {
    const n = r.mpintUnsigned();
    const e = r.mpintUnsigned();
    return rsaKey(r, n, e);
  }
  const curve = curveBySshType(type);
  if (curve) {
    const name = r.utf8();
    const point = r.string();
    return ecdsaKey(r, curve.sshType, curve.identifier, curve.coordinateBytes, name, point);
  }
  throw unsupported(type);
}

/**
 * A certificate and the private key it certifies. The certificate must be of the type the message
 * names and verify under its CA; the private key must be the certified one (each key check below
 * compares the key's own public blob with the certificate's).
 */
function certifiedKey(r: WireReader, certType: string, keyType: SshKeyType): AgentPrivateKey {
  const cert = parseVerifiedCertificate(r.string());
  if (cert.certType !== certType) throw new WireFormatError('certificate type does not match the key type named');
  const fields = new WireReader(cert.publicBlob);
  fields.string();
  let key: AgentPrivateKey;
  if (keyType === 'ssh-ed25519') {
    key = ed25519Key(r);
  } else if (keyType === 'ssh-rsa') {
    const e = fields.mpintUnsigned();
    const n = fields.mpintUnsigned();
    key = rsaKey(r, n, e);
  } else {
    const curve = curveBySshType(keyType)!;
    key = ecdsaKey(r, keyType, curve.identifier, curve.coordinateBytes, fields.utf8(), fields.string());
  }
  if (!key.publicBlob.equals(cert.publicBlob)) throw new WireFormatError('private key does not match its certificate');
  return { ...key, certificate: cert };
}

function ed25519Key(r: WireReader): AgentPrivateKey {
  const pub = r.string();
  const priv = r.string();
  if (pub.length !== 32 || priv.length !== 64) throw new WireFormatError('bad ed25519 key length');
  if (!priv.subarray(32).equals(pub)) throw mismatch();
  const der = Buffer.concat([ED25519_PKCS8_PREFIX, priv.subarray(0, 32)]);
  return checked('ssh-ed25519', importDer(der, 'pkcs8'), new WireWriter().string('ssh-ed25519').string(pub).toBuffer());
}

function ecdsaKey(r: WireReader, type: SshKeyType, identifier: string, coordinateBytes: number, name: string, point: Buffer): AgentPrivateKey {
  const d = r.mpintUnsigned();
  if (name !== identifier) throw new WireFormatError('curve name does not match key type');
  const { oid, order } = CURVE_DER[identifier]!;
  // OpenSSH's sshkey_ec_validate_private: more bits than half the order's, and below order − 1.
  if (d.length > order.length || Buffer.compare(leftPad(d, order.length), orderMinusOne(order)) >= 0 || bitLength(d) <= Math.floor(bitLength(order) / 2)) {
    throw new WireFormatError('ecdsa private scalar out of range');
  }
  if (point.length !== 1 + 2 * coordinateBytes || point[0] !== 4) throw new WireFormatError('bad ecdsa point');
  const scalar = leftPad(d, coordinateBytes);
  // SEC1 without the public key: OpenSSL derives it from d, and we compare it with the claimed Q.
  const der = derSequence([derInteger(Buffer.of(1)), derTlv(0x04, scalar), derTlv(0xa0, oid)]);
  scalar.fill(0);
  const claimed = new WireWriter().string(type).string(identifier).string(point).toBuffer();
  return checked(type, importDer(der, 'sec1'), claimed);
}

function rsaKey(r: WireReader, n: Buffer, e: Buffer): AgentPrivateKey {
  const [d, iqmp, p, q] = [r.mpintUnsigned(), r.mpintUnsigned(), r.mpintUnsigned(), r.mpintUnsigned()] as [Buffer, Buffer, Buffer, Buffer];
  const bits = bitLength(n);
  if (bits < MIN_RSA_VERIFY_BITS || bits > MAX_RSA_BITS) throw new WireFormatError(`rsa modulus of ${bits} bits refused`);
  // Every other part is smaller than n; bounding them keeps the BigInt work below small.
  if ([e, d, iqmp, p, q].some((part) => part.length === 0 || part.length > n.length)) throw new WireFormatError('bad rsa key');
  if ((e[e.length - 1]! & 1) === 0 || (e.length === 1 && e[0]! < 3)) throw new WireFormatError('bad rsa public exponent');
  const [N, E, D, P, Q, IQMP] = [n, e, d, p, q, iqmp].map(toBigInt) as [bigint, bigint, bigint, bigint, bigint, bigint];
  // One key: n = p·q, e·d ≡ 1 modulo p−1 and q−1, and iqmp = q⁻¹ mod p (as OpenSSL's RSA_check_key).
  if (P < 3n || Q < 3n || P * Q !== N || (E * D) % (P - 1n) !== 1n || (E * D) % (Q - 1n) !== 1n) throw mismatch();
  let qi: bigint;
  try {
    qi = modInverse(Q, P);
  } catch {
    throw mismatch();
  }
  if (qi !== IQMP) throw mismatch();
  const crt = [fromBigInt(D % (P - 1n)), fromBigInt(D % (Q - 1n)), fromBigInt(qi)];
  const der = derSequence([derInteger(Buffer.of(0)), ...[n, e, d, p, q, ...crt].map(derInteger)]);
  for (const part of crt) part.fill(0);
  const blob = new WireWriter().string('ssh-rsa').mpint(e).mpint(n).toBuffer();
  return checked('ssh-rsa', importDer(der, 'pkcs1'), blob);
}

/** Imports DER owned here and zeroes it, whether OpenSSL took it or not. */
function importDer(der: Buffer, type: 'pkcs8' | 'sec1' | 'pkcs1'): KeyObject {
  try {
    return createPrivateKey({ key: der, format: 'der', type });
  } catch {
    throw new WireFormatError('private key refused by the crypto library');
  } finally {
    der.fill(0);
  }
}

/** The KeyObject's own public key must be the one the request claims. */
function checked(type: SshKeyType, key: KeyObject, claimedBlob: Buffer): AgentPrivateKey {
  let actual: Buffer;
  try {
    actual = describeKey(createPublicKey(key)).blob;
  } catch {
    throw mismatch();
  }
  if (!actual.equals(claimedBlob)) throw mismatch();
  return { type, key, publicBlob: actual, fingerprint: fingerprint(actual) };
}

/**
 * Encodes a private KeyObject as the agent protocol carries it (for a client adding a key, and
 * for tests). Goes through JWK export: its strings cannot be zeroed, so keep this off the daemon's
 * path.
 */
export function encodePrivateKey(key: KeyObject, certificate?: Buffer): Buffer {
  const jwk = key.export({ format: 'jwk' });
  const b = (s: string | undefined) => Buffer.from(s ?? '', 'base64url');
  const { type, blob } = describeKey(key);
  // A certificate goes first, under its own type name; the fields it holds are not repeated.
  const w = certificate ? new WireWriter().string(new WireReader(certificate).utf8()).string(certificate) : new WireWriter().string(type);
  if (type === 'ssh-ed25519') {
    const pub = b(jwk.x);
    return w.string(pub).string(Buffer.concat([b(jwk.d), pub])).toBuffer();
  }
  if (type === 'ssh-rsa') {
    for (const part of certificate ? [jwk.d, jwk.qi, jwk.p, jwk.q] : [jwk.n, jwk.e, jwk.d, jwk.qi, jwk.p, jwk.q]) w.mpint(b(part));
    return w.toBuffer();
  }
  if (certificate) return w.mpint(b(jwk.d)).toBuffer();
  const r = new WireReader(blob);
  r.string();
  return w.string(r.string()).string(r.string()).mpint(b(jwk.d)).toBuffer();
}

// ---------------------------------------------------------------------------------------------
// Minimal DER, enough for PKCS#8 ed25519, SEC1 and PKCS#1

function derLength(length: number): Buffer {
  if (length < 0x80) return Buffer.of(length);
  const bytes: number[] = [];
  for (let n = length; n > 0; n = Math.floor(n / 256)) bytes.unshift(n & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

function derTlv(tag: number, content: Buffer): Buffer {
  return Buffer.concat([Buffer.of(tag), derLength(content.length), content]);
}

/** An INTEGER from an unsigned big-endian magnitude. */
function derInteger(magnitude: Buffer): Buffer {
  let start = 0;
  while (start < magnitude.length - 1 && magnitude[start] === 0) start++;
  const trimmed = magnitude.length === 0 ? Buffer.of(0) : magnitude.subarray(start);
  const pad = (trimmed[0]! & 0x80) !== 0 ? Buffer.of(0) : Buffer.alloc(0);
  return Buffer.concat([Buffer.of(0x02), derLength(trimmed.length + pad.length), pad, trimmed]);
}

/** A SEQUENCE of parts; the parts (copies of secrets) are zeroed once copied into it. */
function derSequence(parts: Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  const out = derTlv(0x30, body);
  body.fill(0);
  for (const part of parts) part.fill(0);
  return out;
}

function leftPad(bytes: Buffer, size: number): Buffer {
  const out = Buffer.alloc(size);
  bytes.copy(out, Math.max(0, size - bytes.length), Math.max(0, bytes.length - size));
  return out;
}
