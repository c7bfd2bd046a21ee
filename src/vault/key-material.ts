// Private keys in and out of the vault: generation, import of the usual file formats, and the
// PKCS#8 DER the vault stores. Everything ends up as a node:crypto KeyObject.
import { createPrivateKey, createPublicKey, generateKeyPair, sign, verify, type KeyObject } from 'node:crypto';
import { promisify } from 'node:util';
import type Sshpk from 'sshpk';
import { loadOnFirstUse } from '../load-on-first-use.js';
import { curveBySshType, describeKey, type PublicKeyInfo } from '../agent-protocol/public-key.js';
import { WireReader } from '../agent-protocol/wire.js';
import { fromBigInt, modInverse, toBigInt } from '../agent-protocol/bignum.js';
import { EXIT, KeyholdError, usageError } from '../errors.js';

export const KEY_TYPES = ['ed25519', 'rsa', 'ecdsa'] as const;
export type KeyKind = (typeof KEY_TYPES)[number];

export const RSA_BITS = { min: 2048, max: 16384, default: 3072 } as const;
export const ECDSA_BITS = [256, 384, 521] as const;

const generateKeyPairAsync = promisify(generateKeyPair);

/** Generates a key off the event loop (RSA-16384 takes seconds; a daemon must keep serving meanwhile). */
export async function generatePrivateKey(kind: KeyKind, bits?: number): Promise<KeyObject> {
  switch (kind) {
    case 'ed25519':
      if (bits !== undefined && bits !== 256) throw usageError('ed25519 keys have a fixed size', 'drop --bits');
      return (await generateKeyPairAsync('ed25519')).privateKey;
    case 'rsa': {
      const modulusLength = bits ?? RSA_BITS.default;
      if (!Number.isInteger(modulusLength) || modulusLength < RSA_BITS.min || modulusLength > RSA_BITS.max || modulusLength % 8 !== 0) {
        throw usageError(`RSA keys must be ${RSA_BITS.min} to ${RSA_BITS.max} bits, a multiple of 8`, 'e.g. --bits 3072');
      }
      return (await generateKeyPairAsync('rsa', { modulusLength, publicExponent: 0x10001 })).privateKey;
    }
    case 'ecdsa': {
      const size = bits ?? 256;
      const namedCurve = ({ 256: 'P-256', 384: 'P-384', 521: 'P-521' } as Record<number, string>)[size];
      if (!namedCurve) throw usageError('ECDSA keys are 256, 384 or 521 bits', 'e.g. --bits 256');
      return (await generateKeyPairAsync('ec', { namedCurve })).privateKey;
    }
    default:
      throw usageError(`unknown key type ${JSON.stringify(String(kind).slice(0, 20))}`, `use one of ${KEY_TYPES.join(', ')}`);
  }
}

/** Checks that keyhold can serve the key and returns its public description. */
export function describeSupportedKey(key: KeyObject): PublicKeyInfo {
  let info: PublicKeyInfo;
  try {
    info = describeKey(key);
  } catch {
    throw new KeyholdError(
      `unsupported key type ${String(key.asymmetricKeyType)}`,
      'keyhold holds ed25519, rsa and ecdsa (nistp256/384/521) keys',
    );
  }
  if (info.type === 'ssh-rsa' && (info.bits < RSA_BITS.min || info.bits > RSA_BITS.max)) {
    throw new KeyholdError(
      `RSA key of ${info.bits} bits refused`,
      `RSA keys must be ${RSA_BITS.min} to ${RSA_BITS.max} bits; generate a new key`,
    );
  }
  return info;
}

export function toPkcs8(key: KeyObject): Buffer {
  return key.export({ format: 'der', type: 'pkcs8' });
}

export function fromPkcs8(der: Buffer): KeyObject {
  const key = createPrivateKey({ key: der, format: 'der', type: 'pkcs8' });
  return key.asymmetricKeyType === 'rsa' ? withSoundCrt(key) : key;
}

/** Keys imported before rsaFromParts may carry bad CRT values (slow signing): recompute them. */
function withSoundCrt(key: KeyObject): KeyObject {
  const jwk = key.export({ format: 'jwk' });
  if (!jwk.p || !jwk.q || !jwk.d) return key;
  const [d, p, q] = [jwk.d, jwk.p, jwk.q].map((v) => toBig(Buffer.from(v, 'base64url'))) as [bigint, bigint, bigint];
  const sound = { dp: toB64u(d % (p - 1n)), dq: toB64u(d % (q - 1n)), qi: toB64u(modInverse(q, p)) };
  if (jwk.dp === sound.dp && jwk.dq === sound.dq && jwk.qi === sound.qi) return key;
  return createPrivateKey({ key: { ...jwk, ...sound }, format: 'jwk' });
}

