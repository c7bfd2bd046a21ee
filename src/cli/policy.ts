// `keyhold policy set/show/rm/check`: a scope's policy, written as TOML, stored with its host names
// resolved through known_hosts here (in the CLI, as the user who ran ssh), decided by the same
// compiled rules the daemon uses.
import type { Argv } from 'yargs';
import { FINGERPRINT_PATTERN } from '../agent-protocol/public-key.js';
import { EXIT, KeyholdError, QuietExit, usageError } from '../errors.js';
import { compilePolicy } from '../policy/compile.js';
import { describeRuleMatch, formatPolicyToml, formatSshAddConstraints } from '../policy/format.js';
import { defaultKnownHostsFiles, KnownHosts, resolvePolicyHosts, type HostKeyMatch } from '../policy/known-hosts.js';
import { parsePolicyToml } from '../policy/parse.js';
import { checkStoredConstraints, type StoredConstraints } from '../policy/ssh-add-constraints.js';
import { checkPolicyDocument, MAX_POLICY_SOURCE, NO_POLICY, PURPOSES, type Decision, type PolicyDocument, type Purpose, type SignFacts } from '../policy/policy.js';
import { readCapped } from '../read-capped.js';
import { checkScopeName } from '../vault/vault.js';
import { printJson, printLines, STDIN_ARGUMENT, withVault, type GlobalArgs } from './common.js';

const knownHostsOption = {
  type: 'string',
  array: true,
  describe: 'also read this known_hosts file (repeatable); ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts are always read',
} as const;

function loadKnownHosts(extra: readonly string[] | undefined): KnownHosts {
  return KnownHosts.load(defaultKnownHostsFiles(), extra ?? []);
}

function readPolicyFile(file: string): { text: string; name: string } {
  const bytes = readCapped(file, MAX_POLICY_SOURCE, 'policy file (the limit is 1 MiB)', EXIT.USAGE);
  const name = file === '-' ? 'stdin' : file;
  try {
    return { text: new TextDecoder('utf-8', { fatal: true }).decode(bytes), name };
  } catch {
    throw usageError(`${name}: not UTF-8 text`, 'a policy file is TOML, which is UTF-8');
  }
}

