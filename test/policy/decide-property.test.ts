// compilePolicy against a reference written plainly from the contract's words ("rules are tried in
// order; the first that matches decides; fields are ANDed, a list matches any element, an absent
// field matches anything"; exe and subjects are globs; a fact the request should carry but that is
// unknown lets deny and confirm rules match, never allow rules), on random policies and random requests.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { compilePolicy, globMatch, type OfferFacts } from '../../src/policy/compile.js';
import { ACTIONS, PURPOSES, type Decision, type PolicyDocument, type PolicyRule, type SignFacts } from '../../src/policy/policy.js';

const fp = (c: string) => `SHA256:${c.repeat(43)}`;
const FPS = [fp('a'), fp('b'), fp('c'), fp('d')];
const USERS = ['git', 'root', 'deploy'];
const NAMESPACES = ['git', 'file', 'x'];
// Paths and subjects that spell the characters a careless glob would treat specially.
const GLOB_CHARS = ['a', 'b', '/', '.', '-', '*', '?', '[', ']', '(', ')', '\\', '+', '$', '^', '|', '{', '}'];
const TEXT_CHARS = ['a', 'b', '/', '.', '-', '[', ']', '(', ')', '\\', '+', '$', '^', '|', '{', '}', '*', '?', '\n'];

const text = (chars: string[], max: number) => fc.array(fc.constantFrom(...chars), { maxLength: max }).map((c) => c.join(''));
const glob = text(GLOB_CHARS, 8).filter((g) => g.length > 0);
const someOf = <T>(values: T[]) => fc.uniqueArray(fc.constantFrom(...values), { minLength: 1, maxLength: values.length });

/** Each field present about one time in four: rules that match often enough to decide something. */
const sometimes = <T>(arb: fc.Arbitrary<T>) => fc.oneof({ arbitrary: fc.constant(undefined), weight: 3 }, { arbitrary: arb, weight: 1 });

const rule: fc.Arbitrary<PolicyRule> = fc
  .record({
    action: fc.constantFrom(...ACTIONS),
    purpose: sometimes(fc.constantFrom(...PURPOSES)),
    hosts: sometimes(fc.array(fc.record({ name: fc.constantFrom('h1', 'h2'), fingerprints: someOf(FPS) }), { minLength: 1, maxLength: 3 })),
    users: sometimes(someOf(USERS)),
    exe: sometimes(fc.array(glob, { minLength: 1, maxLength: 3 })),
    namespaces: sometimes(someOf(NAMESPACES)),
    keys: sometimes(someOf(FPS)),
    subjects: sometimes(fc.array(glob, { minLength: 1, maxLength: 3 })),
    forwarded: sometimes(fc.boolean()),
    remember: sometimes(fc.constant('10m')),
    rate: sometimes(fc.constantFrom('60/m', '5/30s')),
  })
  .map((r) => Object.fromEntries(Object.entries(r).filter(([, value]) => value !== undefined)) as unknown as PolicyRule);

const policy: fc.Arbitrary<PolicyDocument> = fc.record({ default: fc.constantFrom(...ACTIONS), rules: fc.array(rule, { maxLength: 6 }) });

const facts: fc.Arbitrary<SignFacts> = fc.record(
  {
    purpose: fc.constantFrom(...PURPOSES),
    key: fc.constantFrom(...FPS),
    user: fc.constantFrom(...USERS, 'nobody', ''),
    hostKey: fc.constantFrom(...FPS),
    namespace: fc.constantFrom(...NAMESPACES, 'other'),
    exe: fc.oneof(text(TEXT_CHARS, 10), fc.constant(null)),
    subject: text(TEXT_CHARS, 6),
    forwarded: fc.boolean(),
  },
  { requiredKeys: ['purpose', 'key', 'forwarded'] },
);

/** `*` any run of characters, `?` exactly one, anything else itself: by the definition, recursively. */
function referenceGlob(pattern: string, value: string): boolean {
  if (pattern === '') return value === '';
  if (pattern[0] === '*') return referenceGlob(pattern.slice(1), value) || (value !== '' && referenceGlob(pattern, value.slice(1)));
  if (value === '') return false;
  return (pattern[0] === '?' || pattern[0] === value[0]) && referenceGlob(pattern.slice(1), value.slice(1));
}

