// Abuse limits for token-listener handshakes. A connection is never refused before its token is
// read: a valid token is always served, whatever else is pending or however often its source (a
// TCP address, a Unix uid shared by many containers) has failed. What the guard limits instead:
//
// - Failures per source: each failed handshake is closed later than the one before (so a
//   guesser waits), and a source that keeps failing is "blocked" for a while: its failures are
//   held the longest delay (a client that retries in a loop then costs us little; held sockets
//   are bounded and the first to go when sockets run short), its handshakes get a short
//   timeout, and under pressure its pending handshakes are evicted first.
// - Pending handshakes: past the caps (per source, in total) the oldest pending handshakes are
//   evicted rather than new ones refused. A valid client sends its token at once, so it is never
//   the one evicted: a handshake can only be evicted once it is `graceMs` old and the event loop
//   has polled for its bytes at least once since it was accepted.

export interface HandshakeGuardOptions {
  /** Past these, the oldest pending handshakes that had their chance are evicted. */
  maxPendingPerSource: number;
  maxPendingTotal: number;
  /** Past this, a new handshake evicts the oldest one at once (a bound on sockets held). */
  hardPendingTotal: number;
  /** How long a handshake is safe from eviction (a valid client has sent its token by then). */
  graceMs: number;
  /** Failures within `windowMs` that get a source blocked for `blockMs`. */
  blockAfterFailures: number;
  windowMs: number;
  blockMs: number;
  /** Delay before closing the n-th failed handshake of a source in the window: base × 2^(n-1), capped. */
  baseDelayMs: number;
  maxDelayMs: number;
  /** Sockets held open while their close is delayed, in total and per source; past these they close at once. */
  maxDelayed: number;
  maxDelayedPerSource: number;
  /** The handshake timeout for a blocked source (others get the listener's full timeout). */
  blockedTimeoutMs: number;
  /** Sources remembered at most; past this the oldest with nothing pending are forgotten. */
  maxSources: number;
}

export const DEFAULT_GUARD: HandshakeGuardOptions = {
  maxPendingPerSource: 64,
  maxPendingTotal: 1024,
  hardPendingTotal: 2048,
  graceMs: 100,
  blockAfterFailures: 20,
  windowMs: 60_000,
  blockMs: 5 * 60_000,
  baseDelayMs: 50,
  maxDelayMs: 3_000,
  maxDelayed: 256,
  maxDelayedPerSource: 16,
  blockedTimeoutMs: 1_000,
  maxSources: 65_536,
};

interface SourceState {
  pending: Set<Pending>;
  /** Failed sockets of this source whose close is being delayed. */
  held: number;
  /** Times of failures in the window, oldest first (at most `blockAfterFailures`). */
  failures: number[];
  blockedUntil: number;
}

/** A handshake in progress; `evict` closes it (the listener then reports it finished). */
export interface Pending {
  readonly source: string;
  readonly startedAt: number;
  /** The guard's eviction pass count when this began: see `evictionPass`. */
  readonly epoch: number;
  readonly evict: () => void;
}

export type HandshakeOutcome = 'ok' | 'failed' | 'neutral';

export class HandshakeGuard {
  private readonly sources = new Map<string, SourceState>();
  /** Every pending handshake, oldest first. */
  private readonly pending = new Set<Pending>();
  private readonly delayedCloses = new Set<() => void>();
  private epoch = 0;
  /** Sources holding more pending handshakes than maxPendingPerSource (kept up to date, not counted). */
  private sourcesOverCap = 0;
  private passTimer: NodeJS.Timeout | null = null;
  /** Handshakes evicted so far (for logs and tests). */
  evicted = 0;

  constructor(private readonly options: HandshakeGuardOptions = DEFAULT_GUARD) {}

  private state(source: string): SourceState {
    let state = this.sources.get(source);
    if (!state) {
      if (this.sources.size >= this.options.maxSources) this.forgetOldestSource();
      this.sources.set(source, (state = { pending: new Set(), held: 0, failures: [], blockedUntil: 0 }));
    }
    return state;
  }

