// `vault.db.keys`: the vault's master key, wrapped by its unlock factors. Nothing in it is secret
// in the clear: a wrap is AES-256-GCM under a key-encryption key (KEK) derived from a factor, with
// the vault id and the factor id(s) bound as associated data so a wrap cannot be moved elsewhere.
//
// Policy `any`: every factor wraps the master key on its own; any one of them unlocks.
// Policy `all`: one wrap under a KEK derived from every factor's KEK together; all are needed.
// Changing factors rewraps the master key; the database is never re-encrypted.
import { existsSync } from 'node:fs';
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import * as v from 'valibot';
import { readCapped } from '../read-capped.js';
import { EXIT, KeyholdError, usageError } from '../errors.js';
import { writeFileAtomic } from './atomic-file.js';
import { isCanonicalBase64, type EnrolledFactor as EnrolledFactorOf, type FactorKeks } from '../unlock/factor-kind.js';
import { describeFactor, kindOf, sealedFactorSchemaOf, unsealedFactorSchemaOf, type Factor } from '../unlock/kinds.js';

export type { FactorKeks } from '../unlock/factor-kind.js';
export type { Factor, FactorType, UnsealedFactor } from '../unlock/kinds.js';
/** A factor of any kind before it is sealed into a keyring, with its KEK. */
export type EnrolledFactor = EnrolledFactorOf<Factor>;

export const KEYRING_FORMAT = 'keyhold-keys';
export const KEYRING_VERSION = 1;
export const MASTER_KEY_BYTES = 32;
export const POLICIES = ['any', 'all'] as const;
export type Policy = (typeof POLICIES)[number];

export interface Wrap {
  alg: 'A256GCM';
  nonce: string;
  ciphertext: string;
  tag: string;
}

export interface Keyring {
  format: typeof KEYRING_FORMAT;
  version: number;
  vault_id: string;
  policy: Policy;
  factors: Factor[];
  /** Policy `all`: the master key under the KEK combined from every factor. */
  wrap?: Wrap;
}

const ALL_POLICY_INFO = 'keyhold-all-factors-v1';

function factorAad(vaultId: string, factorId: string): Buffer {
  return Buffer.from(`keyhold-keys-v1\0${vaultId}\0${factorId}`);
}

