// A policy file (TOML) read into a PolicyDocument whose hosts are still as written. Every error is
// a usage error (exit 2) that names the file, the line and the field, so a user can fix it at once.
import { parse as parseToml, TomlError } from 'smol-toml';
import { FINGERPRINT_PATTERN } from '../agent-protocol/public-key.js';
import { usageError } from '../errors.js';
import { tomlLines } from '../toml-lines.js';
import {
  ACTIONS,
  DURATION_PATTERN,
  MAX_LIST,
  MAX_POLICY_SOURCE,
  MAX_RULES,
  MAX_TEXT,
  PURPOSES,
  RATE_PATTERN,
  RULE_FIELDS,
  ruleProblems,
  type Action,
  type PolicyRule,
} from './policy.js';

export type RuleField = (typeof RULE_FIELDS)[number];

/** A rule as the file wrote it: `hosts` are names or `SHA256:` fingerprints, not yet resolved. */
export type WrittenRule = Omit<PolicyRule, 'hosts'> & { hosts?: string[] };

/** Where a rule is in the file (1-based lines): its start and each field the file gives it. */
export interface RuleLines {
  start: number;
  fields: Partial<Record<string, number>>;
}

export interface ParsedPolicy {
  file: string;
  default: Action;
  rules: WrittenRule[];
  /** One per rule, in order. */
  lines: RuleLines[];
  /** The line of each top-level key. */
  topLines: Partial<Record<string, number>>;
  /**
   * `[[ssh-add]]` tables, as `policy show` prints a scope's ssh-add constraints: accepted so that
   * its output can be set back unchanged, never applied (ssh-add sets them).
   */
  sshAddEntries: number;
}

const TOP_KEYS = ['default', 'rule', 'ssh-add'] as const;
const PURPOSE_WORDS = [...PURPOSES, 'any'] as const;
const HINT = 'see "Policy and approvals" in the README for the file format';

/** The line of a rule's field, else the rule's own line, else line 1: an error always has a place. */
export function fieldLine(parsed: Pick<ParsedPolicy, 'lines'>, rule: number, field?: string): number {
  const where = parsed.lines[rule];
  return (field !== undefined ? where?.fields[field] : undefined) ?? where?.start ?? 1;
}

export function parsePolicyToml(text: string, file: string): ParsedPolicy {
  const bytes = Buffer.byteLength(text);
  if (bytes > MAX_POLICY_SOURCE) throw usageError(`${file}: the file is ${bytes} bytes; a policy file is at most 1 MiB`, HINT);
  let table: Record<string, unknown>;
  try {
    // Deep nesting has no use in a policy and only costs time.
    table = parseToml(text, { maxDepth: 8 }) as Record<string, unknown>;
  } catch (err) {
    if (err instanceof TomlError) {
      const what = err.message.split('\n')[0]!.replace(/^Invalid TOML document: /, '');
      throw usageError(`${file}:${err.line}: not valid TOML: ${what}`, HINT);
    }
    throw usageError(`${file}: not valid TOML`, HINT);
  }
  const { lines, topLines } = locate(text);
  const fail = (line: number, what: string): never => {
    throw usageError(`${file}:${line}: ${what}`, HINT);
  };

  for (const key of Object.keys(table)) {
    if (!(TOP_KEYS as readonly string[]).includes(key)) {
      fail(topLines[key] ?? 1, `unknown key ${JSON.stringify(key)}: a policy file has default and [[rule]] tables`);
    }
  }
  let defaultAction: Action = 'allow';
  if (Object.hasOwn(table, 'default')) {
    const value = table.default;
    if (typeof value !== 'string' || !(ACTIONS as readonly string[]).includes(value)) {
      fail(topLines.default ?? 1, `default: must be one of ${ACTIONS.join(', ')}`);
    }
    defaultAction = value as Action;
  }
  let written: unknown[] = [];
  if (Object.hasOwn(table, 'rule')) {
    if (!Array.isArray(table.rule)) fail(topLines.rule ?? 1, 'rule: must be an array of tables, each starting with [[rule]]');
    written = table.rule as unknown[];
  }
  if (written.length > MAX_RULES) fail(fieldLine({ lines }, MAX_RULES), `rule ${MAX_RULES + 1}: a policy has at most ${MAX_RULES} rules`);

  const rules = written.map((value, index) => {
    const where = (field?: string) => fieldLine({ lines }, index, field);
    const ruleFail = (field: string | null, what: string): never =>
      fail(where(field ?? undefined), `rule ${index + 1}: ${field ? `${field}: ` : ''}${what}`);
    return parseRule(value, ruleFail);
  });

  const problem = ruleProblems(rules);
  if (problem) {
    const rule = problem.rule ?? 0;
    fail(fieldLine({ lines }, rule, problem.field), `rule ${rule + 1}: ${problem.field ? `${problem.field}: ` : ''}${problem.message}`);
  }
  const sshAdd = table['ssh-add'];
  if (sshAdd !== undefined && !Array.isArray(sshAdd)) fail(topLines['ssh-add'] ?? 1, 'ssh-add: must be an array of tables, each starting with [[ssh-add]]');
  return { file, default: defaultAction, rules, lines, topLines, sshAddEntries: Array.isArray(sshAdd) ? sshAdd.length : 0 };
}

type RuleFail = (field: string | null, what: string) => never;

