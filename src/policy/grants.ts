// What a scope's policy remembers between requests: `remember` grants (an approval covering a peer
// process or token, a key and a rule for a while) and `rate` counters (per rule and peer). Both
// belong to one policy document: the backend starts a fresh state when the scope's policy changes.
// Memory stays bounded: expired grants and idle counters are swept, and each map has a cap.
import type { CompiledPolicy, CompiledRule } from './compile.js';
import type { RequestContext } from '../signer/backend.js';

export const MAX_GRANTS = 10_000;
export const MAX_RATE_COUNTERS = 50_000;
const SWEEP_INTERVAL_MS = 60_000;

/**
 * Who a grant or a counter belongs to: a token, or a process named by its pid and start time (a
 * later process given the same pid is someone else). Null for a process whose start time could
 * not be read: it gets no grant.
 */
export function peerIdentity(context: RequestContext): string | null {
  if (context.tokenId) return `token:${context.tokenId}`;
  const peer = context.peer;
  if (peer.kind !== 'unix' || !context.processStart) return null;
  return `process:${peer.pid}:${context.processStart}`;
}

/** For bounds and rates, a peer without a known start time still counts, by its pid. */
export function peerAccount(context: RequestContext): string {
  let account = accounts.get(context);
  if (account === undefined) accounts.set(context, (account = accountOf(context)));
  return account;
}

/** A connection's context names the same peer for its whole life: its account is built once. */
const accounts = new WeakMap<RequestContext, string>();

function accountOf(context: RequestContext): string {
  const identity = peerIdentity(context);
  if (identity) return identity;
  const peer = context.peer;
  return peer.kind === 'unix' ? `pid:${peer.pid}` : `tcp:${peer.address}`;
}

interface Bucket {
  tokens: number;
  at: number;
}

export class PolicyState {
  private readonly grants = new Map<string, number>();
  private readonly buckets = new Map<string, Bucket>();
  private sweptAt: number;

  constructor(
    private current: CompiledPolicy,
    now = Date.now(),
  ) {
    this.sweptAt = now;
  }

  get policy(): CompiledPolicy {
    return this.current;
  }

  /** The same document compiled again (a new vault version): the state carries over. */
  adopt(policy: CompiledPolicy): void {
    this.current = policy;
  }

  /** Whether a remembered approval covers this peer, key and rule now. */
  granted(peer: string, key: string, rule: number | null, now = Date.now()): boolean {
    const until = this.grants.get(grantKey(peer, key, rule));
    return until !== undefined && until > now;
  }

  grant(peer: string, key: string, rule: number | null, forMs: number, now = Date.now()): void {
    this.sweep(now);
    const id = grantKey(peer, key, rule);
    this.grants.delete(id); // re-inserted last: the oldest grants go first when over the cap
    this.grants.set(id, now + forMs);
    if (this.grants.size > MAX_GRANTS) {
      for (const [k, until] of this.grants) if (until <= now) this.grants.delete(k);
      while (this.grants.size > MAX_GRANTS) this.grants.delete(this.grants.keys().next().value!);
    }
  }

  /**
   * Takes one signature from the rule's allowance for this peer (a token bucket holding `count`,
   * refilled over `per`); false when none is left.
   */
  takeRate(peer: string, rule: CompiledRule, now = Date.now()): boolean {
    const rate = rule.rate;
    if (!rate) return true;
    this.sweep(now);
    const id = `${rule.index}|${peer}`;
    let bucket = this.buckets.get(id);
    if (bucket) {
      bucket.tokens = Math.min(rate.count, bucket.tokens + ((now - bucket.at) * rate.count) / rate.perMs);
      bucket.at = now;
    } else {
      // A full map is swept at most once a second (each sweep visits every counter).
      if (this.buckets.size >= MAX_RATE_COUNTERS) this.sweep(now, now - this.sweptAt >= 1_000);
      // Still full of busy counters: the oldest goes (a peer that starts afresh is the lesser harm
      // than a daemon that grows without end).
      if (this.buckets.size >= MAX_RATE_COUNTERS) this.buckets.delete(this.buckets.keys().next().value!);
      bucket = { tokens: rate.count, at: now };
      this.buckets.set(id, bucket);
    }
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }

  get sizes(): { grants: number; counters: number } {
    return { grants: this.grants.size, counters: this.buckets.size };
  }

  /** Drops expired grants and counters that have refilled (a fresh one would be the same). */
  private sweep(now: number, force = false): void {
    if (!force && now - this.sweptAt < SWEEP_INTERVAL_MS) return;
    this.sweptAt = now;
    for (const [k, until] of this.grants) if (until <= now) this.grants.delete(k);
    for (const [k, bucket] of this.buckets) {
      const rule = this.policy.rules[Number(k.slice(0, k.indexOf('|')))];
      const rate = rule?.rate;
      if (!rate || bucket.tokens + ((now - bucket.at) * rate.count) / rate.perMs >= rate.count) this.buckets.delete(k);
    }
  }
}

function grantKey(peer: string, key: string, rule: number | null): string {
  return `${peer}|${key}|${rule ?? 'default'}`;
}
