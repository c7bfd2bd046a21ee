// In-process tests of the handshake guard and the token-listener limits: the rules that keep a
// valid client served under floods, with a clock passed in rather than waited on.
import { afterEach, describe, expect, it } from 'vitest';
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { DEFAULT_GUARD, HandshakeGuard, type HandshakeGuardOptions, type Pending } from '../../src/signer/handshake-guard.js';
import { ByteBudget, ConnectionMemory, TokenConnections, tokenLimitsFor, DEFAULT_TOKEN_LIMITS } from '../../src/signer/token-limits.js';
import { tcpSource } from '../../src/signer/token-listener.js';

const guards: HandshakeGuard[] = [];
afterEach(() => {
  for (const g of guards.splice(0)) g.stop();
});

function guard(overrides: Partial<HandshakeGuardOptions> = {}): HandshakeGuard {
  const g = new HandshakeGuard({ ...DEFAULT_GUARD, ...overrides });
  guards.push(g);
  return g;
}

/** A pending handshake whose eviction is recorded (and reported finished, as the listener does). */
function open(g: HandshakeGuard, source: string, now: number, evicted: string[], name = source): Pending {
  const entry: Pending = g.begin(
    source,
    () => {
      evicted.push(name);
      g.finish(entry, 'failed', now);
    },
    now,
  );
  return entry;
}

describe('HandshakeGuard: failures', () => {
  it('delays the n-th failure of a source by base × 2^(n-1), capped (as documented)', () => {
    const g = guard({ baseDelayMs: 50, maxDelayMs: 3000, blockAfterFailures: 100 });
    const delays: number[] = [];
    for (let i = 0; i < 9; i++) delays.push(g.finish(g.begin('tcp:a', () => {}, 1000), 'failed', 1000));
    expect(delays).toEqual([50, 100, 200, 400, 800, 1600, 3000, 3000, 3000]);
  });

  it('a success or a locked vault does not count; another source has its own count', () => {
    const g = guard({ baseDelayMs: 10, blockAfterFailures: 100 });
    expect(g.finish(g.begin('tcp:a', () => {}, 0), 'failed', 0)).toBe(10);
    expect(g.finish(g.begin('tcp:a', () => {}, 0), 'ok', 0)).toBe(0);
    expect(g.finish(g.begin('tcp:a', () => {}, 0), 'neutral', 0)).toBe(0);
    expect(g.finish(g.begin('tcp:b', () => {}, 0), 'failed', 0)).toBe(10);
    expect(g.finish(g.begin('tcp:a', () => {}, 0), 'failed', 0)).toBe(20);
  });

  it('blocks a source after `blockAfterFailures` in the window; a blocked source has its failures held the longest delay and a short timeout; then it is forgiven', () => {
    const g = guard({ blockAfterFailures: 5, windowMs: 1000, blockMs: 10_000, blockedTimeoutMs: 700, baseDelayMs: 1, maxDelayMs: 3000 });
    for (let i = 0; i < 4; i++) g.finish(g.begin('uid:1', () => {}, 100), 'failed', 100);
    expect(g.isBlocked('uid:1', 100)).toBe(false);
    expect(g.timeoutFor('uid:1', 5000, 100)).toBe(5000);
    expect(g.finish(g.begin('uid:1', () => {}, 100), 'failed', 100)).toBe(3000);
    expect(g.isBlocked('uid:1', 101)).toBe(true);
    expect(g.timeoutFor('uid:1', 5000, 101)).toBe(700);
    expect(g.finish(g.begin('uid:1', () => {}, 200), 'failed', 200)).toBe(3000);
    expect(g.isBlocked('uid:2', 200)).toBe(false);
    expect(g.isBlocked('uid:1', 10_101)).toBe(false);
  });

  it('failures outside the window are forgotten', () => {
    const g = guard({ blockAfterFailures: 3, windowMs: 1000 });
    g.finish(g.begin('s', () => {}, 0), 'failed', 0);
    g.finish(g.begin('s', () => {}, 0), 'failed', 0);
    g.finish(g.begin('s', () => {}, 2000), 'failed', 2000);
    expect(g.isBlocked('s', 2000)).toBe(false);
  });

  it('finish is idempotent (an evicted handshake that later closes is counted once)', () => {
    const g = guard({ baseDelayMs: 10, blockAfterFailures: 100 });
    const p = g.begin('s', () => {}, 0);
    expect(g.finish(p, 'failed', 0)).toBe(10);
    expect(g.finish(p, 'failed', 0)).toBe(0);
    expect(g.pendingCount).toBe(0);
    expect(g.finish(g.begin('s', () => {}, 0), 'failed', 0)).toBe(20);
  });
});