/** fromPkcs8 for bytes from outside: a clear error instead of OpenSSL's. */
export function parsePkcs8(der: Buffer): KeyObject {
  try {
    return fromPkcs8(der);
  } catch {
    throw usageError('not a PKCS#8 private key');
  }
}

export interface ParsedKeyFile {
  key: KeyObject;
  /** The comment stored in the file (OpenSSH format only). */
  comment?: string;
}

/** Raised when a key file is encrypted and no passphrase was given, so the caller may ask for one. */
export class KeyPassphraseNeeded extends KeyholdError {
  constructor(file: string) {
    super(`${file} is encrypted`, 'pass its passphrase with --key-passphrase-file F', EXIT.USAGE);
  }
}

/** sshpk and its crypto dependencies: needed only for an OpenSSH key file. */
const sshpkModule = loadOnFirstUse<typeof Sshpk>('sshpk');

const wrongKeyPassphrase = (file: string) =>
  new KeyholdError(`wrong passphrase for ${file}`, 'check --key-passphrase-file', EXIT.DENIED);

const legacyCipher = (file: string) =>
  new KeyholdError(
    `${file} is encrypted with a cipher OpenSSL 3 no longer offers (such as DES)`,
    're-encrypt it with AES: `openssl pkey -provider legacy -provider default -aes256 -in FILE -out NEW`',
  );

const unreadable = (file: string) =>
  new KeyholdError(
    `${file} is not a private key keyhold can read`,
    'use an OpenSSH, PEM (PKCS#1, SEC1) or PKCS#8 private key file',
  );

/**
 * Parses a private key file: OpenSSH (encrypted too, via sshpk), PEM PKCS#1 / SEC1 / PKCS#8
 * (encrypted too) and DER PKCS#8 (via node:crypto). `name` is only used in messages.
 */
export function parsePrivateKeyFile(bytes: Buffer, name: string, passphrase?: Buffer): ParsedKeyFile {
  const text = bytes.toString('latin1');
  if (text.includes('-----BEGIN OPENSSH PRIVATE KEY-----')) return parseOpenSsh(bytes, name, passphrase);
  if (/^(ssh-|ecdsa-sha2-)\S+ [A-Za-z0-9+/=]+/.test(text.trimStart()) || text.includes('-----BEGIN PUBLIC KEY-----')) {
    throw new KeyholdError(`${name} holds a public key`, 'import the private key file instead');
  }
  if (text.includes('-----BEGIN')) {
    try {
      return { key: createPrivateKey({ key: bytes, format: 'pem', passphrase }) };
    } catch (err) {
      const code = (err as { code?: string }).code;
      // Node reports a missing passphrase as ERR_MISSING_PASSPHRASE or, with OpenSSL 3, as an
      // interrupted password callback.
      if (!passphrase && (code === 'ERR_MISSING_PASSPHRASE' || code === 'ERR_OSSL_CRYPTO_INTERRUPTED_OR_CANCELLED')) {
        throw new KeyPassphraseNeeded(name);
      }
      // DES, RC2 and the like live in OpenSSL 3's legacy provider, which node does not load: this
      // is the cipher, whatever the passphrase.
      if (code === 'ERR_OSSL_EVP_UNSUPPORTED') throw legacyCipher(name);
      // A wrong passphrase passes CBC's padding check about one time in 256 and then fails in the
      // ASN.1 parser instead: for an encrypted file, any other failure with a passphrase is a wrong one.
      if (passphrase && isEncryptedPem(text)) throw wrongKeyPassphrase(name);
      throw unreadable(name);
    }
  }
  try {
    return { key: createPrivateKey({ key: bytes, format: 'der', type: 'pkcs8' }) };
  } catch {
    throw unreadable(name);
  }
}

/** Legacy PEM encryption (RFC 1421 headers) or an encrypted PKCS#8 block. */
function isEncryptedPem(text: string): boolean {
  return /^Proc-Type:\s*4,\s*ENCRYPTED\s*$/m.test(text) || text.includes('-----BEGIN ENCRYPTED PRIVATE KEY-----');
}