  isBlocked(source: string, now = Date.now()): boolean {
    return (this.sources.get(source)?.blockedUntil ?? 0) > now;
  }

  get pendingCount(): number {
    return this.pending.size;
  }

  get delayedCount(): number {
    return this.delayedCloses.size;
  }

  /** How long this source's handshake may take before it counts as failed. */
  timeoutFor(source: string, fullMs: number, now = Date.now()): number {
    return this.isBlocked(source, now) ? Math.min(fullMs, this.options.blockedTimeoutMs) : fullMs;
  }

  /**
   * Registers a new handshake; never refuses. Past the hard cap the oldest handshake is evicted
   * at once; past the soft caps an eviction pass is scheduled.
   */
  begin(source: string, evict: () => void, now = Date.now()): Pending {
    const state = this.state(source);
    const entry: Pending = { source, startedAt: now, epoch: this.epoch, evict };
    this.pending.add(entry);
    state.pending.add(entry);
    if (state.pending.size === this.options.maxPendingPerSource + 1) this.sourcesOverCap++;
    while (this.pending.size > this.options.hardPendingTotal) {
      const victim = this.pickVictim(now, entry);
      if (!victim) break;
      this.evictEntry(victim);
    }
    if (this.overSoftCaps()) this.schedulePass();
    return entry;
  }

  /**
   * Ends a handshake begun with `begin` (idempotent). A failure is counted against its source;
   * the answer is how long to hold the failed socket before closing it (0: close now).
   */
  finish(entry: Pending, outcome: HandshakeOutcome, now = Date.now()): number {
    if (!this.pending.delete(entry)) return 0;
    const state = this.state(entry.source);
    if (state.pending.delete(entry) && state.pending.size === this.options.maxPendingPerSource) this.sourcesOverCap--;
    if (outcome !== 'failed') {
      this.forgetIfIdle(entry.source, state, now);
      return 0;
    }
    return this.recordFailure(state, now);
  }

  private recordFailure(state: SourceState, now: number): number {
    const { windowMs, blockAfterFailures, blockMs, baseDelayMs, maxDelayMs } = this.options;
    if (state.blockedUntil > now) return maxDelayMs;
    state.failures = state.failures.filter((t) => now - t < windowMs);
    state.failures.push(now);
    const failures = state.failures.length;
    if (failures >= blockAfterFailures) {
      state.blockedUntil = now + blockMs;
      state.failures = [];
      return maxDelayMs;
    }
    return Math.min(maxDelayMs, baseDelayMs * 2 ** (failures - 1));
  }

  /**
   * Evicts one pending handshake or delayed close to make room for a new socket; false when
   * there is none to evict.
   */
  makeRoom(now = Date.now()): boolean {
    const [delayed] = this.delayedCloses;
    if (delayed) {
      this.delayedCloses.delete(delayed);
      delayed();
      return true;
    }
    const victim = this.pickVictim(now, null);
    if (!victim) return false;
    this.evictEntry(victim);
    return true;
  }

