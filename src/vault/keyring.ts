// `vault.db.keys`: the vault's master key, wrapped once per unlock factor. Nothing in it is secret
// in the clear: a wrap is AES-256-GCM under a key-encryption key (KEK) derived from the factor,
// with the vault id and factor id bound as associated data so a wrap cannot be moved elsewhere.
import { createCipheriv, createDecipheriv, randomBytes, scrypt as scryptCb, type ScryptOptions } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { EXIT, KeyholdError } from '../errors.js';
import { writeFileAtomic } from './atomic-file.js';

export const KEYRING_FORMAT = 'keyhold-keys';
export const KEYRING_VERSION = 1;
export const MASTER_KEY_BYTES = 32;

export interface ScryptParams {
  name: 'scrypt';
  log2n: number;
  r: number;
  p: number;
  salt: string;
}

export interface Wrap {
  alg: 'A256GCM';
  nonce: string;
  ciphertext: string;
  tag: string;
}

export interface PassphraseFactor {
  id: string;
  type: 'passphrase';
  created: string;
  kdf: ScryptParams;
  wrap: Wrap;
}

export type Factor = PassphraseFactor;

export interface Keyring {
  format: typeof KEYRING_FORMAT;
  version: number;
  vault_id: string;
  policy: 'any';
  factors: Factor[];
}

/**
 * scrypt cost bounds, enforced on every file we read: a tampered file must not make us spend
 * minutes or gigabytes (upper bound) or accept a trivially brute-forced KEK (lower bound).
 */
export const SCRYPT_BOUNDS = { log2n: [14, 20], r: [1, 32], p: [1, 16] } as const;
const SCRYPT_MAX_MEMORY = 1024 * 1024 * 1024;
export const DEFAULT_SCRYPT = { log2n: 17, r: 8, p: 1 } as const;

/** Default scrypt cost; KEYHOLD_KDF_LOG2N lowers it (within bounds) for test suites. */
export function defaultScryptCost(env: NodeJS.ProcessEnv = process.env): { log2n: number; r: number; p: number } {
  const override = env.KEYHOLD_KDF_LOG2N;
  if (!override) return { ...DEFAULT_SCRYPT };
  const log2n = Number(override);
  if (!Number.isInteger(log2n) || log2n < SCRYPT_BOUNDS.log2n[0] || log2n > SCRYPT_BOUNDS.log2n[1]) {
    throw new KeyholdError(
      `KEYHOLD_KDF_LOG2N must be an integer from ${SCRYPT_BOUNDS.log2n[0]} to ${SCRYPT_BOUNDS.log2n[1]}`,
      'unset it to use the default cost',
      EXIT.USAGE,
    );
  }
  return { ...DEFAULT_SCRYPT, log2n };
}

function checkScrypt(params: ScryptParams): void {
  const within = (v: number, [lo, hi]: readonly [number, number]) => Number.isInteger(v) && v >= lo && v <= hi;
  if (
    params.name !== 'scrypt' ||
    !within(params.log2n, SCRYPT_BOUNDS.log2n) ||
    !within(params.r, SCRYPT_BOUNDS.r) ||
    !within(params.p, SCRYPT_BOUNDS.p) ||
    128 * params.r * 2 ** params.log2n > SCRYPT_MAX_MEMORY
  ) {
    throw malformed('scrypt parameters out of bounds');
  }
}

function deriveScrypt(secret: Buffer, params: ScryptParams): Promise<Buffer> {
  const options: ScryptOptions = {
    N: 2 ** params.log2n,
    r: params.r,
    p: params.p,
    maxmem: 128 * params.r * 2 ** params.log2n + 16 * 1024 * 1024,
  };
  return new Promise((resolve, reject) =>
    scryptCb(secret, Buffer.from(params.salt, 'base64'), 32, options, (err, key) => (err ? reject(err) : resolve(key))),
  );
}

function associatedData(vaultId: string, factorId: string): Buffer {
  return Buffer.from(`keyhold-keys-v1\0${vaultId}\0${factorId}`);
}

function wrapKey(kek: Buffer, masterKey: Buffer, aad: Buffer): Wrap {
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', kek, nonce);
  cipher.setAAD(aad);
  const ciphertext = Buffer.concat([cipher.update(masterKey), cipher.final()]);
  return {
    alg: 'A256GCM',
    nonce: nonce.toString('base64'),
    ciphertext: ciphertext.toString('base64'),
    tag: cipher.getAuthTag().toString('base64'),
  };
}

/** Returns the master key, or null when the KEK (or the wrap) is wrong. */
function unwrapKey(kek: Buffer, wrap: Wrap, aad: Buffer): Buffer | null {
  try {
    const decipher = createDecipheriv('aes-256-gcm', kek, Buffer.from(wrap.nonce, 'base64'));
    decipher.setAAD(aad);
    decipher.setAuthTag(Buffer.from(wrap.tag, 'base64'));
    const key = Buffer.concat([decipher.update(Buffer.from(wrap.ciphertext, 'base64')), decipher.final()]);
    return key.length === MASTER_KEY_BYTES ? key : null;
  } catch {
    return null;
  }
}