const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? '' : 's'}`;

function location(found: HostKeyMatch[]): string {
  return [...new Set(found.map((f) => `${f.file}:${f.line}`))].join(', ');
}

/** `rule 2 (purpose=sshsig namespaces=git)` or `default`. */
function describeDecision(document: PolicyDocument, decision: Decision): string {
  if (decision.rule === null) return `${decision.action}: default`;
  return `${decision.action}: rule ${decision.rule + 1} (${describeRuleMatch(document.rules[decision.rule]!)})`;
}

interface CheckArgs {
  purpose?: string | undefined;
  host?: string | undefined;
  user?: string | undefined;
  namespace?: string | undefined;
  exe?: string | undefined;
  subject?: string | undefined;
  key?: string | undefined;
  forwarded?: boolean | undefined;
  'known-hosts'?: string[] | undefined;
}

function checkPurpose(args: CheckArgs): Purpose {
  if (args.purpose !== undefined) {
    if (!(PURPOSES as readonly string[]).includes(args.purpose)) {
      throw usageError(`--purpose must be one of ${PURPOSES.join(', ')}`, 'a request has one purpose; `any` is for rules');
    }
    return args.purpose as Purpose;
  }
  if (args.namespace !== undefined) return 'sshsig';
  if (args.host !== undefined || args.user !== undefined) return 'ssh-login';
  return 'other';
}

/** The host keys `--host` stands for: a fingerprint itself, or a name's keys in known_hosts. */
function hostKeys(host: string | undefined, extra: string[] | undefined): (string | undefined)[] {
  if (host === undefined) return [undefined];
  if (host.startsWith('SHA256:')) {
    if (!FINGERPRINT_PATTERN.test(host)) throw usageError(`--host ${JSON.stringify(host.slice(0, 80))} is not a SHA256: fingerprint`);
    return [host];
  }
  const knownHosts = loadKnownHosts(extra);
  const found = knownHosts.resolve(host);
  if (found.length === 0) {
    throw usageError(
      `no known host key for ${JSON.stringify(host.slice(0, 200))} (searched ${knownHosts.files.join(', ') || 'no readable known_hosts file'})`,
      'connect once with ssh, or pass the host key fingerprint as --host SHA256:…',
    );
  }
  return found.map((f) => f.fingerprint);
}

function normaliseKey(key: string): string {
  const full = key.startsWith('SHA256:') ? key : `SHA256:${key}`;
  if (!FINGERPRINT_PATTERN.test(full)) throw usageError(`--key ${JSON.stringify(key.slice(0, 80))} is not a key fingerprint`, 'as `keyhold key list` prints it');
  return full;
}

export function policyCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('policy', "a scope's policy: who may sign what, for which host", (y) =>
    y
      .command(
        'set <scope> <file>',
        'validate a TOML policy file (- for stdin), resolve its host names through known_hosts, store it',
        (c) =>
          c
            .positional('scope', { type: 'string', demandOption: true })
            .positional('file', { type: 'string', demandOption: true })
            .option('known-hosts', knownHostsOption),
        async (args) => {
          const scope = checkScopeName(args.scope);
          const file = args.file === STDIN_ARGUMENT ? '-' : args.file;
          if (file === '-' && (args['passphrase-file'] ?? process.env.KEYHOLD_PASSPHRASE_FILE) === '-') {
            throw usageError('the policy file and the passphrase cannot both come from stdin', 'put one of them in a file');
          }
          const { text, name } = readPolicyFile(file);
          const parsed = parsePolicyToml(text, name);
          if (parsed.sshAddEntries > 0) {
            const which = parsed.sshAddEntries === 1 ? 'the [[ssh-add]] entry' : `the ${parsed.sshAddEntries} [[ssh-add]] entries`;
            process.stderr.write(`keyhold: ${which} of ${name} ${parsed.sshAddEntries === 1 ? 'is' : 'are'} managed by ssh-add and left as ${parsed.sshAddEntries === 1 ? 'it is' : 'they are'}\n`);
          }
          const { document, hosts } = resolvePolicyHosts(parsed, loadKnownHosts(args['known-hosts']));
          checkPolicyDocument(document);
          const record = await withVault(args, (api) => api.setPolicy(scope, document, text));
          const rules = record.document.rules.length;
          if (args.json) {
            return printJson({
              scope,
              rules,
              default: record.document.default,
              hosts: hosts.map((h) => ({ name: h.name, fingerprints: h.fingerprints })),
              updated: record.updated,
            });
          }
          const lines = [`policy for ${scope}: ${plural(rules, 'rule')}, default ${record.document.default}`];
          for (const host of hosts) {
            if (host.found.length === 0) continue;
            lines.push(`  ${host.name}: ${host.fingerprints.join(' ')} (${location(host.found)})`);
          }
          printLines(lines);
        },
      )
      .command(
        'show <scope>',
        "print a scope's policy as TOML, each host followed by the fingerprints it resolved to",
        (c) => c.positional('scope', { type: 'string', demandOption: true }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          const { record, constraints } = await withVault(args, async (api) => ({
            record: await api.getPolicy(scope).catch((err: unknown) => {
              if (err instanceof KeyholdError && err.exitCode === EXIT.NOT_FOUND) return err;
              throw err;
            }),
            constraints: await api.scopeConstraints(scope),
          }));
          // A scope whose only policy is ssh-add's constraints shows them; one with neither is not found.
          if (record instanceof KeyholdError && constraints.length === 0) throw record;
          const policy = record instanceof KeyholdError ? null : record;
          if (args.json) {
            return printJson({
              ...(policy ?? { scope }),
              ssh_add: constraints.map((c) => ({ key: c.fingerprint, comment: c.comment, ...(c.certificate ? { certificate: c.certificate } : {}), ...c.constraints })),
            });
          }
          const head = policy
            ? formatPolicyToml(policy.document, [`policy for scope ${scope}, set ${policy.updated}`])
            : `# scope ${scope} has no policy: every request its ssh-add constraints let through is signed\n`;
          process.stdout.write(head + formatSshAddConstraints(constraints));
        },
      )
      .command(
        'rm <scope>',
        "remove a scope's policy (the scope then signs as without one)",
        (c) => c.positional('scope', { type: 'string', demandOption: true }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          await withVault(args, (api) => api.removePolicy(scope));
          if (args.json) printJson({ scope, removed: true });
          else process.stdout.write(`removed the policy of ${scope}\n`);
        },
      )
      .command(
        'check <scope>',
        'decide a request as the daemon would; exit 0 allow or confirm, 4 deny',
        (c) =>
          c
            .positional('scope', { type: 'string', demandOption: true })
            .option('purpose', { type: 'string', describe: `ssh-login, sshsig or other (default: from the other options)` })
            .option('host', { type: 'string', describe: 'ssh-login: the host (name via known_hosts, or SHA256: host key fingerprint)' })
            .option('user', { type: 'string', describe: 'ssh-login: the remote user' })
            .option('namespace', { type: 'string', describe: 'sshsig: the namespace (ssh-keygen -Y sign -n)' })
            .option('exe', { type: 'string', describe: "the caller's executable (full path)" })
            .option('subject', { type: 'string', describe: "a container token's subject" })
            .option('key', { type: 'string', describe: "the key's SHA256: fingerprint (default: each key of the scope)" })
            .option('forwarded', { type: 'boolean', describe: 'the request came through ssh -A' })
            .option('known-hosts', knownHostsOption),
        async (args) => {
          const scope = checkScopeName(args.scope);
          for (const option of ['purpose', 'host', 'user', 'namespace', 'exe', 'subject', 'key'] as const) {
            // yargs makes a repeated option a list; a request has one of each.
            if (Array.isArray(args[option])) throw usageError(`--${option} given more than once`, 'a request has one of each; run check once per value');
          }
          const purpose = checkPurpose(args);
          if (purpose !== 'ssh-login' && (args.host !== undefined || args.user !== undefined)) {
            throw usageError('--host and --user describe an ssh-login', 'leave out --purpose, or pass --purpose ssh-login');
          }
          if (purpose !== 'sshsig' && args.namespace !== undefined) {
            throw usageError('--namespace describes an sshsig request', 'leave out --purpose, or pass --purpose sshsig');
          }
          if (args.exe !== undefined && !args.exe.startsWith('/')) {
            throw usageError('--exe is the full path of the program, as /proc/PID/exe shows it', 'e.g. --exe /usr/bin/ssh');
          }
          const fixedKey = args.key !== undefined ? normaliseKey(args.key) : undefined;
          const hosts = hostKeys(args.host, args['known-hosts']);
          const { document, records, constraints } = await withVault(args, async (api) => ({
            document: await api.getPolicy(scope).then(
              (stored) => stored.document,
              (err: unknown) => {
                if (err instanceof KeyholdError && err.exitCode === EXIT.NOT_FOUND) return null;
                throw err;
              },
            ),
            records: await api.listKeys(scope),
            constraints: await api.scopeConstraints(scope),
          }));
          const keys = fixedKey ? [fixedKey] : records.map((k) => k.fingerprint);
          // Asked by key, not by identity: a key's own assignment answers for it; its certificate's
          // constraints only when the key is in the scope through its certificate alone.
          const assignedPlain = new Set(records.filter((k) => k.scopes.includes(scope)).map((k) => k.fingerprint));
          const constrained = new Map<string, StoredConstraints>();
          for (const c of constraints) {
            if (!c.certificate) constrained.set(c.fingerprint, c.constraints);
            else if (!assignedPlain.has(c.fingerprint) && !constrained.has(c.fingerprint)) constrained.set(c.fingerprint, c.constraints);
          }
          if (document === null && constrained.size === 0) {
            // As the contract says of such a scope: every request is signed. The line names the
            // scope, so a mistyped name shows itself.
            if (args.json) return printJson({ action: 'allow', rule: null, policy: false });
            return printLines([`allow: scope ${scope} has no policy (every request of its socket's uid or its tokens is signed)`]);
          }
          const policy = compilePolicy(document ?? NO_POLICY);
          const checks: { key: string | null; hostKey: string | null; decision: Decision; sshAdd?: string }[] = [];
          // A scope without keys still has a policy to ask: with a key no `keys` list names.
          for (const key of keys.length > 0 ? keys : [null]) {
            for (const hostKey of hosts) {
              const facts: SignFacts = {
                purpose,
                key: key ?? 'SHA256:',
                forwarded: args.forwarded === true,
                exe: args.exe ?? null,
                ...(args.user !== undefined ? { user: args.user } : {}),
                ...(hostKey !== undefined ? { hostKey } : {}),
                ...(args.namespace !== undefined ? { namespace: args.namespace } : {}),
                ...(args.subject !== undefined ? { subject: args.subject } : {}),
              };
              const decision = policy.decide(facts);
              // ssh-add's constraints filter first; -c turns an allow into a confirm.
              const stored = key === null ? undefined : constrained.get(key);
              const filtered = stored ? checkStoredConstraints(stored, { ...facts, ...(hostKey !== undefined ? { hostKey } : {}) }, Date.now()) : { confirm: false };
              if ('refused' in filtered) checks.push({ key, hostKey: hostKey ?? null, decision: { action: 'deny', rule: null }, sshAdd: filtered.refused });
              else if (filtered.confirm && decision.action === 'allow') checks.push({ key, hostKey: hostKey ?? null, decision: { action: 'confirm', rule: null }, sshAdd: 'added with ssh-add -c' });
              else checks.push({ key, hostKey: hostKey ?? null, decision });
            }
          }
          const same = checks.every(
            (c) => c.decision.action === checks[0]!.decision.action && c.decision.rule === checks[0]!.decision.rule && c.sshAdd === checks[0]!.sshAdd,
          );
          // Several answers: the one that refuses is the one to show first.
          const shown = checks.find((c) => c.decision.action === 'deny') ?? checks[0]!;
          const ruleOf = (c: (typeof checks)[number]) => (c.sshAdd !== undefined ? 'ssh-add' : c.decision.rule === null ? 'default' : c.decision.rule + 1);
          const written = document ?? NO_POLICY;
          const describe = (c: (typeof checks)[number]) => (c.sshAdd !== undefined ? `${c.decision.action}: ssh-add (${c.sshAdd})` : describeDecision(written, c.decision));
          if (args.json) {
            printJson({
              action: shown.decision.action,
              rule: ruleOf(shown),
              ...(shown.sshAdd !== undefined ? { reason: shown.sshAdd } : {}),
              ...(same ? {} : { checks: checks.map((c) => ({ key: c.key, host_key: c.hostKey, action: c.decision.action, rule: ruleOf(c) })) }),
            });
          } else if (same) {
            printLines([describe(shown)]);
          } else {
            const lines = ['the answer differs by key or host key:'];
            for (const c of checks) {
              const what = [c.key ? `key ${c.key}` : null, c.hostKey ? `host key ${c.hostKey}` : null].filter(Boolean).join(', ');
              lines.push(`  ${what}: ${describe(c)}`);
            }
            printLines(lines);
          }
          if (checks.some((c) => c.decision.action === 'deny')) throw new QuietExit(EXIT.DENIED);
        },
      )
      .demandCommand(1, 'name a policy command: set, show, rm, check'),
  );
}
