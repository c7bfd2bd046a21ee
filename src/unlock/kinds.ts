// The unlock factor kinds keyhold knows, in the order `unlock` tries them under policy `any`.
// A new kind is one file in this folder and one line in FACTOR_KINDS.
import * as v from 'valibot';
import type { FactorBase, FactorKind, FactorOf, Unsealed } from './factor-kind.js';
import { passphraseKind } from './passphrase.js';
import { secretServiceKind } from './secret-service.js';
import { sshAgentKind } from './ssh-agent.js';

export const FACTOR_KINDS = [passphraseKind, sshAgentKind, secretServiceKind] as const;

export type Factor = FactorOf<(typeof FACTOR_KINDS)[number]>;
export type FactorType = Factor['type'];
export type UnsealedFactor = Unsealed<Factor>;
export const FACTOR_TYPES = FACTOR_KINDS.map((kind) => kind.type) as FactorType[];

/** A factor id: a kind's two-letter prefix and 4 random bytes in hex. */
export const FACTOR_ID_PATTERN = /^[a-z]{2}-[0-9a-f]{8}$/;

/** The kind of a factor type (the type was checked against the list when the file was read). */
export function kindOf(type: string): FactorKind {
  const kind = FACTOR_KINDS.find((k) => k.type === type);
  if (!kind) throw new Error(`unknown factor type ${type}`);
  return kind as unknown as FactorKind;
}

export function describeFactor(factor: FactorBase): string {
  return kindOf(factor.type).describe(factor);
}

/** The schema of one kind's factor: the common fields, its own, and the wrap as the policy has it. */
function factorSchema(kind: FactorKind, wrap: v.GenericSchema) {
  return v.object({
    id: v.pipe(v.string(), v.regex(FACTOR_ID_PATTERN), v.startsWith(`${kind.idPrefix}-`)),
    type: v.literal(kind.type),
    created: v.string(),
    ...kind.fields,
    wrap,
  });
}

const kinds = FACTOR_KINDS as unknown as readonly FactorKind[];

/** Factors as enrolment makes them and a policy-`all` file stores them: no wrap of their own. */
export function unsealedFactorSchemaOf(): v.GenericSchema<unknown, UnsealedFactor> {
  return v.variant('type', kinds.map((kind) => factorSchema(kind, v.exactOptional(v.never()))) as never) as never;
}

/** Factors of a policy-`any` file: each wraps the master key itself. */
export function sealedFactorSchemaOf(wrapSchema: v.GenericSchema): v.GenericSchema<unknown, Factor> {
  return v.variant('type', kinds.map((kind) => factorSchema(kind, wrapSchema)) as never) as never;
}
