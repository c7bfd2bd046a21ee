// One unlock factor kind (passphrase, ssh-agent, secret-service, …) behind one interface, in the
// manner of age's Identity/Recipient: each kind is one file that knows how to enroll a factor,
// describe it, and prove it (derive its KEK); "not mine" is an empty answer, so the caller tries
// the next kind. `keyring.ts` knows only the file format and the any/all policy; `kinds.ts` lists
// the kinds, so a new kind is one file here plus one line there.
import { randomBytes } from 'node:crypto';
import type * as v from 'valibot';
import type { Options } from 'yargs';
import type { Keyring, Wrap } from '../vault/keyring.js';

/** What every factor in `vault.db.keys` has; a kind adds its own fields. */
export interface FactorBase {
  /** The kind's two-letter prefix, a dash and 4 random bytes in hex: `pp-1a2b3c4d`. */
  id: string;
  type: string;
  created: string;
  /** Present under policy `any`: the master key wrapped under this factor's KEK. */
  wrap?: Wrap;
}

/** A factor as enrolment makes it, before sealing gives it (under policy `any`) its own wrap. */
export type Unsealed<F extends FactorBase> = F extends FactorBase ? Omit<F, 'wrap'> & { wrap?: never } : never;

/** A factor before it is sealed into a keyring, with the KEK its secret derives. */
export interface EnrolledFactor<F extends FactorBase = FactorBase> {
  factor: Unsealed<F>;
  kek: Buffer;
}

/** KEKs by factor id: what a caller proves to unlock. */
export type FactorKeks = Map<string, Buffer>;

export interface EnrollContext {
  vaultId: string;
  /** The keyring the new factor joins; absent at `init`. */
  keyring?: Keyring | undefined;
  env: NodeJS.ProcessEnv;
  /** The values of this kind's `addOptions`, as the command line gave them (undefined when absent). */
  options: Record<string, unknown>;
  /** The global `--passphrase-file` (a kind reading stdin must not take it twice). */
  passphraseFile?: string | undefined;
}

export interface ProveContext {
  keyring: Keyring;
  env: NodeJS.ProcessEnv;
  /** The global `--passphrase-file`. */
  passphraseFile?: string | undefined;
  /**
   * Set by `unlock --factor KIND` and by policy `all`: an absent source is then an error (exit 3
   * when there is nothing to ask, 4 when it refuses), not "not mine".
   */
  required: boolean;
  /** Extra sources to name when nothing applies (for the exit-3 message). */
  alternatives?: string[] | undefined;
  /**
   * Where a kind notes why its source, though there, did not apply (a locked keyring), for that
   * message too; `refused` when it said no (exit 4 if nothing else could apply) rather than was absent.
   */
  notApplied?: { reason: string; refused: boolean }[] | undefined;
}

export interface FactorKind<F extends FactorBase = FactorBase> {
  readonly type: F['type'];
  /** Two lowercase letters, unique among kinds: the start of this kind's factor ids. */
  readonly idPrefix: string;
  /** One line for `--help`: what this factor is. */
  readonly summary: string;
  /** What `unlock` needs for it, for the messages when no source applies: `the passphrase`. */
  readonly source: string;
  /** The message when every factor tried was of this kind and none unwrapped: `wrong passphrase`. */
  readonly refusedMessage?: string;
  /** Set when policy `all` takes at most one factor of this kind; the text says why. */
  readonly singleUnderAllPolicy?: string;
  /** This kind's own fields as stored (not id, type, created or wrap): checked on every read. */
  readonly fields: v.ObjectEntries;
  /** `factor add TYPE` options of this kind (yargs definitions, merged into the command). */
  readonly addOptions: Record<string, Options>;
  /** For messages: `sa-1a2b3c4d (ssh-agent SHA256:…)`. */
  describe(factor: F): string;
  /** `factor list`: the KEY column (`-` when none) and the extra JSON fields. */
  details(factor: F): { column: string; json: Record<string, unknown> };
  /** A new factor and its KEK, not yet sealed into the keyring. */
  enroll(context: EnrollContext): Promise<EnrolledFactor<F>>;
  /**
   * KEKs for those of `factors` (the vault's factors of this kind) that this process can prove
   * without asking a person. Empty when this kind's source is absent (unless `required`); throws
   * when the source is there but refuses or misbehaves.
   */
  prove(factors: F[], context: ProveContext): Promise<FactorKeks>;
  /** A source that asks a person (a prompt), tried only after every kind's `prove` found nothing. */
  ask?(factors: F[], context: ProveContext): Promise<FactorKeks>;
  /** The exit-3 error when no kind found a source, naming `otherSources` too; else a generic one. */
  noSource?(context: ProveContext, otherSources: string[]): Error;
  /** After `factor rm`: remove what the factor kept outside the key file. Best effort, never throws. */
  forget?(factor: F, context: { vaultId: string; env: NodeJS.ProcessEnv }): Promise<void>;
}

/** Canonical base64 only (of `bytes` bytes when given): a spelling that decodes to the same bytes is still an edit. */
export function isCanonicalBase64(value: unknown, bytes?: number): value is string {
  if (typeof value !== 'string') return false;
  const decoded = Buffer.from(value, 'base64');
  return decoded.toString('base64') === value && (bytes === undefined || decoded.length === bytes);
}

/** A new factor id: the kind's prefix and 4 random bytes in hex. */
export function newFactorId(prefix: string): string {
  return `${prefix}-${randomBytes(4).toString('hex')}`;
}

/** The factor type a kind handles. */
export type FactorOf<K> = K extends FactorKind<infer F> ? F : never;
