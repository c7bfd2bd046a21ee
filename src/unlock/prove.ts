// What a process can prove to unlock a vault: the KEKs of its factors, asked of each kind in the
// list's order. Under policy `any` the first kind that proves something wins, and the kinds that
// ask a person (the passphrase prompt) come only after every quiet source found nothing. Under
// policy `all` every kind the vault has must prove its factors.
import { EXIT, KeyholdError } from '../errors.js';
import { unwrapMasterKey, zeroKeks, type Keyring } from '../vault/keyring.js';
import type { FactorKeks, FactorKind, ProveContext } from './factor-kind.js';
import { FACTOR_KINDS, type Factor, type FactorType } from './kinds.js';
import { passphraseFactors, passphraseKeks } from './passphrase.js';

export interface UnlockRequest {
  /** `--passphrase-file`; `-` reads standard input. */
  file?: string | undefined;
  env?: NodeJS.ProcessEnv;
  /** Extra sources to name when none applies. */
  alternatives?: string[];
  /** `unlock --factor`: only this kind of factor. */
  factor?: FactorType | undefined;
}

const kinds = FACTOR_KINDS as unknown as readonly FactorKind<Factor>[];

function factorsOf(keyring: Keyring, kind: FactorKind<Factor>): Factor[] {
  return keyring.factors.filter((f) => f.type === kind.type);
}

/** Nothing proved anything: a daemon starting up starts locked on this, whatever its exit code. */
export class NoUnlockSourceError extends KeyholdError {}

export async function collectKeks(keyring: Keyring, request: UnlockRequest): Promise<FactorKeks> {
  const notApplied: { reason: string; refused: boolean }[] = [];
  const context = (required: boolean): ProveContext => ({
    keyring,
    env: request.env ?? process.env,
    passphraseFile: request.file,
    required,
    alternatives: request.alternatives,
    notApplied,
  });
  const present = kinds.filter((kind) => factorsOf(keyring, kind).length > 0);

  if (keyring.policy === 'all') {
    const keks: FactorKeks = new Map();
    try {
      for (const kind of present) for (const [id, kek] of await kind.prove(factorsOf(keyring, kind), context(true))) keks.set(id, kek);
      return keks;
    } catch (err) {
      zeroKeks(keks);
      if (err instanceof KeyholdError && (err.exitCode === EXIT.LOCKED || err.exitCode === EXIT.DENIED)) {
        const needs = present.map((kind) => kind.source).join(' and ');
        throw new KeyholdError(`this vault needs every factor (policy all: ${needs}); ${err.message}`, err.hint, err.exitCode);
      }
      throw err;
    }
  }

  if (request.factor !== undefined) {
    const kind = kinds.find((k) => k.type === request.factor)!;
    const factors = factorsOf(keyring, kind);
    if (factors.length === 0) {
      throw new KeyholdError(
        `this vault has no ${kind.type} factor`,
        `unlock it with ${present.map((k) => k.type).join(' or ')}, or enroll one with \`keyhold factor add ${kind.type}\``,
        EXIT.DENIED,
      );
    }
    return kind.prove(factors, context(true));
  }

  // "Not mine, try the next": a kind with no source here proves nothing. A kind is asked even
  // when the vault has none of its factors, so a source named explicitly (a passphrase file for a
  // vault without a passphrase) is refused rather than ignored.
  for (const kind of kinds) {
    const keks = await kind.prove(factorsOf(keyring, kind), context(false));
    if (keks.size > 0) return keks;
  }
  for (const kind of present) {
    const keks = (await kind.ask?.(factorsOf(keyring, kind), context(false))) ?? new Map();
    if (keks.size > 0) return keks;
  }
  const asking = present.find((kind) => kind.noSource);
  const others = present.filter((kind) => kind !== asking).map((kind) => kind.source);
  const none = asking
    ? asking.noSource!(context(false), others)
    : new KeyholdError('no unlock factor available', `this vault unlocks with ${others.join(' or ')}`, EXIT.LOCKED);
  if (notApplied.length === 0) throw none;
  // Say why a source that is there did not count (a locked keyring), not just that none did; when
  // every source refused and no prompt could have helped, that is a refusal (4), not an absence.
  const refused = notApplied.every((n) => n.refused) && !present.some((kind) => kind.ask);
  throw new NoUnlockSourceError(
    `${none.message} (${notApplied.map((n) => n.reason).join('; ')})`,
    none instanceof KeyholdError ? none.hint : undefined,
    refused ? EXIT.DENIED : EXIT.LOCKED,
  );
}

/** Tries every passphrase factor; exit 4 when none accepts the passphrase. */
export async function unwrapWithPassphrase(keyring: Keyring, passphrase: Buffer): Promise<Buffer> {
  const keks = await passphraseKeks({ factors: passphraseFactors(keyring) }, passphrase);
  try {
    return unwrapMasterKey(keyring, keks);
  } finally {
    zeroKeks(keks);
  }
}