export function newVaultId(): string {
  return randomBytes(16).toString('base64url');
}

export async function passphraseFactor(
  vaultId: string,
  masterKey: Buffer,
  passphrase: Buffer,
  cost = defaultScryptCost(),
): Promise<PassphraseFactor> {
  const id = `pp-${randomBytes(4).toString('hex')}`;
  const kdf: ScryptParams = { name: 'scrypt', ...cost, salt: randomBytes(16).toString('base64') };
  checkScrypt(kdf);
  const kek = await deriveScrypt(passphrase, kdf);
  try {
    return { id, type: 'passphrase', created: new Date().toISOString(), kdf, wrap: wrapKey(kek, masterKey, associatedData(vaultId, id)) };
  } finally {
    kek.fill(0);
  }
}

/** Tries every passphrase factor; exit 4 when none accepts the passphrase. */
export async function unwrapWithPassphrase(keyring: Keyring, passphrase: Buffer): Promise<Buffer> {
  const factors = keyring.factors.filter((f) => f.type === 'passphrase');
  if (factors.length === 0) {
    throw new KeyholdError('this vault has no passphrase factor', 'unlock it with another factor', EXIT.DENIED);
  }
  for (const factor of factors) {
    const kek = await deriveScrypt(passphrase, factor.kdf);
    const key = unwrapKey(kek, factor.wrap, associatedData(keyring.vault_id, factor.id));
    kek.fill(0);
    if (key) return key;
  }
  throw new KeyholdError('wrong passphrase', 'nothing was changed; try again', EXIT.DENIED);
}

function malformed(detail: string): KeyholdError {
  return new KeyholdError(`vault key file is malformed: ${detail}`, 'restore vault.db.keys from a backup');
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
/** Canonical base64 only: a spelling that decodes to the same bytes is still an edit. */
const isB64 = (v: unknown, bytes?: number): v is string => {
  if (typeof v !== 'string') return false;
  const decoded = Buffer.from(v, 'base64');
  return decoded.toString('base64') === v && (bytes === undefined || decoded.length === bytes);
};

function parseWrap(v: unknown): Wrap {
  if (!isObject(v) || v.alg !== 'A256GCM' || !isB64(v.nonce, 12) || !isB64(v.ciphertext, MASTER_KEY_BYTES) || !isB64(v.tag, 16)) {
    throw malformed('bad wrapped key');
  }
  return { alg: 'A256GCM', nonce: v.nonce, ciphertext: v.ciphertext, tag: v.tag };
}

function parseFactor(v: unknown): Factor {
  if (!isObject(v) || typeof v.id !== 'string' || !/^[a-z]+-[0-9a-f]{8}$/.test(v.id) || typeof v.created !== 'string') {
    throw malformed('bad factor');
  }
  if (v.type !== 'passphrase') throw malformed(`unknown factor type ${JSON.stringify(String(v.type).slice(0, 32))}`);
  const kdf = v.kdf;
  if (!isObject(kdf) || !isB64(kdf.salt) || Buffer.from(String(kdf.salt), 'base64').length < 16) throw malformed('bad kdf');
  const params: ScryptParams = {
    name: kdf.name as 'scrypt',
    log2n: Number(kdf.log2n),
    r: Number(kdf.r),
    p: Number(kdf.p),
    salt: kdf.salt,
  };
  checkScrypt(params);
  return { id: v.id, type: 'passphrase', created: v.created, kdf: params, wrap: parseWrap(v.wrap) };
}

export function parseKeyring(text: string): Keyring {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    throw malformed('not JSON');
  }
  if (!isObject(doc) || doc.format !== KEYRING_FORMAT) throw malformed('not a keyhold key file');
  if (doc.version !== KEYRING_VERSION) {
    throw new KeyholdError(
      `vault key file version ${String(doc.version)} is not supported by this keyhold (supports ${KEYRING_VERSION})`,
      'upgrade keyhold',
    );
  }
  if (typeof doc.vault_id !== 'string' || !/^[A-Za-z0-9_-]{22}$/.test(doc.vault_id)) throw malformed('bad vault id');
  if (doc.policy !== 'any') throw malformed('unknown policy');
  if (!Array.isArray(doc.factors) || doc.factors.length === 0) throw malformed('no factors');
  const factors = doc.factors.map(parseFactor);
  if (new Set(factors.map((f) => f.id)).size !== factors.length) throw malformed('duplicate factor id');
  return { format: KEYRING_FORMAT, version: KEYRING_VERSION, vault_id: doc.vault_id, policy: 'any', factors };
}

export function readKeyring(path: string): Keyring {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new KeyholdError(`no vault key file at ${path}`, 'create a vault with `keyhold init`, or pass --vault');
    }
    throw new KeyholdError(`cannot read ${path}: ${(err as Error).message}`);
  }
  return parseKeyring(text);
}

export function writeKeyring(path: string, keyring: Keyring): void {
  writeFileAtomic(path, JSON.stringify(keyring, null, 2) + '\n', 0o600);
}
