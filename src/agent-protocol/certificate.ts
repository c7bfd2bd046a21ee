// OpenSSH certificates (PROTOCOL.certkeys): a public key, its nonce, serial, user/host type, key id,
// principals, validity and options, signed by a CA key. Parsing is bounded and every field is
// checked: a malformed certificate is a WireFormatError, never a crash. As OpenSSH's
// sshkey_froms, a certificate whose CA signature does not verify is refused where one is taken in
// (an add, a session-bind); `parseCertificate` alone checks the structure only.
//
//   string  "<type>-cert-v01@openssh.com"
//   string  nonce
//   ...     the public key's fields (ed25519: string pk; ecdsa: string curve, string Q; rsa: mpint e, mpint n)
//   uint64  serial
//   uint32  type (1 user, 2 host)
//   string  key id
//   string  valid principals (packed strings)
//   uint64  valid after, uint64 valid before (seconds since the epoch)
//   string  critical options, string extensions (packed name / data pairs)
//   string  reserved
//   string  signature key (a plain public key blob)
//   string  signature (over every byte before it)
import { fingerprint, publicKeyFromBlob, blobKeyType, type SshKeyType } from './public-key.js';
import { parseSignatureBlob, verifySsh } from './signature.js';
import { WireFormatError, WireReader, WireWriter } from './wire.js';

/** Certificate key type → the plain key type it certifies. */
export const CERTIFICATE_TYPES: ReadonlyMap<string, SshKeyType> = new Map([
  ['ssh-ed25519-cert-v01@openssh.com', 'ssh-ed25519'],
  ['ecdsa-sha2-nistp256-cert-v01@openssh.com', 'ecdsa-sha2-nistp256'],
  ['ecdsa-sha2-nistp384-cert-v01@openssh.com', 'ecdsa-sha2-nistp384'],
  ['ecdsa-sha2-nistp521-cert-v01@openssh.com', 'ecdsa-sha2-nistp521'],
  ['ssh-rsa-cert-v01@openssh.com', 'ssh-rsa'],
]);

export const CERT_TYPE_USER = 1;
export const CERT_TYPE_HOST = 2;
/** valid_before of a certificate that never expires (`ssh-keygen -V always:forever`). */
export const CERT_FOREVER = 0xffff_ffff_ffff_ffffn;

/** As OpenSSH (SSHKEY_CERT_MAX_PRINCIPALS). */
export const MAX_CERT_PRINCIPALS = 256;
/** Far above any real certificate (a 16384-bit RSA key certified by a 16384-bit RSA CA is ~5 KiB). */
export const MAX_CERT_BYTES = 64 * 1024;
const MAX_CERT_OPTIONS = 64;

export interface CertificateOption {
  name: string;
  /** The option's data as carried (for most, a string holding the value, or empty). */
  data: Buffer;
}

export interface Certificate {
  /** The certificate's key type, e.g. `ssh-ed25519-cert-v01@openssh.com`. */
  certType: string;
  /** The certified key's plain type. */
  keyType: SshKeyType;
  /** The certified key as a plain public blob: its fingerprint is the key's. */
  publicBlob: Buffer;
  fingerprint: string;
  nonce: Buffer;
  serial: bigint;
  kind: 'user' | 'host';
  keyId: string;
  principals: string[];
  validAfter: bigint;
  validBefore: bigint;
  criticalOptions: CertificateOption[];
  extensions: CertificateOption[];
  /** The CA's plain public key blob. */
  signatureKey: Buffer;
  /** The CA's signature blob (`string algorithm, string signature`). */
  signature: Buffer;
  /** The CA signature's algorithm (`ssh-ed25519`, `rsa-sha2-512`, `ssh-rsa`, …). */
  signatureAlgorithm: string;
  /** The whole certificate, as given. */
  blob: Buffer;
  /** The bytes the CA signed (every byte before the signature). */
  signedBytes: Buffer;
}

export function isCertificateType(type: string): boolean {
  return CERTIFICATE_TYPES.has(type);
}

/** Whether a public blob names a certificate type (its type string only; nothing else is checked). */
export function isCertificateBlob(blob: Buffer): boolean {
  try {
    return isCertificateType(blobKeyType(blob));
  } catch {
    return false;
  }
}

/** A string that must not hold NUL (as OpenSSH's sshbuf_get_cstring). */
function cstring(r: WireReader, what: string): string {
  const bytes = r.string();
  if (bytes.includes(0)) throw new WireFormatError(`certificate ${what} holds a NUL byte`);
  return bytes.toString('utf8');
}

function options(packed: Buffer, what: string): CertificateOption[] {
  const r = new WireReader(packed);
  const out: CertificateOption[] = [];
  while (r.remaining > 0) {
    if (out.length >= MAX_CERT_OPTIONS) throw new WireFormatError(`too many certificate ${what}`);
    const name = cstring(r, what);
    // Copies: the certificate may outlive the request bytes it was read from.
    out.push({ name, data: Buffer.from(r.string()) });
  }
  return out;
}