function parseOpenSsh(bytes: Buffer, name: string, passphrase?: Buffer): ParsedKeyFile {
  let parsed: Sshpk.PrivateKey;
  const sshpk = sshpkModule();
  try {
    parsed = sshpk.parsePrivateKey(bytes, 'openssh', passphrase ? { passphrase } : undefined);
  } catch (err) {
    const errName = (err as Error).name;
    if (errName === 'KeyEncryptedError') throw new KeyPassphraseNeeded(name);
    if (/passphrase/i.test((err as Error).message)) throw wrongKeyPassphrase(name);
    throw unreadable(name);
  }
  const comment = parsed.comment && parsed.comment !== '(unnamed)' ? parsed.comment : undefined;
  let key: KeyObject;
  try {
    if (parsed.type === 'ed25519') {
      // sshpk's PKCS#8 output for ed25519 is not what OpenSSL reads; build the key from its parts.
      const parts = parsed.part as unknown as Record<string, { data: Buffer }>;
      key = createPrivateKey({
        key: {
          kty: 'OKP',
          crv: 'Ed25519',
          d: parts.k!.data.subarray(0, 32).toString('base64url'),
          x: parts.A!.data.toString('base64url'),
        },
        format: 'jwk',
      });
    } else if (parsed.type === 'rsa') {
      key = rsaFromParts(parsed.part as unknown as Record<string, { data: Buffer }>);
    } else if (parsed.type === 'ecdsa') {
      key = createPrivateKey({ key: parsed.toBuffer('pkcs8'), format: 'pem' });
    } else {
      throw new KeyholdError(`unsupported key type ${parsed.type} in ${name}`, 'keyhold holds ed25519, rsa and ecdsa keys');
    }
  } catch (err) {
    if (err instanceof KeyholdError) throw err;
    throw unreadable(name);
  }
  checkConsistent(key, bytes, name);
  return comment === undefined ? { key } : { key, comment };
}

/**
 * An OpenSSH key file names its public key outside the (possibly encrypted) private section, as
 * OpenSSH checks on load: the private key must match it, and must sign what that public key
 * verifies. A damaged file is refused instead of importing some other key.
 */
function checkConsistent(key: KeyObject, file: Buffer, name: string): void {
  const corrupt = () => new KeyholdError(`${name} is damaged: its private key does not match its public key`, 'import an intact copy');
  let outerPublic: Buffer;
  try {
    const body = file.toString('latin1').replace(/-----(BEGIN|END) OPENSSH PRIVATE KEY-----/g, '').replace(/\s+/g, '');
    const decoded = Buffer.from(body, 'base64');
    const magic = Buffer.from('openssh-key-v1\0');
    if (!decoded.subarray(0, magic.length).equals(magic)) throw corrupt();
    const r = new WireReader(decoded.subarray(magic.length));
    r.string(); // cipher
    r.string(); // kdf
    r.string(); // kdf options
    if (r.uint32() !== 1) throw corrupt();
    outerPublic = r.string();
  } catch {
    throw corrupt();
  }
  const info = describeKey(key);
  if (!info.blob.equals(outerPublic)) throw corrupt();
  const probe = Buffer.from('keyhold import check');
  const hash = info.type === 'ssh-ed25519' ? null : info.type === 'ssh-rsa' ? 'sha256' : curveBySshType(info.type)!.hash;
  if (!verify(hash, probe, createPublicKey(key), sign(hash, probe, key))) throw corrupt();
}

const toBig = toBigInt;
const toB64u = (n: bigint) => fromBigInt(n).toString('base64url');

/**
 * An RSA key from OpenSSH's parts (n, e, d, iqmp, p, q), with the CRT exponents computed here.
 * sshpk's PKCS#8 output carries CRT values OpenSSL does not accept, and OpenSSL then silently
 * signs without CRT: correct signatures, four times slower.
 */
function rsaFromParts(parts: Record<string, { data: Buffer }>): KeyObject {
  const [n, e, d, p, q] = (['n', 'e', 'd', 'p', 'q'] as const).map((name) => toBig(parts[name]!.data)) as [bigint, bigint, bigint, bigint, bigint];
  return createPrivateKey({
    key: {
      kty: 'RSA',
      n: toB64u(n),
      e: toB64u(e),
      d: toB64u(d),
      p: toB64u(p),
      q: toB64u(q),
      dp: toB64u(d % (p - 1n)),
      dq: toB64u(d % (q - 1n)),
      qi: toB64u(modInverse(q, p)),
    },
    format: 'jwk',
  });
}