describe('HandshakeGuard: pending handshakes are never refused; the oldest are evicted', () => {
  it('begin never refuses, even past every cap and from a blocked source', () => {
    const g = guard({ maxPendingPerSource: 2, maxPendingTotal: 3, hardPendingTotal: 5, blockAfterFailures: 1 });
    g.finish(g.begin('bad', () => {}, 0), 'failed', 0);
    expect(g.isBlocked('bad', 0)).toBe(true);
    const evicted: string[] = [];
    for (let i = 0; i < 10; i++) open(g, i % 2 ? 'bad' : 'other', 0, evicted, `#${i}`);
    expect(g.pendingCount).toBe(5);
    // The hard cap evicted the blocked source's handshakes first.
    expect(evicted.slice(0, 4)).toEqual(['#1', '#3', '#5', '#7']);
  });

  it('at the hard cap, a new handshake of a blocked source (a valid container of the uid another one got blocked) is spared while older ones can go', () => {
    const g = guard({ maxPendingPerSource: 100, maxPendingTotal: 100, hardPendingTotal: 3, blockAfterFailures: 1, graceMs: 100 });
    g.finish(g.begin('uid:0', () => {}, 0), 'failed', 0);
    expect(g.isBlocked('uid:0', 1000)).toBe(true);
    const evicted: string[] = [];
    open(g, 'slow-a', 0, evicted, 'slow-a');
    open(g, 'slow-b', 0, evicted, 'slow-b');
    g.evictionPass(1); // a poll of the event loop happened: the slow ones had their chance
    open(g, 'uid:0', 1000, evicted, 'valid-of-uid-0');
    open(g, 'other', 1000, evicted, 'newest');
    expect(evicted).toEqual(['slow-a']);
  });

  it('an eviction pass spares handshakes that have not had their grace time and a poll since they began', () => {
    const g = guard({ maxPendingPerSource: 1000, maxPendingTotal: 4, hardPendingTotal: 100, graceMs: 100 });
    const evicted: string[] = [];
    for (let i = 0; i < 4; i++) open(g, `tcp:slow${i}`, 0, evicted);
    // A pass sees everything as just begun: nothing is evicted, only the epoch moves.
    g.evictionPass(200);
    expect(evicted).toEqual([]);
    // A valid client arrives (over the cap)...
    const valid = open(g, 'tcp:valid', 250, evicted);
    // ...and a pass runs before its token was read: the oldest slow one goes, not the newcomer.
    g.evictionPass(260);
    expect(evicted).toEqual(['tcp:slow0']);
    expect(g.finish(valid, 'ok', 261)).toBe(0);
  });

  it('per-source soft cap: a flooding source loses its own oldest, other sources keep theirs', () => {
    const g = guard({ maxPendingPerSource: 3, maxPendingTotal: 1000, hardPendingTotal: 1000, graceMs: 10 });
    const evicted: string[] = [];
    open(g, 'tcp:quiet', 0, evicted, 'quiet');
    for (let i = 0; i < 6; i++) open(g, 'tcp:flood', 0, evicted, `flood${i}`);
    g.evictionPass(50);
    g.evictionPass(60);
    expect(evicted).toEqual(['flood0', 'flood1', 'flood2']);
    expect(g.pendingCount).toBe(4);
  });

  it('under the total cap, blocked sources are evicted before others', () => {
    const g = guard({ maxPendingPerSource: 100, maxPendingTotal: 3, hardPendingTotal: 100, graceMs: 10, blockAfterFailures: 1 });
    g.finish(g.begin('tcp:bad', () => {}, 0), 'failed', 0);
    const evicted: string[] = [];
    open(g, 'tcp:good', 0, evicted, 'good-old');
    open(g, 'tcp:bad', 1, evicted, 'bad1');
    open(g, 'tcp:bad', 2, evicted, 'bad2');
    open(g, 'tcp:good', 3, evicted, 'good-new');
    open(g, 'tcp:other', 4, evicted, 'other');
    g.evictionPass(50);
    g.evictionPass(60);
    expect(evicted).toEqual(['bad1', 'bad2']);
  });

  it('makeRoom closes a held (delayed) failure first, then a pending handshake; false when there is none', () => {
    const g = guard({ graceMs: 10 });
    expect(g.makeRoom(0)).toBe(false);
    let heldClosed = false;
    g.delayClose(10_000, () => (heldClosed = true), 's');
    expect(g.delayedCount).toBe(1);
    const evicted: string[] = [];
    open(g, 's', 0, evicted);
    expect(g.makeRoom(100)).toBe(true);
    expect(heldClosed).toBe(true);
    expect(evicted).toEqual([]);
    expect(g.makeRoom(100)).toBe(true);
    expect(evicted).toEqual(['s']);
  });

  it('the eviction timer brings a real flood back under the soft cap', async () => {
    const g = guard({ maxPendingPerSource: 1000, maxPendingTotal: 10, hardPendingTotal: 1000, graceMs: 20 });
    const evicted: string[] = [];
    for (let i = 0; i < 30; i++) open(g, `s${i % 3}`, Date.now(), evicted, `#${i}`);
    // Two eviction passes at least (the first evicts nothing: the epoch rule); a loaded machine may be late.
    for (let waited = 0; g.pendingCount > 10 && waited < 5_000; waited += 20) await new Promise((r) => setTimeout(r, 20));
    expect(g.pendingCount).toBe(10);
    expect(evicted).toHaveLength(20);
    expect(evicted[0]).toBe('#0');
  });
});

