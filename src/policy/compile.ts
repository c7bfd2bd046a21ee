// A policy compiled once per vault version: each rule becomes a list of precomputed tests (sets,
// regular expressions), so deciding a request costs a few lookups and no parsing.
import { parseDuration } from '../duration.js';
import { RATE_PATTERN, type Action, type Decision, type PolicyDocument, type PolicyRule, type SignFacts } from './policy.js';

export interface Rate {
  count: number;
  perMs: number;
}

/** Whether a rule can match a request about which only some facts are known yet. */
type Match = 'yes' | 'maybe' | 'no';

/** What `identities` knows on a connection bound to a host: the key, the host, who asks. */
export interface OfferFacts {
  key: string;
  hostKey: string;
  exe?: string | null;
  subject?: string;
  forwarded: boolean;
}

export interface CompiledRule {
  readonly index: number;
  readonly action: Action;
  readonly rememberMs: number | null;
  readonly rate: Rate | null;
  matches(facts: SignFacts): boolean;
  /** For routing: could this rule match an ssh-login with `facts` (the user is not known yet)? */
  mayMatchLogin(facts: OfferFacts): Match;
}

export interface CompiledPolicy {
  readonly document: PolicyDocument;
  /** False for a scope without rules whose default allows: decide nothing, sign as before. */
  readonly active: boolean;
  readonly rules: readonly CompiledRule[];
  decide(facts: SignFacts): Decision;
  /** Whether some rule may allow or confirm a login with this key to this host (routing). */
  mayOffer(facts: OfferFacts): boolean;
}

/**
 * `*` any run of characters (`/` included), `?` one character; everything else literal. Matched
 * greedily with one backtrack point, in at most len(glob) x len(value) steps: a regular expression
 * such as /^.*a.*a.*a.*b$/ takes minutes on a 300-character exe path a caller can choose.
 */
export function globMatch(glob: string, value: string): boolean {
  let g = 0;
  let v = 0;
  let star = -1;
  let resume = 0;
  while (v < value.length) {
    const c = glob[g];
    if (c === '*') {
      star = g++;
      resume = v;
    } else if (c !== undefined && (c === '?' || c === value[v])) {
      g++;
      v++;
    } else if (star >= 0) {
      // Let the last `*` take one more character and try again from there.
      g = star + 1;
      v = ++resume;
    } else return false;
  }
  while (glob[g] === '*') g++;
  return g === glob.length;
}

export function parseRate(text: string): Rate {
  const match = RATE_PATTERN.exec(text);
  if (!match) throw new Error(`invalid rate ${JSON.stringify(text)}`);
  return { count: Number(match[1]), perMs: parseDuration(`${match[2] ?? '1'}${match[3]}`, 'rate period') };
}

/** Answers remembered per value: a daemon sees few distinct programs and subjects, each many times. */
const MAX_REMEMBERED_MATCHES = 1_024;

function anyGlob(globs: string[]): (value: string) => boolean {
  const answers = new Map<string, boolean>();
  return (value) => {
    let answer = answers.get(value);
    if (answer === undefined) {
      if (answers.size >= MAX_REMEMBERED_MATCHES) answers.clear();
      answers.set(value, (answer = globs.some((glob) => globMatch(glob, value))));
    }
    return answer;
  };
}

function compileRule(rule: PolicyRule, index: number): CompiledRule {
  // One test per field present; a request must pass them all.
  const tests: ((f: SignFacts) => boolean)[] = [];
  const offerTests: ((f: OfferFacts) => Match)[] = [];
  // A fact the request should have but keyhold cannot know (the host of a login that names none
  // and was not bound, the program of a process whose /proc entry is gone) fails closed: it never
  // lets an allow rule match, and always lets a deny or confirm rule match.
  const unknownMatches = rule.action !== 'allow';
  const { purpose } = rule;
  if (purpose) {
    tests.push((f) => f.purpose === purpose);
    offerTests.push(() => (purpose === 'ssh-login' ? 'yes' : 'no'));
  }
  if (rule.hosts) {
    const hosts = new Set(rule.hosts.flatMap((h) => h.fingerprints));
    tests.push((f) => (f.hostKey !== undefined ? hosts.has(f.hostKey) : f.purpose === 'ssh-login' && unknownMatches));
    offerTests.push((f) => (hosts.has(f.hostKey) ? 'yes' : 'no'));
  }
  if (rule.users) {
    const users = new Set(rule.users);
    tests.push((f) => f.user !== undefined && users.has(f.user));
    offerTests.push(() => 'maybe');
  }
  if (rule.exe) {
    const exe = anyGlob(rule.exe);
    // `exe` undefined: not a local process (a token connection), which no exe rule is about.
    const known = (value: string | null | undefined) => (typeof value === 'string' ? exe(value) : value === null && unknownMatches);
    tests.push((f) => known(f.exe));
    offerTests.push((f) => (known(f.exe) ? 'yes' : 'no'));
  }
  if (rule.namespaces) {
    const namespaces = new Set(rule.namespaces);
    tests.push((f) => f.namespace !== undefined && namespaces.has(f.namespace));
    offerTests.push(() => 'no');
  }
  if (rule.keys) {
    const keys = new Set(rule.keys);
    tests.push((f) => keys.has(f.key));
    offerTests.push((f) => (keys.has(f.key) ? 'yes' : 'no'));
  }
  if (rule.subjects) {
    const subject = anyGlob(rule.subjects);
    tests.push((f) => f.subject !== undefined && subject(f.subject));
    offerTests.push((f) => (f.subject !== undefined && subject(f.subject) ? 'yes' : 'no'));
  }
  if (rule.forwarded !== undefined) {
    const forwarded = rule.forwarded;
    tests.push((f) => f.forwarded === forwarded);
    offerTests.push((f) => (f.forwarded === forwarded ? 'yes' : 'no'));
  }
  return {
    index,
    action: rule.action,
    rememberMs: rule.remember ? parseDuration(rule.remember, 'remember') : null,
    rate: rule.rate ? parseRate(rule.rate) : null,
    matches: (facts) => tests.every((test) => test(facts)),
    mayMatchLogin(facts) {
      let result: Match = 'yes';
      for (const test of offerTests) {
        const match = test(facts);
        if (match === 'no') return 'no';
        if (match === 'maybe') result = 'maybe';
      }
      return result;
    },
  };
}

export function compilePolicy(document: PolicyDocument): CompiledPolicy {
  const rules = document.rules.map(compileRule);
  return {
    document,
    active: rules.length > 0 || document.default !== 'allow',
    rules,
    decide(facts) {
      for (const rule of rules) if (rule.matches(facts)) return { action: rule.action, rule: rule.index };
      return { action: document.default, rule: null };
    },
    mayOffer(facts) {
      // The first rule that surely matches decides; one that only may match (it names users)
      // offers the key if it allows, and otherwise lets later rules speak.
      for (const rule of rules) {
        const match = rule.mayMatchLogin(facts);
        if (match === 'no') continue;
        if (rule.action !== 'deny') return true;
        if (match === 'yes') return false;
      }
      return document.default !== 'deny';
    },
  };
}
