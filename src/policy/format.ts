// A stored policy shown to people: as TOML that `policy set` takes back (rules numbered in
// comments, each host followed by the fingerprints it stood for), and one rule in a line.
import { RULE_FIELDS, type PolicyDocument, type PolicyRule } from './policy.js';
import { describeDestinations, type StoredConstraints } from './ssh-add-constraints.js';

/** A TOML basic string: JSON's escapes are TOML's, except that DEL must be escaped too. */
function tomlString(text: string): string {
  return JSON.stringify(text).replace(/\x7f/g, '\\u007f');
}

function tomlValue(value: unknown): string {
  if (typeof value === 'string') return tomlString(value);
  if (typeof value === 'boolean') return String(value);
  if (Array.isArray(value)) return `[${value.map(tomlValue).join(', ')}]`;
  throw new TypeError('not a policy value');
}

/** Control characters in a name shown in a comment would end the comment: show them escaped. */
const commentSafe = (text: string) => JSON.stringify(text).slice(1, -1);

/** The field as the file writes it (hosts by the names they were written with). */
function writtenValue(rule: PolicyRule, field: (typeof RULE_FIELDS)[number]): unknown {
  if (field === 'hosts') return rule.hosts?.map((h) => h.name);
  return rule[field];
}

export function formatPolicyToml(document: PolicyDocument, header: string[] = []): string {
  const out: string[] = header.map((line) => `# ${commentSafe(line)}`);
  out.push(`default = ${tomlString(document.default)}`);
  for (const [index, rule] of document.rules.entries()) {
    out.push('', `# rule ${index + 1}`, '[[rule]]');
    for (const field of RULE_FIELDS) {
      const value = writtenValue(rule, field);
      if (value === undefined) continue;
      out.push(`${field} = ${tomlValue(value)}`);
      if (field === 'hosts') {
        for (const host of rule.hosts!) {
          if (host.fingerprints.length === 1 && host.fingerprints[0] === host.name) continue;
          out.push(`#   ${commentSafe(host.name)}: ${host.fingerprints.join(' ')}`);
        }
      }
    }
  }
  return out.join('\n') + '\n';
}

/** `purpose=sshsig namespaces=git` (what the rule matches; `any request` if nothing). */
export function describeRuleMatch(rule: PolicyRule): string {
  const parts: string[] = [];
  for (const field of RULE_FIELDS) {
    if (field === 'action' || field === 'remember' || field === 'rate') continue;
    const value = writtenValue(rule, field);
    if (value === undefined) continue;
    parts.push(`${field}=${Array.isArray(value) ? value.map(String).join(',') : String(value)}`);
  }
  return parts.length > 0 ? commentSafe(parts.join(' ')) : 'any request';
}

/**
 * A scope's ssh-add constraints, after its policy: `[[ssh-add]]` tables that `policy set` takes
 * back unchanged (and leaves to ssh-add), each key's host names followed by their host keys.
 */
export function formatSshAddConstraints(
  entries: { fingerprint: string; comment: string; certificate?: { key_id: string; serial: string }; constraints: StoredConstraints }[],
): string {
  if (entries.length === 0) return '';
  // A certificate has no keyhold command of its own: ssh-add -d removes it (keyhold key rm, with its key).
  const removedBy = entries.some((e) => e.certificate) ? 'ssh-add -d, or `keyhold key unassign` for a key,' : 'ssh-add -d or `keyhold key unassign`';
  const out = ['', `# ssh-add constraints (ssh-add sets them; ${removedBy} removes them)`];
  for (const { fingerprint, comment, certificate, constraints } of entries) {
    out.push('[[ssh-add]]', `key = ${tomlString(fingerprint)}${comment ? `  # ${commentSafe(comment)}` : ''}`);
    // A certificate of the key is an identity of its own, with constraints of its own.
    if (certificate) out.push(`certificate = ${tomlString(certificate.key_id)}`, `serial = ${tomlString(certificate.serial)}`);
    if (constraints.confirm) out.push('confirm = true');
    if (constraints.expiresAt !== null) out.push(`expires = ${tomlString(constraints.expiresAt)}`);
    if (constraints.destinations !== null) {
      const { hosts, keys } = describeDestinations(constraints.destinations);
      out.push(`hosts = ${tomlValue(hosts)}`);
      if (keys.length > 0) out.push(`# ${commentSafe(keys.join(' ; '))}`);
    }
  }
  return out.join('\n') + '\n';
}
