// Policy files: what parses, and for each kind of mistake an error (exit 2) naming file, line and field.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { stringify } from 'smol-toml';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { locate, parsePolicyToml } from '../../src/policy/parse.js';
import { MAX_RULES } from '../../src/policy/policy.js';

const FP = 'SHA256:' + 'b'.repeat(43);

function parseError(text: string): string {
  try {
    parsePolicyToml(text, 'policy.toml');
  } catch (err) {
    expect(err).toBeInstanceOf(KeyholdError);
    expect((err as KeyholdError).exitCode).toBe(EXIT.USAGE);
    return (err as KeyholdError).message;
  }
  throw new Error('parsed without error');
}

describe('parsePolicyToml', () => {
  it('reads the contract example: rules in order, purpose any dropped, keys normalised, lines of rules and fields', () => {
    const text = `default = "deny"                 # when no rule matches

[[rule]]                         # first
action = "allow"
purpose = "ssh-login"
hosts = ["github.com", "${FP}"]
users = ["git"]
exe = ["/usr/bin/ssh", "/usr/lib/git-core/*"]

[[rule]]
action = "confirm"
purpose = "sshsig"
namespaces = ["git"]
remember = "10m"

[[rule]]
action = "allow"
purpose = "any"
forwarded = true
keys = ["${'c'.repeat(43)}"]
rate = "60/m"
subjects = ["ci-*"]
`;
    const parsed = parsePolicyToml(text, 'p.toml');
    expect(parsed.default).toBe('deny');
    expect(parsed.rules).toEqual([
      { action: 'allow', purpose: 'ssh-login', hosts: ['github.com', FP], users: ['git'], exe: ['/usr/bin/ssh', '/usr/lib/git-core/*'] },
      { action: 'confirm', purpose: 'sshsig', namespaces: ['git'], remember: '10m' },
      { action: 'allow', forwarded: true, keys: ['SHA256:' + 'c'.repeat(43)], rate: '60/m', subjects: ['ci-*'] },
    ]);
    expect(parsed.lines.map((l) => l.start)).toEqual([3, 10, 16]);
    expect(parsed.lines[0]!.fields).toMatchObject({ action: 4, purpose: 5, hosts: 6, users: 7, exe: 8 });
    expect(parsed.lines[2]!.fields).toMatchObject({ forwarded: 19, keys: 20, rate: 21, subjects: 22 });
    expect(parsed.topLines.default).toBe(1);
  });

  it('an empty file is an allow-all policy with no rules; default absent is allow', () => {
    expect(parsePolicyToml('', 'p')).toMatchObject({ default: 'allow', rules: [] });
    expect(parsePolicyToml('# nothing\n', 'p')).toMatchObject({ default: 'allow', rules: [] });
  });

  const cases: [what: string, text: string, expected: RegExp][] = [
    ['TOML syntax, with its line', 'default = "deny"\n[[rule]]\naction = "allow\n', /^policy\.toml:3: not valid TOML: /],
    ['a key defined twice', '[[rule]]\naction = "allow"\naction = "deny"\n', /^policy\.toml:3: not valid TOML: /],
    ['unknown top-level key', 'default = "deny"\n\nrules = []\n', /^policy\.toml:3: unknown key "rules"/],
    ['unknown top-level table', 'default = "deny"\n[serve]\nx = 1\n', /^policy\.toml:2: unknown key "serve"/],
    ['bad default', '# c\ndefault = "maybe"\n', /^policy\.toml:2: default: must be one of allow, deny, confirm$/],
    ['default of the wrong type', 'default = 1\n', /^policy\.toml:1: default: must be one of/],
    ['rule not an array of tables', '[rule]\naction = "allow"\n', /^policy\.toml:1: rule: must be an array of tables/],
    ['unknown rule field', '[[rule]]\naction = "allow"\n\n  host = ["x"]\n', /^policy\.toml:4: rule 1: host: unknown field/],
    ['missing action', 'default = "deny"\n[[rule]]\npurpose = "sshsig"\n', /^policy\.toml:2: rule 1: action: missing/],
    ['bad action', '[[rule]]\naction = "allow"\n[[rule]]\naction = "permit"\n', /^policy\.toml:4: rule 2: action: must be one of allow, deny, confirm$/],
    ['bad purpose (the brief example)', 'default = "deny"\n\n[[rule]]\naction = "allow"\n\n[[rule]]\npurpose = "login"\naction = "confirm"\n', /^policy\.toml:7: rule 2: purpose: must be one of ssh-login, sshsig, other, any$/],
    ['a list of the wrong type', '[[rule]]\naction = "allow"\nusers = "git"\n', /^policy\.toml:3: rule 1: users: must be a list of strings/],
    ['a list entry of the wrong type', '[[rule]]\naction = "allow"\nusers = ["git", 5]\n', /^policy\.toml:3: rule 1: users: entry 2 must be a string/],
    ['an empty list', '[[rule]]\naction = "allow"\nnamespaces = []\n', /^policy\.toml:3: rule 1: namespaces: must not be empty/],
    ['an empty string', '[[rule]]\naction = "allow"\nsubjects = [""]\n', /^policy\.toml:3: rule 1: subjects: entry 1 is empty/],
    ['forwarded not a boolean', '[[rule]]\naction = "deny"\nforwarded = "yes"\n', /^policy\.toml:3: rule 1: forwarded: must be true or false/],
    ['bad remember', '[[rule]]\naction = "confirm"\nremember = "10 minutes"\n', /^policy\.toml:3: rule 1: remember: must be a duration/],
    ['remember as a number', '[[rule]]\naction = "confirm"\nremember = 600\n', /^policy\.toml:3: rule 1: remember: must be a duration/],
    ['bad rate', '[[rule]]\naction = "allow"\n\nrate = "60 per minute"\n', /^policy\.toml:4: rule 1: rate: must be signatures per period/],
    ['zero rate', '[[rule]]\naction = "allow"\nrate = "0/m"\n', /^policy\.toml:3: rule 1: rate: /],
    ['a key that is not a fingerprint', '[[rule]]\naction = "allow"\nkeys = ["MD5:aa:bb"]\n', /^policy\.toml:3: rule 1: keys: "MD5:aa:bb": not a key fingerprint/],
    ['a host that is neither name nor fingerprint', '[[rule]]\naction = "allow"\nhosts = ["*.example.com"]\n', /^policy\.toml:3: rule 1: hosts: "\*\.example\.com": not a host name/],
    ['a short host fingerprint', '[[rule]]\naction = "allow"\nhosts = ["SHA256:abc"]\n', /^policy\.toml:3: rule 1: hosts: "SHA256:abc": not a host key fingerprint/],
    ['a bare exe name', '[[rule]]\naction = "allow"\nexe = ["node"]\n', /^policy\.toml:3: rule 1: exe: "node": exe is matched against the full path/],
    ['namespaces with ssh-login', '[[rule]]\naction = "allow"\npurpose = "ssh-login"\nnamespaces = ["git"]\n', /^policy\.toml:4: rule 1: namespaces: only a sshsig request has namespaces/],
    ['hosts with sshsig', '[[rule]]\naction = "allow"\npurpose = "sshsig"\nhosts = ["github.com"]\n', /^policy\.toml:4: rule 1: hosts: only a ssh-login request has hosts/],
    ['users with other', '[[rule]]\naction = "allow"\npurpose = "other"\n# users\nusers = ["git"]\n', /^policy\.toml:5: rule 1: users: only a ssh-login request has users/],
    ['remember on an allow rule', '[[rule]]\naction = "allow"\nremember = "1m"\n', /^policy\.toml:3: rule 1: remember: only a confirm rule remembers/],
    ['rate on a deny rule', '[[rule]]\naction = "deny"\nrate = "5/m"\n', /^policy\.toml:3: rule 1: rate: a deny rule signs nothing/],
    ['a rule that is not a table', 'rule = ["allow"]\n', /^policy\.toml:1: rule 1: must be a table/],
    ['nesting too deep for a policy', `default = ${'['.repeat(20)}${']'.repeat(20)}\n`, /^policy\.toml:1: not valid TOML: /],
  ];
  for (const [what, text, expected] of cases) {
    it(`refuses ${what}`, () => {
      expect(parseError(text)).toMatch(expected);
    });
  }

  it('refuses more than MAX_RULES rules at the first one over, and a file over 1 MiB', () => {
    const rules = '[[rule]]\naction = "allow"\n'.repeat(MAX_RULES + 1);
    expect(parseError(rules)).toBe(`policy.toml:${MAX_RULES * 2 + 1}: rule ${MAX_RULES + 1}: a policy has at most ${MAX_RULES} rules`);
    expect(parseError('#'.repeat(1024 * 1024 + 1))).toMatch(/^policy\.toml: the file is 1048577 bytes; a policy file is at most 1 MiB/);
  });

  it('a __proto__ or constructor key is an unknown field, not a prototype', () => {
    expect(parseError('[[rule]]\naction = "allow"\n__proto__ = { action = "deny" }\n')).toMatch(/rule 1: __proto__: unknown field/);
    expect(parseError('constructor = 1\n')).toMatch(/unknown key "constructor"/);
  });

  describe('finding lines in the forms TOML allows', () => {
    it('quoted keys, comments with brackets and equals, multi-line strings and arrays', () => {
      const text = [
        'default = "deny" # [[rule]] in a comment',
        '"""not a key""" = 1',
        '[[rule]]',
        'action = "allow"',
        'users = [',
        '  "a", # x = 1',
        '  "[[rule]]",',
        ']',
        '"exe" = ["/x"]',
        "'purpose' = '''",
        'ssh-login',
        "'''",
        '[[ rule ]]  # second',
        'action = "deny"',
        ' "bogus key" = 1',
      ].join('\n');
      const { lines } = locate(text);
      expect(lines.map((l) => l.start)).toEqual([3, 13]);
      expect(lines[0]!.fields).toMatchObject({ action: 4, users: 5, exe: 9, purpose: 10 });
      expect(lines[1]!.fields).toMatchObject({ action: 14, 'bogus key': 15 });
    });

    it('inline tables: rule = [{...}, {...}] places each rule and its fields', () => {
      const text = 'default = "deny"\nrule = [\n  { action = "allow", purpose = "sshsig" },\n  { action = "confirm",\n    purpose = "bogus" },\n]\n';
      expect(parseError(text)).toBe('policy.toml:5: rule 2: purpose: must be one of ssh-login, sshsig, other, any');
    });

    it('a sub-table [rule.hosts] is reported at its header', () => {
      expect(parseError('[[rule]]\naction = "allow"\n[rule.hosts]\nx = 1\n')).toMatch(/^policy\.toml:3: rule 1: hosts: must be a list/);
    });

    it('dotted keys in a rule are reported at their line', () => {
      expect(parseError('[[rule]]\naction = "allow"\nusers.name = "git"\n')).toMatch(/^policy\.toml:3: rule 1: users: must be a list/);
    });

    it('on files smol-toml writes from random rules, every rule and field is found on its own line', () => {
      const value = fc.oneof(fc.string({ maxLength: 8 }), fc.array(fc.string({ maxLength: 8 }), { maxLength: 3 }), fc.boolean());
      const ruleArb = fc.dictionary(fc.constantFrom('action', 'users', 'exe', 'forwarded', 'a b', '#x', '"q"', "'"), value, { minKeys: 1, maxKeys: 4 });
      fc.assert(
        fc.property(fc.array(ruleArb, { maxLength: 5 }), (rules) => {
          const text = stringify({ default: 'deny', rule: rules });
          const lines = text.split('\n');
          const found = locate(text).lines;
          expect(found).toHaveLength(rules.length);
          rules.forEach((rule, i) => {
            expect(lines[found[i]!.start - 1]).toBe('[[rule]]');
            for (const key of Object.keys(rule)) {
              const line = found[i]!.fields[key];
              expect(line, `${key} in\n${text}`).toBeDefined();
              expect(lines[line! - 1]!.startsWith(/^[A-Za-z0-9_-]+$/.test(key) ? `${key} =` : JSON.stringify(key))).toBe(true);
            }
          });
        }),
        { numRuns: 200, seed: 3 },
      );
    });

    it('never throws on text it cannot follow, and falls back to the rule or line 1', () => {
      for (const text of ['[[rule', '"unterminated', "a = '''", 'x = [1, {', '[[rule]]\n= 1', '\u0000', '[[rule]]\naction = "allow"\n{']) {
        expect(() => locate(text)).not.toThrow();
      }
    });
  });
});