function referenceMatches(r: PolicyRule, f: SignFacts): boolean {
  if (r.purpose !== undefined && r.purpose !== f.purpose) return false;
  // A fact the request should carry but that is unknown: a deny or confirm rule matches, an allow rule does not.
  const unknownMatches = r.action !== 'allow';
  if (r.hosts !== undefined) {
    let found = false;
    if (f.hostKey === undefined) found = f.purpose === 'ssh-login' && unknownMatches;
    for (const host of r.hosts) for (const k of host.fingerprints) if (f.hostKey !== undefined && k === f.hostKey) found = true;
    if (!found) return false;
  }
  if (r.users !== undefined && (f.user === undefined || !r.users.includes(f.user))) return false;
  if (r.exe !== undefined) {
    if (f.exe === null) {
      if (!unknownMatches) return false;
    } else if (typeof f.exe !== 'string' || !r.exe.some((g) => referenceGlob(g, f.exe as string))) return false;
  }
  if (r.namespaces !== undefined && (f.namespace === undefined || !r.namespaces.includes(f.namespace))) return false;
  if (r.keys !== undefined && !r.keys.includes(f.key)) return false;
  if (r.subjects !== undefined && (f.subject === undefined || !r.subjects.some((g) => referenceGlob(g, f.subject as string)))) return false;
  if (r.forwarded !== undefined && r.forwarded !== f.forwarded) return false;
  return true;
}

function referenceDecide(document: PolicyDocument, f: SignFacts): Decision {
  for (let i = 0; i < document.rules.length; i++) {
    if (referenceMatches(document.rules[i]!, f)) return { action: document.rules[i]!.action, rule: i };
  }
  return { action: document.default, rule: null };
}

const RUNS = { numRuns: 400, seed: 12 };

describe('compilePolicy', () => {
  it('globMatch agrees with the recursive definition, metacharacters of regular expressions included', () => {
    fc.assert(fc.property(text(GLOB_CHARS, 8), text(TEXT_CHARS, 10), (g, v) => globMatch(g, v) === referenceGlob(g, v)), { numRuns: 2000, seed: 7 });
  });

  it('globMatch stays fast on a long path against many stars (no backtracking blow-up)', () => {
    const started = performance.now();
    expect(globMatch('*a*a*a*a*a*a*a*a*b', '/' + 'a'.repeat(4096))).toBe(false);
    expect(performance.now() - started).toBeLessThan(2000);
  });

  it('decide never throws and agrees with the reference evaluator', () => {
    const decidedBy = { rule: 0, default: 0 };
    fc.assert(
      fc.property(policy, fc.array(facts, { minLength: 1, maxLength: 8 }), (document, requests) => {
        const compiled = compilePolicy(document);
        for (const f of requests) {
          const decision = compiled.decide(f);
          expect(decision).toEqual(referenceDecide(document, f));
          decidedBy[decision.rule === null ? 'default' : 'rule']++;
        }
      }),
      RUNS,
    );
    // Not vacuous: rules decide a fair share of the requests.
    expect(decidedBy.rule).toBeGreaterThan(200);
    expect(decidedBy.default).toBeGreaterThan(200);
  });

  it('is inactive only for a policy that allows everything by default with no rules', () => {
    fc.assert(fc.property(policy, (document) => compilePolicy(document).active === (document.rules.length > 0 || document.default !== 'allow')), RUNS);
  });

  it('mayOffer never hides a key that decide would allow or confirm for some user (routing is sound)', () => {
    const offer: fc.Arbitrary<OfferFacts> = fc.record(
      {
        key: fc.constantFrom(...FPS),
        hostKey: fc.constantFrom(...FPS),
        exe: fc.oneof(text(TEXT_CHARS, 10), fc.constant(null)),
        subject: text(TEXT_CHARS, 6),
        forwarded: fc.boolean(),
      },
      { requiredKeys: ['key', 'hostKey', 'forwarded'] },
    );
    const outcomes = { admitted: 0, refused: 0 };
    fc.assert(
      fc.property(policy, offer, (document, o) => {
        const compiled = compilePolicy(document);
        // Rules test users only by membership: the users they name and one they do not cover every case.
        const users = [...new Set(document.rules.flatMap((r) => r.users ?? [])), 'someone-else'];
        const admitted = users.some((user) => {
          const f: SignFacts = { purpose: 'ssh-login', key: o.key, hostKey: o.hostKey, user, forwarded: o.forwarded };
          if (o.exe !== undefined) f.exe = o.exe;
          if (o.subject !== undefined) f.subject = o.subject;
          return compiled.decide(f).action !== 'deny';
        });
        if (admitted) expect(compiled.mayOffer(o)).toBe(true);
        outcomes[admitted ? 'admitted' : 'refused']++;
      }),
      RUNS,
    );
    expect(outcomes.admitted).toBeGreaterThan(50);
    expect(outcomes.refused).toBeGreaterThan(50);
  });
});
