// What a control request may hold: one schema per op and per vault method, used by the CLI before
// it sends and by the daemon before it acts. A refusal names the field, never its value (a KEK or
// a secret may be in it).
import * as v from 'valibot';
import { MAX_DURATION_MS } from '../duration.js';
import { MAX_APPROVALS_WAIT_MS } from '../policy/approvals.js';
import { usageError } from '../errors.js';
import { TOKEN_SUBJECT_PATTERN } from '../tokens/tokens.js';
import { VAULT_METHODS, type VaultApi, type VaultMethod } from '../vault/api.js';
import { MAX_CERT_BYTES } from '../agent-protocol/certificate.js';
import { ECDSA_BITS, KEY_TYPES, RSA_BITS } from '../vault/key-material.js';
import { enrolledFactorSchema, fieldPath, kekSchema } from '../vault/keyring.js';
import { FACTOR_ID_PATTERN } from '../unlock/kinds.js';
import { MAX_POLICY_SOURCE, policyDocumentSchema } from '../policy/policy.js';
import { MAX_SECRET_BYTES, SCOPE_PATTERN, SECRET_NAME_PATTERN } from '../vault/vault.js';

// ---- fields ----

const bytes = (maxLength: number) =>
  v.pipe(
    v.custom<Buffer>((value) => Buffer.isBuffer(value)),
    v.maxLength(maxLength),
  );
const scope = v.pipe(v.string(), v.regex(SCOPE_PATTERN));
const secretName = v.pipe(v.string(), v.regex(SECRET_NAME_PATTERN));
/**
 * What names an existing record (a key's fingerprint, a token or factor id): any short string. One
 * of the wrong form names nothing, and the vault answers "not found" (exit 5) as it does without a
 * daemon; the schema only bounds it.
 */
const lookupKey = v.pipe(v.string(), v.minLength(1), v.maxLength(512));
const comment = v.pipe(v.string(), v.maxLength(4096));
const keyBits = v.pipe(v.number(), v.integer(), v.minValue(Math.min(...ECDSA_BITS)), v.maxValue(RSA_BITS.max));
/** A PKCS#8 DER of the largest RSA key the vault takes is under 10 KiB. */
const MAX_PKCS8_BYTES = 64 * 1024;
const subject = v.pipe(v.string(), v.regex(TOKEN_SUBJECT_PATTERN));
const duration = v.pipe(v.number(), v.safeInteger(), v.minValue(1), v.maxValue(MAX_DURATION_MS));
const vaultId = v.pipe(v.string(), v.maxLength(64));
/** More scopes than any vault holds; the frame limit bounds it anyway. */
const MAX_SCOPES = 10_000;

// ---- vault methods: one parameter list per method ----

type Param = readonly [name: string, schema: v.GenericSchema];
type Outputs<P extends readonly Param[]> = { -readonly [K in keyof P]: P[K] extends readonly [string, infer S extends v.GenericSchema] ? v.InferOutput<S> : never };

interface Params<Args extends readonly unknown[]> {
  names: readonly string[];
  schema: v.GenericSchema<unknown, Args>;
}

/** Positional parameters, each named for error messages; more arguments than parameters are refused. */
function params<const P extends readonly Param[]>(...list: P): Params<Outputs<P>> {
  return {
    names: list.map(([name]) => name),
    schema: v.strictTuple(list.map(([, schema]) => schema)) as unknown as v.GenericSchema<unknown, Outputs<P>>,
  };
}

const VAULT_PARAMS = {
  generateKey: params(['scope', scope], ['kind', v.picklist(KEY_TYPES)], ['bits', v.optional(keyBits)], ['comment', comment]),
  importKey: params(['scope', scope], ['pkcs8', bytes(MAX_PKCS8_BYTES)], ['comment', comment]),
  importCertificate: params(['scope', scope], ['pkcs8', bytes(MAX_PKCS8_BYTES)], ['certificate', bytes(MAX_CERT_BYTES)], ['comment', comment]),
  removeCertificate: params(['scope', scope], ['certificate', bytes(MAX_CERT_BYTES)]),
  listKeys: params(['scope', v.optional(scope)]),
  scopeConstraints: params(['scope', scope]),
  assign: params(['scope', scope], ['fingerprint', lookupKey]),
  unassign: params(['scope', scope], ['fingerprint', lookupKey]),
  removeKey: params(['fingerprint', lookupKey]),
  scopes: params(),
  issueToken: params(['scope', scope], ['subject', subject], ['ttlMs', v.nullable(duration)]),
  listTokens: params(['scope', v.optional(scope)]),
  revokeToken: params(['id', lookupKey]),
  revokeTokens: params(['scope', scope], ['subject', v.optional(subject)]),
  setSecret: params(['scope', scope], ['name', secretName], ['value', bytes(MAX_SECRET_BYTES)]),
  getSecret: params(['scope', scope], ['name', secretName]),
  listSecrets: params(['scope', scope]),
  removeSecret: params(['scope', scope], ['name', secretName]),
  secretValues: params(['scopes', v.pipe(v.array(scope), v.maxLength(MAX_SCOPES))]),
  setPolicy: params(['scope', scope], ['document', policyDocumentSchema], ['source', v.pipe(v.string(), v.maxLength(MAX_POLICY_SOURCE))]),
  getPolicy: params(['scope', scope]),
  removePolicy: params(['scope', scope]),
  addFactor: params(['enrolled', enrolledFactorSchema]),
  removeFactor: params(['id', lookupKey]),
  replaceFactor: params(['enrolled', enrolledFactorSchema]),
  verifyAudit: params(),
} satisfies Record<VaultMethod, Params<readonly unknown[]>>;