/** Enough of a socket for the limits: a close event and destroy(). */
class FakeSocket extends EventEmitter {
  destroyed = false;
  destroy(): this {
    if (!this.destroyed) {
      this.destroyed = true;
      queueMicrotask(() => this.emit('close'));
    }
    return this;
  }
}
const fake = () => new FakeSocket() as unknown as Socket & FakeSocket;

describe('token limits', () => {
  it('caps sessions per token and per source, and in total; a closed session frees its slot', async () => {
    const c = new TokenConnections({ ...DEFAULT_TOKEN_LIMITS, maxSessions: 5, maxSessionsPerToken: 2, maxSessionsPerSource: 3 });
    const a1 = fake();
    expect(c.openSession(a1, 'A', 'tcp:1').ok).toBe(true);
    expect(c.openSession(fake(), 'A', 'tcp:2').ok).toBe(true);
    expect(c.openSession(fake(), 'A', 'tcp:3')).toEqual({ ok: false, reason: 'too many sessions for this token' });
    expect(c.openSession(fake(), 'B', 'tcp:1').ok).toBe(true);
    expect(c.openSession(fake(), 'C', 'tcp:1').ok).toBe(true);
    expect(c.openSession(fake(), 'D', 'tcp:1')).toEqual({ ok: false, reason: 'too many sessions from this source' });
    expect(c.openSession(fake(), 'D', 'tcp:9').ok).toBe(true);
    expect(c.openSession(fake(), 'E', 'tcp:8')).toEqual({ ok: false, reason: 'too many sessions' });
    a1.destroy();
    await new Promise((r) => setImmediate(r));
    expect(c.sessions('A')).toBe(1);
    expect(c.openSession(fake(), 'A', 'tcp:4').ok).toBe(true);
  });

  it('closeUnusable closes every session of a revoked token at once and frees its slots and memory before any close event', () => {
    const c = new TokenConnections({ ...DEFAULT_TOKEN_LIMITS, maxSessionsPerToken: 3, memoryPerToken: 1000 });
    const revoked = [fake(), fake(), fake()];
    const kept = fake();
    const memories = revoked.map((s) => {
      const admission = c.openSession(s, 'gone', 'uid:0');
      if (!admission.ok) throw new Error(admission.reason);
      expect(admission.memory.reserve(300)).toBe(true);
      return admission.memory;
    });
    expect(c.openSession(kept, 'live', 'uid:0').ok).toBe(true);
    expect(c.memory.used).toBe(900);
    expect(c.closeUnusable((id) => id === 'live')).toBe(3);
    expect(revoked.every((s) => s.destroyed)).toBe(true);
    expect(kept.destroyed).toBe(false);
    expect(c.sessions('gone')).toBe(0);
    expect(c.sessions()).toBe(1);
    expect(c.memory.used).toBe(0);
    // A late release by the connection (after its close) frees nothing twice.
    memories[0]!.release(300);
    expect(c.memory.used).toBe(0);
  });

  it('socket slots: tryAccept stops at maxSockets; a slot taken in place of an evicted socket is counted', async () => {
    const c = new TokenConnections({ ...DEFAULT_TOKEN_LIMITS, maxSockets: 2 });
    const first = fake();
    expect(c.tryAccept(first)).toBe(true);
    expect(c.tryAccept(fake())).toBe(true);
    expect(c.tryAccept(fake())).toBe(false);
    first.destroy();
    c.acceptInPlaceOfEvicted(fake());
    expect(c.sockets).toBe(3);
    await new Promise((r) => setImmediate(r));
    expect(c.sockets).toBe(2);
  });

  it('scales down under a low open-file limit, keeping room for the owner', () => {
    expect(tokenLimitsFor(null)).toEqual(DEFAULT_TOKEN_LIMITS);
    expect(tokenLimitsFor(1_048_576)).toEqual(DEFAULT_TOKEN_LIMITS);
    const low = tokenLimitsFor(1024);
    expect(low.maxSockets).toBe(341);
    expect(low.maxSessions).toBeLessThan(low.maxSockets);
    expect(low.maxSessionsPerToken).toBeLessThanOrEqual(low.maxSessions);
  });
});

