// A scope's policy as the vault stores it: the TOML file validated, its host names resolved to the
// host key fingerprints known_hosts gave at `policy set`. Every process that reads a policy from
// the vault (the daemon, `policy show`, `policy check`) checks it against this schema first.
import * as v from 'valibot';
import { FINGERPRINT_PATTERN } from '../agent-protocol/public-key.js';
import { usageError } from '../errors.js';

export const ACTIONS = ['allow', 'deny', 'confirm'] as const;
export type Action = (typeof ACTIONS)[number];

/** What a signature is for: an SSH login, `ssh-keygen -Y sign` (SSHSIG), or anything else. */
export const PURPOSES = ['ssh-login', 'sshsig', 'other'] as const;
export type Purpose = (typeof PURPOSES)[number];

/** The rule fields a policy file may hold, in the order `policy show` prints them. */
export const RULE_FIELDS = [
  'action',
  'purpose',
  'hosts',
  'users',
  'exe',
  'namespaces',
  'keys',
  'subjects',
  'forwarded',
  'remember',
  'rate',
] as const;

/** A `hosts` entry: as written (a known_hosts name or a `SHA256:` fingerprint) and what it stands for. */
export interface ResolvedHost {
  name: string;
  fingerprints: string[];
}

export interface PolicyRule {
  action: Action;
  /** Absent: any purpose. */
  purpose?: Purpose;
  hosts?: ResolvedHost[];
  users?: string[];
  /** Globs over the peer's /proc/PID/exe (`*` and `?`; `*` also matches `/`). */
  exe?: string[];
  namespaces?: string[];
  /** `SHA256:` fingerprints. */
  keys?: string[];
  /** Globs over container token subjects. */
  subjects?: string[];
  forwarded?: boolean;
  /** A duration (`10m`): an approval covers this peer process (or token), key and rule that long. */
  remember?: string;
  /** `N/unit` or `N/duration` (`60/m`, `10/30s`): signatures per peer process or token. */
  rate?: string;
}

export interface PolicyDocument {
  /** When no rule matches. */
  default: Action;
  rules: PolicyRule[];
}

/** A scope without a policy: every request of its socket's uid or its tokens is signed. */
export const NO_POLICY: PolicyDocument = { default: 'allow', rules: [] };

export const MAX_RULES = 1_000;
export const MAX_LIST = 1_000;
export const MAX_TEXT = 4_096;

export const DURATION_PATTERN = /^[1-9][0-9]{0,6}[smhd]$/;
export const RATE_PATTERN = /^([1-9][0-9]{0,6})\/([1-9][0-9]{0,6})?([smhd])$/;

const text = v.pipe(v.string(), v.minLength(1), v.maxLength(MAX_TEXT));
const list = <T extends v.GenericSchema>(item: T) => v.pipe(v.array(item), v.minLength(1), v.maxLength(MAX_LIST));
const fingerprintText = v.pipe(v.string(), v.regex(FINGERPRINT_PATTERN));

/**
 * An object with only these keys. Unlike strictObject, an unknown key is reported at the object,
 * not by its name: the name is the sender's text and a refusal quotes nothing a peer sent.
 */
function closedObject<const E extends v.ObjectEntries>(entries: E) {
  const known = (value: unknown) =>
    typeof value === 'object' && value !== null && !Array.isArray(value) && Object.keys(value).every((key) => Object.hasOwn(entries, key));
  return v.pipe(v.custom<Record<string, unknown>>(known), v.object(entries));
}

const ruleSchema = closedObject({
  action: v.picklist(ACTIONS),
  purpose: v.optional(v.picklist(PURPOSES)),
  hosts: v.optional(list(closedObject({ name: text, fingerprints: list(fingerprintText) }))),
  users: v.optional(list(text)),
  exe: v.optional(list(text)),
  namespaces: v.optional(list(text)),
  keys: v.optional(list(fingerprintText)),
  subjects: v.optional(list(text)),
  forwarded: v.optional(v.boolean()),
  remember: v.optional(v.pipe(v.string(), v.regex(DURATION_PATTERN))),
  rate: v.optional(v.pipe(v.string(), v.regex(RATE_PATTERN))),
});

/** A stored policy: what `policy set` produced (a control request or a vault row is checked against it). */
export const policyDocumentSchema = closedObject({
  default: v.picklist(ACTIONS),
  rules: v.pipe(v.array(ruleSchema), v.maxLength(MAX_RULES)),
});