/** The plain public key's fields, read from the certificate, re-encoded as a plain blob. */
function certifiedKeyBlob(r: WireReader, keyType: SshKeyType): Buffer {
  const w = new WireWriter().string(keyType);
  // Copied as read (rsa: e, n; ecdsa: curve, Q): the blob is the one the key's owner would have, and
  // an add checks it byte for byte against the private key's own.
  if (keyType === 'ssh-ed25519') w.string(r.string());
  else w.string(r.string()).string(r.string());
  return w.toBuffer();
}

/** A key the crypto library takes; whatever it throws becomes a WireFormatError. */
function checkedKey(blob: Buffer, what: string): void {
  try {
    publicKeyFromBlob(blob);
  } catch (err) {
    throw err instanceof WireFormatError ? err : new WireFormatError(`bad ${what} in certificate`);
  }
}

/**
 * Parses a certificate blob and checks its structure: a known certificate type, a valid certified
 * key, a valid plain CA key, bounded principals and options, nothing trailing. Does not verify the
 * CA signature (see `verifyCertificate`).
 */
export function parseCertificate(blob: Buffer): Certificate {
  if (blob.length > MAX_CERT_BYTES) throw new WireFormatError('certificate too large');
  const r = new WireReader(blob);
  const certType = r.utf8();
  const keyType = CERTIFICATE_TYPES.get(certType);
  if (!keyType) throw new WireFormatError(`not a supported certificate type (${JSON.stringify(certType.slice(0, 64))})`);
  const nonce = Buffer.from(r.string());
  const publicBlob = certifiedKeyBlob(r, keyType);
  // Same checks as a plain key (length, curve, point on the curve, RSA size).
  checkedKey(publicBlob, 'certified key');
  const serial = r.uint64();
  const typeCode = r.uint32();
  if (typeCode !== CERT_TYPE_USER && typeCode !== CERT_TYPE_HOST) throw new WireFormatError('certificate is neither a user nor a host certificate');
  const keyId = cstring(r, 'key id');
  const principalsReader = new WireReader(r.string());
  const principals: string[] = [];
  while (principalsReader.remaining > 0) {
    if (principals.length >= MAX_CERT_PRINCIPALS) throw new WireFormatError('too many certificate principals');
    principals.push(cstring(principalsReader, 'principal'));
  }
  const validAfter = r.uint64();
  const validBefore = r.uint64();
  const criticalOptions = options(r.string(), 'critical options');
  const extensions = options(r.string(), 'extensions');
  r.string(); // reserved: ignored, as OpenSSH
  const signatureKey = Buffer.from(r.string());
  const signedEnd = r.position;
  const signature = Buffer.from(r.string());
  r.end();
  let signatureKeyType: string;
  try {
    signatureKeyType = blobKeyType(signatureKey);
  } catch {
    throw new WireFormatError('bad certificate signature key');
  }
  // As OpenSSH (sshkey_type_is_valid_ca): a CA is a plain key, never a certificate.
  if (isCertificateType(signatureKeyType)) throw new WireFormatError('certificate signed by a certificate');
  checkedKey(signatureKey, 'CA key');
  const { algorithm: signatureAlgorithm } = parseSignatureBlob(signature);
  const copy = Buffer.from(blob);
  return {
    certType,
    keyType,
    publicBlob,
    fingerprint: fingerprint(publicBlob),
    nonce,
    serial,
    kind: typeCode === CERT_TYPE_USER ? 'user' : 'host',
    keyId,
    principals,
    validAfter,
    validBefore,
    criticalOptions,
    extensions,
    signatureKey,
    signature,
    signatureAlgorithm,
    blob: copy,
    signedBytes: copy.subarray(0, signedEnd),
  };
}

/**
 * Whether the CA's signature over the certificate verifies. Any algorithm fitting the CA key is
 * taken (SHA-1 `ssh-rsa` too, as OpenSSH when it parses a certificate); narrow it with `allowed`.
 */
export function verifyCertificate(cert: Certificate, allowed?: readonly string[]): boolean {
  if (allowed && !allowed.includes(cert.signatureAlgorithm)) return false;
  return verifySsh(cert.signatureKey, cert.signature, cert.signedBytes, true);
}

/** Parses a certificate and verifies its CA signature; throws WireFormatError if either fails. */
export function parseVerifiedCertificate(blob: Buffer): Certificate {
  const cert = parseCertificate(blob);
  if (!verifyCertificate(cert)) throw new WireFormatError('certificate signature does not verify');
  return cert;
}

/** Seconds since the epoch, as certificates count time. */
export function epochSeconds(ms: number = Date.now()): bigint {
  return BigInt(Math.floor(ms / 1000));
}

/** As OpenSSH: valid from valid_after (inclusive) until valid_before (exclusive). */
export function certificateValidAt(cert: Certificate, seconds: bigint): boolean {
  return seconds >= cert.validAfter && seconds < cert.validBefore;
}

/** OpenSSH's SSH_ALLOWED_CA_SIGALGS (minus security keys): the CA signatures a host certificate may carry. */
export const ALLOWED_CA_SIGNATURE_ALGORITHMS: readonly string[] = [
  'ssh-ed25519',
  'ecdsa-sha2-nistp256',
  'ecdsa-sha2-nistp384',
  'ecdsa-sha2-nistp521',
  'rsa-sha2-512',
  'rsa-sha2-256',
];