/** The arguments of a vault method, as its schema admits them. */
export type VaultArgs<M extends VaultMethod> = (typeof VAULT_PARAMS)[M] extends Params<infer Args> ? Args : never;

// The compiler ties each schema to VaultApi: what the schema admits can be passed to the method,
// and whatever the method's signature allows the schema admits (a trailing parameter that takes
// undefined may be left out). A disagreement names its method in the error below.
type OptionalTail<T extends readonly unknown[]> = T extends readonly [...infer Head, infer Last]
  ? undefined extends Last
    ? [...OptionalTail<Head>, Last?]
    : T
  : T;
type Agrees<Schema extends readonly unknown[], Signature extends readonly unknown[]> = [Schema] extends [Signature]
  ? [Signature] extends [OptionalTail<Schema>]
    ? true
    : false
  : false;
type Disagreeing = { [M in VaultMethod]: Agrees<VaultArgs<M>, Parameters<VaultApi[M]>> extends true ? never : M }[VaultMethod];
const everySchemaAgreesWithVaultApi: [Disagreeing] extends [never] ? true : Disagreeing = true;
void everySchemaAgreesWithVaultApi;

export type VaultCall = { [M in VaultMethod]: { op: 'call'; vaultId: string; method: M; args: VaultArgs<M> } }[VaultMethod];

/** Runs a validated call on `api`. */
export function callVaultMethod<M extends VaultMethod>(api: VaultApi, call: { method: M; args: VaultArgs<M> }): ReturnType<VaultApi[M]> {
  // VaultArgs<M> agrees with Parameters<VaultApi[M]> (checked above); TypeScript cannot follow
  // that through the indexed access, hence the cast.
  const method = api[call.method] as (...args: VaultArgs<M>) => ReturnType<VaultApi[M]>;
  return method.call(api, ...call.args);
}

// ---- the requests ----

const isPlainObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value) && !Buffer.isBuffer(value);
/** KEKs by factor id. Checked whole: a key of this map is the peer's text and must not reach a message. */
const keks = v.pipe(
  v.custom<Record<string, unknown>>(isPlainObject),
  v.check((map) => Object.keys(map).length <= 64 && Object.keys(map).every((id) => FACTOR_ID_PATTERN.test(id))),
  v.check((map) => Object.values(map).every((kek) => v.is(kekSchema, kek))),
  v.transform((map) => map as Record<string, Buffer>),
);

const envelope = v.variant('op', [
  v.object({ op: v.literal('status') }),
  v.object({ op: v.literal('lock') }),
  v.object({ op: v.literal('stop') }),
  v.object({
    op: v.literal('unlock'),
    vaultId,
    keks,
    idleMs: v.optional(v.nullable(duration), null),
    ttlMs: v.optional(v.nullable(duration), null),
  }),
  v.object({ op: v.literal('call'), vaultId, method: v.picklist(VAULT_METHODS), args: v.unknown() }),
  v.object({
    op: v.literal('approvals'),
    after: v.optional(v.pipe(v.number(), v.safeInteger(), v.minValue(0))),
    waitMs: v.optional(v.pipe(v.number(), v.safeInteger(), v.minValue(0), v.maxValue(MAX_APPROVALS_WAIT_MS))),
  }),
  v.object({ op: v.literal('approve'), id: lookupKey, rememberMs: v.optional(duration) }),
  v.object({ op: v.literal('deny'), id: lookupKey }),
]);

export type UnlockRequest = { op: 'unlock'; vaultId: string; keks: Record<string, Buffer>; idleMs?: number | null; ttlMs?: number | null };
/** Confirmations: list (a long-poll with `after` and `waitMs`), approve, deny. */
export type ApprovalRequest =
  | { op: 'approvals'; after?: number; waitMs?: number }
  | { op: 'approve'; id: string; rememberMs?: number }
  | { op: 'deny'; id: string };
export type ControlRequest = { op: 'status' } | { op: 'lock' } | { op: 'stop' } | UnlockRequest | VaultCall | ApprovalRequest;

const refused = (where: string) => usageError(`bad control request: ${where}`);

/** A decoded request, checked whole; what it returns the handler can trust. Exit 2 otherwise. */
export function parseControlRequest(value: unknown): ControlRequest {
  if (!isPlainObject(value)) throw refused('not an object');
  const request = v.safeParse(envelope, value, { abortEarly: true });
  if (!request.success) {
    // The op is named only once it is known to be one of ours.
    const op = envelope.options.find((option) => option.entries.op.literal === value.op)?.entries.op.literal;
    const field = fieldPath(request.issues[0].path);
    throw refused(op && field && field !== 'op' ? `${op}: ${field}` : 'op');
  }
  const { output } = request;
  if (output.op !== 'call') return output;
  const { names, schema } = VAULT_PARAMS[output.method] as Params<readonly unknown[]>;
  const args = v.safeParse(schema, output.args, { abortEarly: true });
  if (!args.success) {
    // The first step is the argument's index: say the parameter's name instead.
    const [position, ...inside] = args.issues[0].path ?? [];
    const name = typeof position?.key === 'number' ? names[position.key] : undefined;
    const field = fieldPath(inside);
    throw refused(`${output.method}: ${name === undefined ? 'args' : `${name}${field && !field.startsWith('[') ? '.' : ''}${field}`}`);
  }
  return { op: 'call', vaultId: output.vaultId, method: output.method, args: args.output } as VaultCall;
}