function parseRule(value: unknown, fail: RuleFail): WrittenRule {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(null, 'must be a table');
  const fields = value as Record<string, unknown>;
  for (const key of Object.keys(fields)) {
    if (!(RULE_FIELDS as readonly string[]).includes(key)) fail(key, `unknown field; a rule has ${RULE_FIELDS.join(', ')}`);
  }
  if (!Object.hasOwn(fields, 'action')) fail(null, `action: missing (one of ${ACTIONS.join(', ')})`);
  const rule: WrittenRule = { action: oneOf(fields.action, ACTIONS, 'action', fail) };
  if (Object.hasOwn(fields, 'purpose')) {
    const purpose = oneOf(fields.purpose, PURPOSE_WORDS, 'purpose', fail);
    if (purpose !== 'any') rule.purpose = purpose;
  }
  const has = (field: RuleField) => Object.hasOwn(fields, field);
  if (has('hosts')) rule.hosts = textList(fields.hosts, 'hosts', fail, checkHost);
  if (has('users')) rule.users = textList(fields.users, 'users', fail);
  if (has('exe')) rule.exe = textList(fields.exe, 'exe', fail, checkExe);
  if (has('namespaces')) rule.namespaces = textList(fields.namespaces, 'namespaces', fail);
  if (has('keys')) rule.keys = textList(fields.keys, 'keys', fail, normaliseKey);
  if (has('subjects')) rule.subjects = textList(fields.subjects, 'subjects', fail);
  if (has('forwarded')) {
    if (typeof fields.forwarded !== 'boolean') fail('forwarded', 'must be true or false');
    rule.forwarded = fields.forwarded as boolean;
  }
  if (has('remember')) {
    if (typeof fields.remember !== 'string' || !DURATION_PATTERN.test(fields.remember)) {
      fail('remember', 'must be a duration: a number and a unit, as "90s", "10m", "8h", "7d"');
    }
    rule.remember = fields.remember as string;
  }
  if (has('rate')) {
    if (typeof fields.rate !== 'string' || !RATE_PATTERN.test(fields.rate)) {
      fail('rate', 'must be signatures per period: "60/m", "10/30s", "1000/d"');
    }
    rule.rate = fields.rate as string;
  }
  return rule;
}

function oneOf<const T extends readonly string[]>(value: unknown, allowed: T, field: string, fail: RuleFail): T[number] {
  if (typeof value !== 'string' || !allowed.includes(value)) fail(field, `must be one of ${allowed.join(', ')}`);
  return value as T[number];
}

/** A non-empty list of non-empty strings; `check` returns the entry to keep, or a reason to refuse it. */
function textList(value: unknown, field: string, fail: RuleFail, check?: (entry: string) => string | { refused: string }): string[] {
  if (!Array.isArray(value)) fail(field, 'must be a list of strings, as ["a", "b"]');
  const list = value as unknown[];
  if (list.length === 0) fail(field, 'must not be empty (leave the field out to match anything)');
  if (list.length > MAX_LIST) fail(field, `at most ${MAX_LIST} entries`);
  return list.map((entry, i) => {
    if (typeof entry !== 'string') fail(field, `entry ${i + 1} must be a string`);
    const text = entry as string;
    if (text.length === 0) fail(field, `entry ${i + 1} is empty`);
    if (text.length > MAX_TEXT) fail(field, `entry ${i + 1} is over ${MAX_TEXT} characters`);
    const checked = check ? check(text) : text;
    if (typeof checked !== 'string') fail(field, `${JSON.stringify(text.slice(0, 80))}: ${checked.refused}`);
    return checked as string;
  });
}

/** A `SHA256:` fingerprint, or its base64 part alone (as some tools print it). */
function normaliseKey(entry: string): string | { refused: string } {
  const full = entry.startsWith('SHA256:') ? entry : `SHA256:${entry}`;
  return FINGERPRINT_PATTERN.test(full) ? full : { refused: 'not a key fingerprint (SHA256:… as `ssh-keygen -lf KEY` prints it)' };
}

/** A name as known_hosts holds it (`host`, `[host]:port`), or a host key's `SHA256:` fingerprint. */
const HOST_NAME = /^(?:[A-Za-z0-9._:-]+|\[[A-Za-z0-9._:-]+\]:[0-9]{1,5})$/;

function checkHost(entry: string): string | { refused: string } {
  if (entry.startsWith('SHA256:')) {
    return FINGERPRINT_PATTERN.test(entry) ? entry : { refused: 'not a host key fingerprint (SHA256: and 43 base64 characters)' };
  }
  if (!HOST_NAME.test(entry)) return { refused: 'not a host name, [host]:port, or SHA256: fingerprint of a host key' };
  return entry;
}

function checkExe(entry: string): string | { refused: string } {
  // The executable is matched by its full path (/proc/PID/exe): a bare name would never match.
  if (!entry.startsWith('/') && !entry.startsWith('*') && !entry.startsWith('?')) {
    return { refused: 'exe is matched against the full path of the program: write /usr/bin/NAME or */NAME' };
  }
  return entry;
}

// ---- where things are ----

/** The lines of the `[[rule]]` tables (or inline `rule = [{…}]` tables), their fields, and the top-level keys. */
export function locate(text: string): { lines: RuleLines[]; topLines: Partial<Record<string, number>> } {
  const found = tomlLines(text);
  const lines: RuleLines[] = [];
  for (let rule = 0; found.line('rule', rule) !== undefined; rule++) {
    lines.push({ start: found.line('rule', rule)!, fields: Object.fromEntries(found.childLines('rule', rule)) });
  }
  return { lines, topLines: Object.fromEntries(found.childLines()) };
}