/** OpenSSH's match_pattern: `*` any run, `?` any one character, everything else literal. */
export function matchPattern(text: string, pattern: string): boolean {
  // Iterative with one backtrack point per `*`: linear-ish, no recursion to blow the stack.
  let t = 0;
  let p = 0;
  let starP = -1;
  let starT = 0;
  while (t < text.length) {
    if (p < pattern.length && (pattern[p] === '?' || pattern[p] === text[t])) {
      t++;
      p++;
    } else if (p < pattern.length && pattern[p] === '*') {
      starP = p++;
      starT = t;
    } else if (starP >= 0) {
      p = starP + 1;
      t = ++starT;
    } else {
      return false;
    }
  }
  while (p < pattern.length && pattern[p] === '*') p++;
  return p === pattern.length;
}

// Host certificates seen in session-binds are checked again for each hop of each signature: the
// parse and CA signature check are done once per certificate.
const MAX_REMEMBERED_CERTIFICATES = 256;
const verifiedHostCertificates = new Map<string, Certificate | null>();

/** A host key blob as a verified certificate, or null (a plain key, or a certificate that fails). */
export function verifiedCertificateOf(blob: Buffer): Certificate | null {
  const id = blob.toString('latin1');
  if (verifiedHostCertificates.has(id)) return verifiedHostCertificates.get(id)!;
  let cert: Certificate | null = null;
  if (isCertificateBlob(blob)) {
    try {
      cert = parseVerifiedCertificate(blob);
    } catch {
      cert = null;
    }
  }
  if (verifiedHostCertificates.size >= MAX_REMEMBERED_CERTIFICATES) verifiedHostCertificates.clear();
  verifiedHostCertificates.set(id, cert);
  return cert;
}

/**
 * Whether a bound host key is a host certificate that a destination constraint's CA key
 * (`@cert-authority` in known_hosts, a hop key with is_ca set) vouches for `hostname` now. Follows
 * OpenSSH's match_key_hop / sshkey_cert_check_host: the certificate's CA key must equal
 * `caKeyBlob` and its CA signature verify with an algorithm of SSH_ALLOWED_CA_SIGALGS (SHA-1
 * `ssh-rsa` is not), it must be a host certificate, valid now (valid_after <= now < valid_before),
 * carry no critical options, and have a principal that, as a wildcard pattern (`*`, `?`), matches
 * `hostname`. A certificate without principals matches no name: OpenSSH 9.2 let it match any
 * (fail open; CVE-2024-7594 was such a certificate), OpenSSH since 10.3 refuses it, and a
 * destination constraint is a restriction, so keyhold takes the stricter reading. Without a
 * hostname (the origin hop) OpenSSH matches against the literal "(ORIGIN)": pass that.
 */
export function hostCertificateMatches(boundHostKey: Buffer, caKeyBlob: Buffer, hostname: string, nowMs: number = Date.now()): boolean {
  const cert = verifiedCertificateOf(boundHostKey);
  if (!cert || cert.kind !== 'host') return false;
  if (!cert.signatureKey.equals(caKeyBlob)) return false;
  if (!ALLOWED_CA_SIGNATURE_ALGORITHMS.includes(cert.signatureAlgorithm)) return false;
  if (!certificateValidAt(cert, epochSeconds(nowMs))) return false;
  if (cert.criticalOptions.length > 0) return false;
  return cert.principals.some((principal) => matchPattern(hostname, principal));
}

/**
 * The plain host key a bound host key stands for: the certified key of a (verified) host
 * certificate, else the blob itself. Policy host matching and audit `host_key` use its fingerprint.
 */
export function boundPlainHostKey(blob: Buffer): Buffer {
  return verifiedCertificateOf(blob)?.publicBlob ?? blob;
}

function formatTime(seconds: bigint): string {
  if (seconds >= CERT_FOREVER) return 'forever';
  // Beyond Date's range: shown as forever too (no real certificate gets there).
  if (seconds > 8_640_000_000_000n) return 'forever';
  return new Date(Number(seconds) * 1000).toISOString().replace(/\.000Z$/, 'Z');
}

/** One line for people: `user certificate "id" serial 7 for alice,bob valid 2026-…Z to forever (expired)`. */
export function describeCertificate(cert: Certificate, nowMs: number = Date.now()): string {
  const now = epochSeconds(nowMs);
  const validity =
    cert.validAfter === 0n && cert.validBefore >= CERT_FOREVER ? 'valid always' : `valid ${cert.validAfter === 0n ? 'always' : formatTime(cert.validAfter)} to ${formatTime(cert.validBefore)}`;
  const state = now >= cert.validBefore ? ' (expired)' : now < cert.validAfter ? ' (not yet valid)' : '';
  const principals = cert.principals.length === 0 ? 'any principal' : `for ${cert.principals.join(',')}`;
  return `${cert.kind} certificate ${JSON.stringify(cert.keyId)} serial ${cert.serial} ${principals} ${validity}${state}`;
}