function allAad(vaultId: string, factorIds: string[]): Buffer {
  return Buffer.from(`keyhold-keys-v1\0${vaultId}\0all\0${factorIds.join(',')}`);
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

/** Policy `all`: one KEK from every factor's KEK, in the keyring's factor order. */
function combinedKek(vaultId: string, factors: Factor[], keks: FactorKeks): Buffer {
  const parts = factors.map((f) => {
    const kek = keks.get(f.id);
    if (!kek) throw new Error(`missing KEK for factor ${f.id}`);
    return kek;
  });
  const ikm = Buffer.concat(parts);
  try {
    const info = `${ALL_POLICY_INFO}\0${factors.map((f) => f.id).join(',')}`;
    return Buffer.from(hkdfSync('sha256', ikm, Buffer.from(vaultId), info, 32));
  } finally {
    ikm.fill(0);
  }
}

export function newVaultId(): string {
  return randomBytes(16).toString('base64url');
}

/** Builds a keyring around a new master key's wraps. Every factor's KEK is needed. */
export function sealKeyring(vaultId: string, policy: Policy, enrolled: EnrolledFactor[], masterKey: Buffer): Keyring {
  checkFactorSet(policy, enrolled.map((e) => e.factor));
  const keks: FactorKeks = new Map(enrolled.map((e) => [e.factor.id, e.kek]));
  const base = { format: KEYRING_FORMAT, version: KEYRING_VERSION, vault_id: vaultId, policy } as const;
  if (policy === 'any') {
    const factors = enrolled.map(({ factor, kek }) => ({ ...stripWrap(factor), wrap: wrapKey(kek, masterKey, factorAad(vaultId, factor.id)) }));
    return { ...base, factors };
  }
  const factors = enrolled.map((e) => stripWrap(e.factor));
  return { ...base, factors, wrap: sealAll(vaultId, factors, keks, masterKey) };
}

function sealAll(vaultId: string, factors: Factor[], keks: FactorKeks, masterKey: Buffer): Wrap {
  const kek = combinedKek(vaultId, factors, keks);
  try {
    return wrapKey(kek, masterKey, allAad(vaultId, factors.map((f) => f.id)));
  } finally {
    kek.fill(0);
  }
}

function stripWrap<F extends Factor>(factor: F): F {
  const { wrap: _unused, ...rest } = factor;
  return rest as F;
}

function checkFactorSet(policy: Policy, factors: Factor[]): void {
  if (factors.length === 0) throw usageError('a vault needs at least one unlock factor');
  if (new Set(factors.map((f) => f.id)).size !== factors.length) throw new Error('duplicate factor id');
  if (policy === 'all') {
    for (const type of new Set(factors.map((f) => f.type))) {
      const why = kindOf(type).singleUnderAllPolicy;
      if (why && factors.filter((f) => f.type === type).length > 1) throw usageError(`policy all takes at most one ${type} factor`, why);
    }
  }
}

/**
 * Unwraps the master key with the KEKs a caller proved. Under `any` one matching factor is
 * enough; under `all` every factor's KEK must be present and right. Exit 4 otherwise.
 */
export function unwrapMasterKey(keyring: Keyring, keks: FactorKeks): Buffer {
  if (keyring.policy === 'all') {
    const missing = keyring.factors.filter((f) => !keks.has(f.id));
    if (missing.length > 0) {
      throw new KeyholdError(
        `this vault needs every factor (policy all); missing ${missing.map(describeFactor).join(', ')}`,
        'provide each of them',
        EXIT.DENIED,
      );
    }
    const kek = combinedKek(keyring.vault_id, keyring.factors, keks);
    try {
      const key = unwrapKey(kek, keyring.wrap!, allAad(keyring.vault_id, keyring.factors.map((f) => f.id)));
      if (key) return key;
    } finally {
      kek.fill(0);
    }
    throw new KeyholdError('wrong passphrase or refused factor', 'nothing was changed; try again', EXIT.DENIED);
  }
  for (const factor of keyring.factors) {
    const kek = keks.get(factor.id);
    if (!kek || !factor.wrap) continue;
    const key = unwrapKey(kek, factor.wrap, factorAad(keyring.vault_id, factor.id));
    if (key) return key;
  }
  const tried = keyring.factors.filter((f) => keks.has(f.id));
  const triedTypes = new Set(tried.map((f) => f.type));
  const oneKind = triedTypes.size === 1 ? kindOf([...triedTypes][0]!) : undefined;
  throw new KeyholdError(
    oneKind?.refusedMessage ?? 'wrong passphrase or refused factor',
    'nothing was changed; try again',
    EXIT.DENIED,
  );
}


/**
 * Adds a factor. Under `any` only the new factor's KEK is needed; under `all` the combined wrap
 * is rebuilt, so `keks` must hold every existing factor's KEK too.
 */
export function withFactorAdded(keyring: Keyring, masterKey: Buffer, added: EnrolledFactor, keks: FactorKeks = new Map()): Keyring {
  if (keyring.factors.some((f) => f.id === added.factor.id)) throw new Error('duplicate factor id');
  if (keyring.policy === 'any') {
    const factor = { ...stripWrap(added.factor), wrap: wrapKey(added.kek, masterKey, factorAad(keyring.vault_id, added.factor.id)) };
    return { ...keyring, factors: [...keyring.factors, factor] };
  }
  const factors = [...keyring.factors, stripWrap(added.factor)];
  checkFactorSet('all', factors);
  const all: FactorKeks = new Map([...keks, [added.factor.id, added.kek]]);
  return { ...keyring, factors, wrap: sealAll(keyring.vault_id, factors, all, masterKey) };
}

/** Removes a factor; never the last one. Under `all` the remaining factors' KEKs are needed. */
export function withFactorRemoved(keyring: Keyring, masterKey: Buffer, factorId: string, keks: FactorKeks = new Map()): Keyring {
  if (!keyring.factors.some((f) => f.id === factorId)) {
    throw new KeyholdError(`no factor ${factorId}`, 'see `keyhold factor list`', EXIT.NOT_FOUND);
  }
  const factors = keyring.factors.filter((f) => f.id !== factorId);
  if (factors.length === 0) {
    throw new KeyholdError(`${factorId} is the last unlock factor; removing it would lock the vault for good`, 'add another factor first');
  }
  if (keyring.policy === 'any') return { ...keyring, factors };
  return { ...keyring, factors, wrap: sealAll(keyring.vault_id, factors, keks, masterKey) };
}

/** Replaces a factor in place (same id, e.g. a new passphrase), rewrapping the master key. */
export function withFactorReplaced(keyring: Keyring, masterKey: Buffer, replacement: EnrolledFactor, keks: FactorKeks = new Map()): Keyring {
  const index = keyring.factors.findIndex((f) => f.id === replacement.factor.id);
  if (index < 0) throw new KeyholdError(`no factor ${replacement.factor.id}`, 'see `keyhold factor list`', EXIT.NOT_FOUND);
  const factors = [...keyring.factors];
  if (keyring.policy === 'any') {
    factors[index] = { ...stripWrap(replacement.factor), wrap: wrapKey(replacement.kek, masterKey, factorAad(keyring.vault_id, replacement.factor.id)) };
    return { ...keyring, factors };
  }
  factors[index] = stripWrap(replacement.factor);
  const all: FactorKeks = new Map([...keks, [replacement.factor.id, replacement.kek]]);
  return { ...keyring, factors, wrap: sealAll(keyring.vault_id, factors, all, masterKey) };
}

export function zeroKeks(keks: FactorKeks): void {
  for (const kek of keks.values()) kek.fill(0);
  keks.clear();
}

// ---- reading and writing the file ----

function malformed(detail: string): KeyholdError {
  return new KeyholdError(`vault key file is malformed: ${detail}`, 'restore vault.db.keys from a backup');
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);

// ---- the schemas of what the file holds; a factor sent to the daemon is checked by the same ones ----

const base64Of = (bytes?: number) => v.pipe(v.string(), v.check((s) => isCanonicalBase64(s, bytes)));

const wrapSchema = v.object({ alg: v.literal('A256GCM'), nonce: base64Of(12), ciphertext: base64Of(MASTER_KEY_BYTES), tag: base64Of(16) });

/** A factor as enrolment makes it and a policy-`all` file stores it: without a wrap of its own. */
export const unsealedFactorSchema = unsealedFactorSchemaOf();

/** A factor of a policy-`any` file: it wraps the master key itself. */
const sealedFactorSchema = sealedFactorSchemaOf(wrapSchema);

/** A key-encryption key: 32 bytes. */
export const kekSchema = v.pipe(
  v.custom<Buffer>((value) => Buffer.isBuffer(value)),
  v.length(32),
);

/** What `addFactor` and `replaceFactor` take: a factor the file reader would accept, and its KEK. */
export const enrolledFactorSchema = v.object({ factor: unsealedFactorSchema, kek: kekSchema }) satisfies v.GenericSchema<unknown, EnrolledFactor>;

/**
 * Where an issue lies, as `field.field[index]`: object schemas name their own fields, so this
 * never holds a value from the input (no schema here is a record keyed by input).
 */
export function fieldPath(path: readonly v.IssuePathItem[] = []): string {
  return path.map((item, i) => (typeof item.key === 'number' ? `[${item.key}]` : `${i === 0 ? '' : '.'}${String(item.key)}`)).join('');
}

function parseWithSchema<T>(schema: v.GenericSchema<unknown, T>, value: unknown, where: string): T {
  const result = v.safeParse(schema, value, { abortEarly: true });
  if (!result.success) {
    const field = fieldPath(result.issues[0].path);
    throw malformed(field ? `${where}.${field}` : where);
  }
  return result.output;
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
  if (doc.policy !== 'any' && doc.policy !== 'all') throw malformed('unknown policy');
  const policy: Policy = doc.policy;
  if (!Array.isArray(doc.factors) || doc.factors.length === 0 || doc.factors.length > 64) throw malformed('no factors');
  const factorSchema: v.GenericSchema<unknown, Factor> = policy === 'any' ? sealedFactorSchema : unsealedFactorSchema;
  const factors = doc.factors.map((f, i) => parseWithSchema(factorSchema, f, `factors[${i}]`));
  if (new Set(factors.map((f) => f.id)).size !== factors.length) throw malformed('duplicate factor id');
  const keyring: Keyring = { format: KEYRING_FORMAT, version: KEYRING_VERSION, vault_id: doc.vault_id, policy, factors };
  if (policy === 'all') keyring.wrap = parseWithSchema(wrapSchema, doc.wrap, 'wrap');
  else if (doc.wrap !== undefined) throw malformed('an any-policy vault has no combined wrap');
  return keyring;
}

/**
 * The most a key file may hold. At most 64 factors, each under 6 KiB (an ssh-agent factor's key
 * blob is capped at 4096 base64 characters), is under 400 KiB; anything past 1 MiB is not one of
 * ours, and reading it whole would let a swapped file (a link to /dev/zero) eat the memory.
 */
export const MAX_KEYRING_BYTES = 1024 * 1024;

export function readKeyring(path: string): Keyring {
  const bytes = readCapped(path, MAX_KEYRING_BYTES, 'vault key file', {
    regularFile: true,
    privateFile: true,
    // Not found (5): no vault here yet. Beside an existing database it is a loss, not a fresh start.
    missing: () =>
      existsSync(path.replace(/\.keys$/, ''))
        ? new KeyholdError(`no vault key file at ${path}`, 'restore vault.db.keys from the backup of this vault.db: the vault cannot be opened without it', EXIT.NOT_FOUND)
        : new KeyholdError(`no vault at ${path.replace(/\.keys$/, '')}`, 'create one with `keyhold init`, or pass --vault / set KEYHOLD_VAULT', EXIT.NOT_FOUND),
  });
  return parseKeyring(bytes.toString('utf8'));
}

/**
 * The bytes `writeKeyring` would write, checked by the reader's own rules first: a key file the
 * next open would refuse locks the vault for good, so it is refused here and nothing is written.
 */
export function serializeKeyring(keyring: Keyring): Buffer {
  const bytes = Buffer.from(JSON.stringify(keyring, null, 2) + '\n');
  const refuse = (detail: string) =>
    new KeyholdError(`refusing to write a vault key file the reader would refuse (${detail})`, 'nothing was changed');
  if (bytes.length > MAX_KEYRING_BYTES) throw refuse(`over ${MAX_KEYRING_BYTES} bytes`);
  try {
    parseKeyring(bytes.toString('utf8'));
  } catch (err) {
    throw refuse(err instanceof KeyholdError ? err.message : 'unreadable');
  }
  return bytes;
}

export function writeKeyring(path: string, keyring: Keyring): void {
  writeKeyringBytes(path, serializeKeyring(keyring));
}

/** Writes bytes from `serializeKeyring`: temp file named for this process, fsync, rename. */
export function writeKeyringBytes(path: string, bytes: Buffer): void {
  writeFileAtomic(path, bytes, 0o600);
}
