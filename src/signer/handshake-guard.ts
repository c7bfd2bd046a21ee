// Abuse limits for token listeners: failed handshakes are counted per source (TCP address, Unix
// uid); each failure is answered later than the one before, and a source that keeps failing is
// refused outright for a while. Pending handshakes are capped per source and in total, so a flood
// from one source cannot use up what other sources need.

export interface HandshakeGuardOptions {
  maxPendingPerSource: number;
  maxPendingTotal: number;
  /** Failures within `windowMs` that get a source refused for `blockMs`. */
  blockAfterFailures: number;
  windowMs: number;
  blockMs: number;
  /** Delay before closing a failed handshake: base × 2^(failures-1), capped. */
  baseDelayMs: number;
  maxDelayMs: number;
  /** Sockets held open while their close is delayed; past this they close at once. */
  maxDelayed: number;
}

export const DEFAULT_GUARD: HandshakeGuardOptions = {
  maxPendingPerSource: 32,
  maxPendingTotal: 1024,
  blockAfterFailures: 20,
  windowMs: 60_000,
  blockMs: 5 * 60_000,
  baseDelayMs: 50,
  maxDelayMs: 3_000,
  maxDelayed: 256,
};

interface SourceState {
  pending: number;
  failures: number[];
  blockedUntil: number;
}

export class HandshakeGuard {
  private readonly sources = new Map<string, SourceState>();
  private pendingTotal = 0;
  private delayed = 0;

  constructor(private readonly options: HandshakeGuardOptions = DEFAULT_GUARD) {}

  private state(source: string): SourceState {
    let state = this.sources.get(source);
    if (!state) this.sources.set(source, (state = { pending: 0, failures: [], blockedUntil: 0 }));
    return state;
  }

  /** Whether a new connection from `source` may start a handshake; if so, call `finish` later. */
  begin(source: string, now = Date.now()): 'ok' | 'blocked' | 'busy' {
    const state = this.state(source);
    if (state.blockedUntil > now) return 'blocked';
    if (state.pending >= this.options.maxPendingPerSource || this.pendingTotal >= this.options.maxPendingTotal) return 'busy';
    state.pending++;
    this.pendingTotal++;
    return 'ok';
  }

  /** Ends a handshake begun with `begin`; returns how long to hold a failed one before closing. */
  finish(source: string, ok: boolean, now = Date.now()): number {
    const state = this.state(source);
    state.pending--;
    this.pendingTotal--;
    const { windowMs, blockAfterFailures, blockMs, baseDelayMs, maxDelayMs } = this.options;
    state.failures = state.failures.filter((t) => now - t < windowMs);
    if (ok) {
      this.forgetIfIdle(source, state, now);
      return 0;
    }
    state.failures.push(now);
    if (state.failures.length >= blockAfterFailures) {
      state.blockedUntil = now + blockMs;
      state.failures = [];
    }
    return Math.min(maxDelayMs, baseDelayMs * 2 ** Math.min(20, state.failures.length));
  }

  /** Holds `close` for `delayMs` unless too many closes are already held. */
  delayClose(delayMs: number, close: () => void): void {
    if (delayMs <= 0 || this.delayed >= this.options.maxDelayed) return close();
    this.delayed++;
    setTimeout(() => {
      this.delayed--;
      close();
    }, delayMs).unref();
  }

  private forgetIfIdle(source: string, state: SourceState, now: number): void {
    if (state.pending === 0 && state.failures.length === 0 && state.blockedUntil <= now) this.sources.delete(source);
  }

  /** Drops state of sources with nothing pending and nothing remembered (called periodically). */
  sweep(now = Date.now()): void {
    for (const [source, state] of this.sources) {
      state.failures = state.failures.filter((t) => now - t < this.options.windowMs);
      this.forgetIfIdle(source, state, now);
    }
  }
}