/** What the daemon knows about one sign request when it decides. */
export interface SignFacts {
  purpose: Purpose;
  /** The key asked to sign with, `SHA256:…`. */
  key: string;
  /** ssh-login: the user in the userauth request. */
  user?: string;
  /** ssh-login: the server's host key fingerprint, from the request (hostbound) or a verified session-bind. */
  hostKey?: string;
  /** sshsig: the namespace of `ssh-keygen -Y sign -n`. */
  namespace?: string;
  /** Unix peers: /proc/PID/exe read when it connected (null if unreadable). */
  exe?: string | null;
  /** Container tokens: the token's subject. */
  subject?: string;
  /** The request came through an agent forwarded with `ssh -A` (a session-bind with is_forwarding). */
  forwarded: boolean;
}

/** Which rule decided (its index in `rules`), or null for the policy's default. */
export interface Decision {
  action: Action;
  rule: number | null;
}

/** The largest policy file `policy set` reads, and the largest source the vault keeps. */
export const MAX_POLICY_SOURCE = 1024 * 1024;
/** The largest stored document (JSON, hosts resolved): well inside a control frame with its source. */
export const MAX_POLICY_DOCUMENT = 2 * 1024 * 1024;

/** Which purpose each purpose-bound field can match; with any other purpose the rule never matches. */
export const FIELD_PURPOSE: Partial<Record<(typeof RULE_FIELDS)[number], Purpose>> = {
  hosts: 'ssh-login',
  users: 'ssh-login',
  namespaces: 'sshsig',
};

/** What is wrong with a document: where (a 0-based rule index, a field) and what. */
export interface PolicyProblem {
  rule?: number;
  field?: string;
  message: string;
}

/**
 * The first problem of a would-be stored policy, or null: the schema, then what the schema cannot
 * say (a field that can never match the rule's purpose, `remember` on a rule that never asks).
 */
export function policyDocumentProblem(value: unknown): PolicyProblem | null {
  const result = v.safeParse(policyDocumentSchema, value, { abortEarly: true });
  if (!result.success) {
    const issue = result.issues[0];
    const keys = (issue.path ?? []).map((item) => item.key);
    if (keys[0] === 'rules' && typeof keys[1] === 'number') {
      const field = keys.slice(2).map((k) => (typeof k === 'number' ? `[${k}]` : `.${String(k)}`)).join('').replace(/^\./, '');
      return { rule: keys[1], ...(field ? { field } : {}), message: 'invalid value' };
    }
    return keys.length > 0 ? { field: String(keys[0]), message: 'invalid value' } : { message: 'not a policy document' };
  }
  return ruleProblems(result.output.rules);
}

/** The part of a rule that says whether its other fields make sense together. */
export type RuleShape = Pick<PolicyRule, 'action' | 'purpose' | 'remember' | 'rate'> & Partial<Record<keyof typeof FIELD_PURPOSE, unknown>>;

/** What the schema cannot say about rules: the first field that can never match, or `remember` without confirm. */
export function ruleProblems(rules: readonly RuleShape[]): PolicyProblem | null {
  for (const [index, rule] of rules.entries()) {
    for (const [field, purpose] of Object.entries(FIELD_PURPOSE) as [keyof typeof FIELD_PURPOSE, Purpose][]) {
      if (rule[field] !== undefined && rule.purpose !== undefined && rule.purpose !== purpose) {
        return { rule: index, field, message: `only a ${purpose} request has ${field}: with purpose ${rule.purpose} this rule would never match` };
      }
    }
    if (rule.remember !== undefined && rule.action !== 'confirm') {
      return { rule: index, field: 'remember', message: 'only a confirm rule remembers an approval' };
    }
    if (rule.rate !== undefined && rule.action === 'deny') {
      return { rule: index, field: 'rate', message: 'a deny rule signs nothing, so it has no rate' };
    }
  }
  return null;
}

/** `rule 2: purpose: …` (rules numbered from 1, as users see them). */
export function describePolicyProblem(problem: PolicyProblem): string {
  return [problem.rule !== undefined ? `rule ${problem.rule + 1}` : null, problem.field ?? null, problem.message].filter((p) => p !== null).join(': ');
}

/** A document checked whole before it is stored or used; exit 2 naming the rule and field otherwise. */
export function checkPolicyDocument(value: unknown): PolicyDocument {
  const problem = policyDocumentProblem(value);
  if (problem) throw usageError(`invalid policy: ${describePolicyProblem(problem)}`, 'write it as a TOML file and store it with `keyhold policy set`');
  // Host names resolved to many keys each could make a small file a large document.
  const size = Buffer.byteLength(JSON.stringify(value));
  if (size > MAX_POLICY_DOCUMENT) throw usageError(`the policy with its hosts resolved is ${size} bytes; the limit is 2 MiB`, 'use fewer hosts, or split the scope');
  return value as PolicyDocument;
}
