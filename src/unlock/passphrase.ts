// The passphrase factor: scrypt turns the passphrase into the KEK. Its sources, in the contract's
// order, are in cli/passphrase.ts: the explicit ones (a file, a systemd credential) are proved
// before any other kind is tried; KEYHOLD_PASSPHRASE and the prompt are asked only after.
import { randomBytes, scrypt as scryptCb, type ScryptOptions } from 'node:crypto';
import * as v from 'valibot';
import { EXIT, KeyholdError, usageError } from '../errors.js';
import { checkNewPassphrase, explicitPassphrase, fallbackPassphrase, noPassphraseSource, readPassphrase, readPassphraseFile } from '../cli/passphrase.js';
import { isCanonicalBase64, newFactorId, type EnrolledFactor, type FactorBase, type FactorKeks, type FactorKind, type ProveContext } from './factor-kind.js';

export interface ScryptParams {
  name: 'scrypt';
  log2n: number;
  r: number;
  p: number;
  salt: string;
}

export interface PassphraseFactor extends FactorBase {
  type: 'passphrase';
  kdf: ScryptParams;
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

const integerWithin = ([lo, hi]: readonly [number, number]) => v.pipe(v.number(), v.integer(), v.minValue(lo), v.maxValue(hi));

export const scryptParamsSchema = v.pipe(
  v.object({
    name: v.literal('scrypt'),
    log2n: integerWithin(SCRYPT_BOUNDS.log2n),
    r: integerWithin(SCRYPT_BOUNDS.r),
    p: integerWithin(SCRYPT_BOUNDS.p),
    salt: v.pipe(v.string(), v.check((s) => isCanonicalBase64(s) && Buffer.from(s, 'base64').length >= 16)),
  }),
  v.check((k) => 128 * k.r * 2 ** k.log2n <= SCRYPT_MAX_MEMORY),
);

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

export const PASSPHRASE_ID_PREFIX = 'pp';

/** A new passphrase factor (not yet sealed) and its KEK. */
export async function enrollPassphrase(
  passphrase: Buffer,
  cost = defaultScryptCost(),
  id = newFactorId(PASSPHRASE_ID_PREFIX),
): Promise<EnrolledFactor<PassphraseFactor>> {
  const kdf: ScryptParams = { name: 'scrypt', ...cost, salt: randomBytes(16).toString('base64') };
  if (!v.is(scryptParamsSchema, kdf)) throw new KeyholdError('scrypt parameters out of bounds');
  return { factor: { id, type: 'passphrase', created: new Date().toISOString(), kdf }, kek: await deriveScrypt(passphrase, kdf) };
}

/** The KEK a passphrase gives for one passphrase factor (right or wrong: the unwrap tells). */
export function passphraseKek(factor: PassphraseFactor, passphrase: Buffer): Promise<Buffer> {
  return deriveScrypt(passphrase, factor.kdf);
}

const isPassphraseFactor = (factor: FactorBase): factor is PassphraseFactor => factor.type === passphraseKind.type;

/** The KEK of every passphrase factor in `factors` for one passphrase (policy `all` has at most one). */
export async function passphraseKeks(keyring: { factors: readonly FactorBase[] }, passphrase: Buffer): Promise<FactorKeks> {
  const keks: FactorKeks = new Map();
  for (const factor of keyring.factors) {
    if (isPassphraseFactor(factor)) keks.set(factor.id, await passphraseKek(factor, passphrase));
  }
  return keks;
}

/** The passphrase factors of a keyring; exit 4 when it has none. */
export function passphraseFactors(keyring: { factors: readonly FactorBase[] }): PassphraseFactor[] {
  const factors = keyring.factors.filter(isPassphraseFactor);
  if (factors.length === 0) {
    throw new KeyholdError('this vault has no passphrase factor', 'unlock it with another factor (see `keyhold factor list`)', EXIT.DENIED);
  }
  return factors;
}

async function keksOf(factors: PassphraseFactor[], passphrase: Buffer): Promise<FactorKeks> {
  try {
    return await passphraseKeks({ factors }, passphrase);
  } finally {
    passphrase.fill(0);
  }
}

const passphraseRequest = (context: ProveContext) => ({ file: context.passphraseFile, env: context.env, alternatives: context.alternatives });

/** A new passphrase: `--new-passphrase-file`, else asked twice on the terminal. */
export async function readNewPassphrase(file: string | undefined, globalFile: string | undefined): Promise<Buffer> {
  if (file === '-' && globalFile === '-') {
    throw usageError('--passphrase-file and --new-passphrase-file cannot both read stdin', 'put one of them in a file');
  }
  if (file) return checkNewPassphrase(readPassphraseFile(file, 'new passphrase file'));
  const typed = await fallbackPassphrase({ env: {}, confirm: true, prompt: 'New passphrase: ' });
  if (!typed) throw usageError('no new passphrase', 'pass --new-passphrase-file F (- for stdin), or run on a terminal');
  return checkNewPassphrase(typed);
}

export const passphraseKind: FactorKind<PassphraseFactor> = {
  type: 'passphrase',
  idPrefix: PASSPHRASE_ID_PREFIX,
  summary: 'a passphrase you type or keep in a file',
  source: 'the passphrase',
  refusedMessage: 'wrong passphrase',
  singleUnderAllPolicy: 'one passphrase unlocks every passphrase factor anyway',
  fields: { kdf: scryptParamsSchema },
  addOptions: {
    'new-passphrase-file': { type: 'string', describe: 'passphrase: read it from this file (- for stdin)' },
  },
  describe: (factor) => `${factor.id} (passphrase)`,
  details: () => ({ column: '-', json: {} }),
  async enroll(context) {
    const passphrase = await readNewPassphrase(context.options['new-passphrase-file'] as string | undefined, context.passphraseFile);
    try {
      return await enrollPassphrase(passphrase);
    } finally {
      passphrase.fill(0);
    }
  },
  async prove(factors, context) {
    const request = passphraseRequest(context);
    if (context.required) return keksOf(factors, await readPassphrase(request));
    const explicit = explicitPassphrase(request);
    if (!explicit) return new Map();
    if (factors.length === 0) explicit.fill(0);
    return keksOf(passphraseFactors({ factors }), explicit);
  },
  async ask(factors, context) {
    const passphrase = await fallbackPassphrase(passphraseRequest(context));
    return passphrase ? keksOf(factors, passphrase) : new Map();
  },
  noSource: (context, otherSources) => noPassphraseSource([...otherSources, ...(context.alternatives ?? [])]),
};