  /**
   * Holds `close` of a failed handshake of `source` for `delayMs`, unless too many closes are
   * held already (in total, or for that source: a client retrying in a loop is slowed down, a
   * flood of many at once is closed as fast as it comes).
   */
  delayClose(delayMs: number, close: () => void, source: string): void {
    const state = this.state(source);
    if (delayMs <= 0 || this.delayedCloses.size >= this.options.maxDelayed || state.held >= this.options.maxDelayedPerSource) {
      this.forgetIfIdle(source, state, Date.now());
      return close();
    }
    state.held++;
    let done = false;
    const once = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      this.delayedCloses.delete(once);
      state.held--;
      close();
    };
    const timer = setTimeout(once, delayMs);
    timer.unref();
    this.delayedCloses.add(once);
  }

  /** Drops state of sources with nothing pending and nothing remembered (called periodically). */
  sweep(now = Date.now()): void {
    for (const [source, state] of this.sources) {
      state.failures = state.failures.filter((t) => now - t < this.options.windowMs);
      this.forgetIfIdle(source, state, now);
    }
  }

  /** Stops the eviction timer (the listener is closing). */
  stop(): void {
    if (this.passTimer) clearTimeout(this.passTimer);
    this.passTimer = null;
  }

  /** Bounds what a flood from many addresses can make us remember (at the cost of its counts). */
  private forgetOldestSource(): void {
    for (const [source, state] of this.sources) {
      if (state.pending.size === 0 && state.held === 0) return void this.sources.delete(source);
    }
  }

  private forgetIfIdle(source: string, state: SourceState, now: number): void {
    if (state.pending.size === 0 && state.held === 0 && state.failures.length === 0 && state.blockedUntil <= now) this.sources.delete(source);
  }

  /** O(1): a new connection must not cost a pass over every remembered source. */
  private overSoftCaps(): boolean {
    return this.pending.size > this.options.maxPendingTotal || this.sourcesOverCap > 0;
  }

  private schedulePass(): void {
    if (this.passTimer) return;
    this.passTimer = setTimeout(() => {
      this.passTimer = null;
      this.evictionPass();
    }, this.options.graceMs);
    this.passTimer.unref();
  }

  /**
   * Brings pending handshakes back under the soft caps. Runs from a timer: every handshake begun
   * before the previous pass has had at least one poll of the event loop for its bytes since.
   */
  evictionPass(now = Date.now()): void {
    const cutoff = this.epoch++;
    const eligible = (e: Pending) => e.epoch < cutoff && now - e.startedAt >= this.options.graceMs;
    for (const state of this.sources.values()) {
      let excess = state.pending.size - this.options.maxPendingPerSource;
      for (const entry of [...state.pending]) {
        if (excess <= 0) break;
        if (!eligible(entry)) continue;
        this.evictEntry(entry);
        excess--;
      }
    }
    let excess = this.pending.size - this.options.maxPendingTotal;
    if (excess > 0) {
      // Blocked sources first, then the oldest.
      const candidates = [...this.pending].filter(eligible);
      const blocked = candidates.filter((e) => this.isBlocked(e.source, now));
      const others = candidates.filter((e) => !this.isBlocked(e.source, now));
      for (const entry of [...blocked, ...others]) {
        if (excess <= 0) break;
        this.evictEntry(entry);
        excess--;
      }
    }
    if (this.overSoftCaps()) this.schedulePass();
  }

  /**
   * Among the handshakes that had their chance: a blocked source's oldest, else the oldest. Only
   * when none has (a burst past the hard cap) one within its grace: a blocked source's, else the
   * oldest. A handshake within its grace is spared while any other can go, since a valid client
   * sends its token at once, blocked source or not (another container of the same uid may be the
   * one that got it blocked).
   */
  private pickVictim(now: number, except: Pending | null): Pending | null {
    let oldestEligible: Pending | null = null;
    let oldestBlocked: Pending | null = null;
    let oldest: Pending | null = null;
    for (const entry of this.pending) {
      if (entry === except) continue;
      oldest ??= entry;
      const blocked = this.isBlocked(entry.source, now);
      if (entry.epoch >= this.epoch || now - entry.startedAt < this.options.graceMs) {
        if (blocked) oldestBlocked ??= entry;
        continue;
      }
      if (blocked) return entry;
      oldestEligible ??= entry;
    }
    return oldestEligible ?? oldestBlocked ?? oldest;
  }

  private evictEntry(entry: Pending): void {
    if (!this.pending.has(entry)) return;
    this.evicted++;
    // The listener's evict closes the socket and calls finish (counted as a failure of its source).
    entry.evict();
    if (this.pending.has(entry)) this.finish(entry, 'failed');
  }
}