describe('memory budgets', () => {
  it('ByteBudget refuses past its limit and never goes below zero', () => {
    const b = new ByteBudget(100);
    expect(b.reserve(60)).toBe(true);
    expect(b.reserve(41)).toBe(false);
    expect(b.reserve(40)).toBe(true);
    b.release(1000);
    expect(b.used).toBe(0);
  });

  it('ConnectionMemory reserves from every budget or none; releases only what it holds', () => {
    const token = new ByteBudget(100);
    const source = new ByteBudget(1000);
    const total = new ByteBudget(150);
    const a = new ConnectionMemory([token, source, total]);
    const b = new ConnectionMemory([new ByteBudget(1000), source, total]);
    expect(a.reserve(80)).toBe(true);
    expect(a.reserve(30)).toBe(false); // token budget
    expect([token.used, source.used, total.used]).toEqual([80, 80, 80]);
    expect(b.reserve(80)).toBe(false); // total budget
    expect([source.used, total.used]).toEqual([80, 80]);
    expect(b.reserve(70)).toBe(true);
    a.release(500);
    expect([token.used, source.used, total.used]).toEqual([0, 70, 70]);
    b.releaseAll();
    expect([source.used, total.used]).toEqual([0, 0]);
    expect(a.reserve(-1)).toBe(false);
    expect(a.reserve(Number.NaN)).toBe(false);
  });
});

describe('HandshakeGuard: held closes', () => {
  it('holds at most maxDelayedPerSource failed sockets of a source and maxDelayed in all; the rest close at once', () => {
    const g = guard({ maxDelayed: 5, maxDelayedPerSource: 3 });
    const closed: string[] = [];
    for (let i = 0; i < 4; i++) g.delayClose(10_000, () => closed.push(`a${i}`), 'a');
    expect(closed).toEqual(['a3']);
    for (let i = 0; i < 3; i++) g.delayClose(10_000, () => closed.push(`b${i}`), 'b');
    expect(closed).toEqual(['a3', 'b2']);
    expect(g.delayedCount).toBe(5);
    // A freed slot (here by makeRoom) can be used again by that source.
    expect(g.makeRoom(0)).toBe(true);
    expect(closed).toEqual(['a3', 'b2', 'a0']);
    g.delayClose(10_000, () => closed.push('a4'), 'a');
    expect(g.delayedCount).toBe(5);
    g.delayClose(0, () => closed.push('now'), 'c');
    expect(closed).toEqual(['a3', 'b2', 'a0', 'now']);
    while (g.makeRoom(0));
    expect(g.delayedCount).toBe(0);
  });
});

describe('HandshakeGuard: what it remembers is bounded', () => {
  it('past maxSources the oldest source with nothing pending is forgotten (a pending one is kept)', () => {
    const g = guard({ maxSources: 3, baseDelayMs: 10, blockAfterFailures: 100 });
    const held = g.begin('s0', () => {}, 0);
    g.finish(g.begin('s1', () => {}, 0), 'failed', 0);
    g.finish(g.begin('s2', () => {}, 0), 'failed', 0);
    g.finish(g.begin('s3', () => {}, 0), 'failed', 0);
    // s1 was forgotten: its next failure is a first one again; s2 still remembers its first.
    expect(g.finish(g.begin('s2', () => {}, 0), 'failed', 0)).toBe(20);
    expect(g.finish(g.begin('s1', () => {}, 0), 'failed', 0)).toBe(10);
    expect(g.pendingCount).toBe(1);
    g.finish(held, 'ok', 0);
  });
});

describe('tcpSource: what a TCP peer is counted as', () => {
  it('an IPv4 address as itself, an IPv4-mapped IPv6 address as its IPv4 address, IPv6 by its /64', () => {
    expect(tcpSource('127.0.0.7')).toBe('tcp:127.0.0.7');
    expect(tcpSource('::ffff:127.0.0.7')).toBe('tcp:127.0.0.7');
    expect(tcpSource('::FFFF:10.1.2.3')).toBe('tcp:10.1.2.3');
    // One host holds a whole /64: every address in it is one source.
    expect(tcpSource('2001:db8:0:1::1')).toBe(tcpSource('2001:db8:0:1:ffff:ffff:ffff:ffff'));
    expect(tcpSource('2001:db8:0:1:0:0:0:1')).toBe(tcpSource('2001:DB8:0:1::abcd'));
    expect(tcpSource('2001:db8:0:1::1')).not.toBe(tcpSource('2001:db8:0:2::1'));
    expect(tcpSource('fe80::1%eth0')).toBe(tcpSource('fe80::2'));
    expect(tcpSource('::1')).toBe('tcp:0:0:0:0::/64');
  });
});
