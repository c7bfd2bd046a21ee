// The token listeners of a real `keyhold serve` under floods that used to starve valid clients
// and the owner: slow handshakes from 40 sources, a stale token retried by another container of
// the same uid, 10,000 connections on one token, revocation of a token with open connections,
// and partial frames at every cap (the memory bound).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEFAULT_TOKEN_LIMITS } from '../../src/signer/token-limits.js';
import { initVault, keyhold, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { freePort, identitiesFrame, parseIdentities, RawConn, tokenHandshake, u32, type Target } from '../helpers/raw-wire.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * What "served" means here: the first reply within this long after connecting (a correctness
 * bound, not a timing claim). It stays under the guard's longest delay (3 s), so a delayed
 * client still fails it; 1 s was within reach of one stall of a loaded CI machine.
 */
const SERVED_WITHIN_MS = 2000;

let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
let port: number;
let unixPath: string;

interface IssuedToken {
  id: string;
  token: string;
}

function issue(scope: string, subject: string): IssuedToken {
  return JSON.parse(keyholdOk(k, ['token', 'issue', scope, '--subject', subject, '--json'])) as IssuedToken;
}

function daemonLog(): string {
  return `\n--- keyhold serve stderr (tail) ---\n${serve?.stderr().slice(-2500) ?? ''}`;
}

function daemonAlive(): boolean {
  return serve.proc.exitCode === null && serve.proc.signalCode === null;
}

const tcp = (localAddress: string): Target => ({ kind: 'tcp', port, localAddress });

/**
 * A valid client: connect, handshake + request-identities in one write, the answer within
 * SERVED_WITHIN_MS. Returns how long it took, or throws saying what happened instead.
 */
async function servedOnce(target: Target, token: string): Promise<number> {
  const started = Date.now();
  const conn = await RawConn.open(target, SERVED_WITHIN_MS);
  try {
    conn.send(Buffer.concat([tokenHandshake(token), identitiesFrame()]));
    const reply = await conn.reply(Math.max(1, SERVED_WITHIN_MS - (Date.now() - started)));
    expect(reply[0], 'an identities answer').toBe(12);
    return Date.now() - started;
  } finally {
    conn.close();
  }
}

/** Runs `attempts` valid clients one after another; each failure is recorded with its reason. */
async function validAttempts(attempts: number, target: (i: number) => Target, token: string): Promise<{ served: number; failures: string[]; slowestMs: number }> {
  const out = { served: 0, failures: [] as string[], slowestMs: 0 };
  for (let i = 0; i < attempts; i++) {
    try {
      out.slowestMs = Math.max(out.slowestMs, await servedOnce(target(i), token));
      out.served++;
    } catch (err) {
      out.failures.push(`#${i}: ${(err as Error).message.split('\n')[0]}`);
    }
    await sleep(40);
  }
  return out;
}

let webToken: IssuedToken;

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-container-starve-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-cst-'));
  unixPath = join(work, 'signer.sock');
  initVault(k);
  keyholdOk(k, ['key', 'generate', 'web', '--type', 'ed25519']);
  webToken = issue('web', 'valid');
  port = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${port}`, '--listen', `unix:${unixPath}`]);
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

describe('slow handshakes cannot starve a valid client', () => {
  it('40 sources × 30 slow handshakes held (and reopened when closed): every valid attempt, from a quiet source or a flooding one, is served', async () => {
    const SOURCES = 40;
    const PER_SOURCE = 30;
    let flooding = true;
    let opened = 0;
    const held = new Set<RawConn>();
    // Two bytes of a length: the handshake can never complete.
    const slow = async (source: string) => {
      while (flooding) {
        let conn: RawConn;
        try {
          conn = await RawConn.open(tcp(source), 2000);
        } catch {
          await sleep(100);
          continue;
        }
        opened++;
        held.add(conn);
        conn.send(u32(32).subarray(0, 2));
        await conn.until(() => conn.closed || !flooding, 60_000, 'flood end').catch(() => {});
        held.delete(conn);
        conn.close();
        if (flooding) await sleep(100);
      }
    };
    const flood = Promise.all(
      Array.from({ length: SOURCES * PER_SOURCE }, (_, i) => slow(`127.0.0.${100 + (i % SOURCES)}`)),
    );
    try {
      const deadline = Date.now() + 10_000;
      while (opened < SOURCES * PER_SOURCE && Date.now() < deadline) await sleep(50);
      expect(opened, 'slow handshakes opened').toBeGreaterThanOrEqual(SOURCES * PER_SOURCE);

      // From a quiet source and from one of the flooding sources, alternately.
      const result = await validAttempts(24, (i) => tcp(i % 2 === 0 ? '127.0.0.2' : '127.0.0.100'), webToken.token);
      expect(result.failures, `valid attempts not served within ${SERVED_WITHIN_MS} ms during the flood${daemonLog()}`).toEqual([]);
      expect(result.served).toBe(24);
      console.log(`40-source slow flood: 24/24 valid attempts served, slowest ${result.slowestMs} ms`);
      // The caps were passed: the daemon evicted slow handshakes rather than refuse new ones.
      expect(serve.stderr()).toMatch(/"address":"127\.0\.0\.1[0-3][0-9]"[^\n]*"reason":"evicted while pending/);
    } finally {
      flooding = false;
      for (const conn of held) conn.close();
      await flood;
    }
    expect(daemonAlive(), daemonLog()).toBe(true);
  }, 40_000);
});

describe('the Unix listener: slow handshakes from the same uid', () => {
  it('300 slow handshakes of uid 0 held (and reopened when closed): a valid container of uid 0 is served every time', async () => {
    const unix: Target = { kind: 'unix', path: unixPath };
    let flooding = true;
    let opened = 0;
    const held = new Set<RawConn>();
    const slow = async () => {
      while (flooding) {
        const conn = await RawConn.open(unix, 2000).catch(() => null);
        if (!conn) {
          await sleep(100);
          continue;
        }
        opened++;
        held.add(conn);
        conn.send(u32(32).subarray(0, 3));
        await conn.until(() => conn.closed || !flooding, 60_000, 'flood end').catch(() => {});
        held.delete(conn);
        conn.close();
        if (flooding) await sleep(100);
      }
    };
    const flood = Promise.all(Array.from({ length: 300 }, slow));
    try {
      const deadline = Date.now() + 10_000;
      while (opened < 300 && Date.now() < deadline) await sleep(50);
      const result = await validAttempts(20, () => unix, webToken.token);
      expect(result.failures, `valid container (same uid) not served within ${SERVED_WITHIN_MS} ms${daemonLog()}`).toEqual([]);
      expect(serve.stderr()).toMatch(/"uid":0[^\n]*"reason":"evicted while pending/);
      console.log(`uid 0 slow flood: 20/20 valid attempts of uid 0 served, slowest ${result.slowestMs} ms`);
    } finally {
      flooding = false;
      for (const conn of held) conn.close();
      await flood;
    }
    expect(daemonAlive(), daemonLog()).toBe(true);
  }, 40_000);
});

describe('the Unix listener: one uid, two containers', () => {
  it('one retries a stale (revoked) token until its uid is blocked; the other, same uid, valid token, is served every time', async () => {
    const stale = issue('web', 'stale');
    keyholdOk(k, ['token', 'revoke', stale.id]);
    const unix: Target = { kind: 'unix', path: unixPath };
    let retrying = true;
    let staleAttempts = 0;
    let staleBytes = 0;
    const staleContainer = async () => {
      while (retrying) {
        const conn = await RawConn.open(unix);
        staleAttempts++;
        conn.send(Buffer.concat([tokenHandshake(stale.token), identitiesFrame()]));
        await conn.until(() => conn.closed, 10_000, 'stale close').catch(() => {});
        staleBytes += conn.received;
        conn.close();
      }
    };
    // Enough at once to pass the 20 failures that block a source, and then some.
    const stales = Array.from({ length: 25 }, staleContainer);
    try {
      await sleep(300);
      const result = await validAttempts(40, () => unix, webToken.token);
      expect(result.failures, `valid container (same uid) not served within ${SERVED_WITHIN_MS} ms${daemonLog()}`).toEqual([]);
      expect(result.served).toBe(40);
      console.log(`stale token retried by uid 0: 40/40 valid attempts of uid 0 served, slowest ${result.slowestMs} ms`);
    } finally {
      retrying = false;
      await Promise.all(stales);
    }
    expect(staleAttempts, 'stale attempts (past the 20 that block the uid)').toBeGreaterThan(20);
    expect(staleBytes, 'bytes written to the stale container').toBe(0);
    // The uid did get blocked (here, or by the slow handshakes before), so the check above could
    // fail: its failures are logged as "repeated".
    expect(serve.stderr()).toMatch(/"uid":0[^\n]*"reason":"[^"]*\(repeated/);
    expect(daemonAlive(), daemonLog()).toBe(true);
  }, 40_000);
});

/** The owner's sockets answer: `keyhold status` and an identities request on the scope socket. */
async function ownerAnswers(what: string): Promise<void> {
  const status = keyhold(k, ['status', '--json']);
  expect(status.status, `${what}: keyhold status${status.stderr}${daemonLog()}`).toBe(0);
  const scope = await RawConn.open({ kind: 'unix', path: serve.socket('web') }, 2000);
  try {
    scope.send(identitiesFrame());
    expect(parseIdentities(await scope.reply(2000)), `${what}: the scope socket`).toHaveLength(1);
  } finally {
    scope.close();
  }
}

describe('10,000 connections on one token', () => {
  it('the per-token cap refuses the rest (nothing written); the owner and another token keep being served; revoking the token closes them all at once', async () => {
    const many = issue('web', 'many');
    const other = issue('web', 'other');
    const ATTEMPTS = 10_000;
    const CONCURRENCY = 400;
    const cap = DEFAULT_TOKEN_LIMITS.maxSessionsPerToken;
    const sessions: RawConn[] = [];
    let refused = 0;
    let refusedWithBytes = 0;
    let connectErrors = 0;
    let next = 0;
    const started = Date.now();
    const worker = async (w: number) => {
      while (next < ATTEMPTS) {
        next++;
        let conn: RawConn;
        try {
          conn = await RawConn.open(tcp(`127.0.1.${1 + (w % 8)}`), 5000);
        } catch {
          connectErrors++;
          continue;
        }
        conn.send(Buffer.concat([tokenHandshake(many.token), identitiesFrame()]));
        await conn.until(() => conn.frames.length > 0 || conn.closed, 10_000, 'answer or close').catch(() => {});
        if (conn.frames.length > 0 && !conn.closed) sessions.push(conn);
        else {
          refused++;
          if (conn.received > 0) refusedWithBytes++;
          conn.close();
        }
      }
    };
    try {
      const flood = Promise.all(Array.from({ length: CONCURRENCY }, (_, w) => worker(w)));
      // The owner is answered while the flood runs...
      await sleep(1000);
      await ownerAnswers('during the flood');
      await flood;
      const elapsed = Date.now() - started;
      expect(sessions.length + refused + connectErrors).toBe(ATTEMPTS);
      expect(sessions.length, `sessions kept open on one token (flood took ${elapsed} ms)${daemonLog()}`).toBe(cap);
      expect(refusedWithBytes, 'refused connections that got bytes').toBe(0);
      // ...and after it, with the token at its cap.
      await ownerAnswers('with the token at its cap');
      expect(await servedOnce(tcp('127.0.1.1'), other.token)).toBeLessThan(SERVED_WITHIN_MS);

      // Revoking the token closes every one of its connections at once (through this daemon: before the CLI returns).
      const revokedAt = Date.now();
      keyholdOk(k, ['token', 'revoke', many.id]);
      await Promise.all(sessions.map((c) => c.until(() => c.closed, 2000, 'close after revoke').catch(() => {})));
      const closed = sessions.filter((c) => c.closed).length;
      expect(closed, `connections closed within 2 s of the revocation (${Date.now() - revokedAt} ms)${daemonLog()}`).toBe(cap);
      // The freed slots serve a new token of the same sources.
      const fresh = issue('web', 'many-again');
      for (let i = 0; i < 3; i++) expect(await servedOnce(tcp('127.0.1.2'), fresh.token)).toBeLessThan(SERVED_WITHIN_MS);
    } finally {
      for (const c of sessions) c.close();
    }
    expect(daemonAlive(), daemonLog()).toBe(true);
  }, 60_000);
});

describe('revocation and expiry end idle connections', () => {
  async function openSessions(token: string, count: number, source: string): Promise<RawConn[]> {
    const conns: RawConn[] = [];
    // In batches of 20: a burst is not what these tests are about.
    for (let opened = 0; opened < count; opened += 20) {
      const batch = await Promise.all(Array.from({ length: Math.min(20, count - opened) }, () => RawConn.open(tcp(source), 5000)));
      conns.push(...batch);
      for (const c of batch) c.send(Buffer.concat([tokenHandshake(token), identitiesFrame()]));
      await Promise.all(batch.map((c) => c.reply(5000)));
    }
    return conns;
  }

  it('60 idle sessions of a token: `keyhold token revoke` closes all 60 without another request', async () => {
    const t = issue('web', 'revoke-idle');
    const conns = await openSessions(t.token, 60, '127.0.3.1');
    try {
      const startedAt = Date.now();
      keyholdOk(k, ['token', 'revoke', t.id]);
      await Promise.all(conns.map((c) => c.until(() => c.closed, 2000, 'close after revoke').catch(() => {})));
      expect(conns.filter((c) => c.closed).length, `closed within 2 s of the revocation (${Date.now() - startedAt} ms)${daemonLog()}`).toBe(60);
    } finally {
      for (const c of conns) c.close();
    }
  });

  it('20 idle sessions: `keyhold lock` closes them all without another request; after unlock the token is served again', async () => {
    const t = issue('web', 'lock-idle');
    const conns = await openSessions(t.token, 20, '127.0.3.3');
    try {
      keyholdOk(k, ['lock']);
      await Promise.all(conns.map((c) => c.until(() => c.closed, 2000, 'close after lock').catch(() => {})));
      expect(conns.filter((c) => c.closed).length, `closed within 2 s of the lock${daemonLog()}`).toBe(20);
    } finally {
      for (const c of conns) c.close();
      keyholdOk(k, ['unlock']);
    }
    expect(await servedOnce(tcp('127.0.3.3'), t.token)).toBeLessThan(SERVED_WITHIN_MS);
  });

  it('20 idle sessions of a 5 s token: closed when it expires, without another request', async () => {
    const t = JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--subject', 'short', '--ttl', '5s', '--json'])) as IssuedToken & { expires: string };
    const conns = await openSessions(t.token, 20, '127.0.3.2');
    try {
      const expiresAt = Date.parse(t.expires);
      await Promise.all(conns.map((c) => c.until(() => c.closed, Math.max(0, expiresAt - Date.now()) + 2000, 'close after expiry').catch(() => {})));
      expect(conns.filter((c) => c.closed).length, `closed within 2 s of the expiry${daemonLog()}`).toBe(20);
      expect(Date.now(), 'closed before the expiry').toBeGreaterThanOrEqual(expiresAt);
    } finally {
      for (const c of conns) c.close();
    }
  });
});

/** Resident memory of a process, in bytes (Linux). */
function rssOf(pid: number): number {
  const match = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!match) throw new Error('no VmRSS');
  return Number(match[1]) * 1024;
}

describe('memory bound', () => {
  it('2,048 connections on 8 tokens, each holding a 256 KiB frame less one byte: the daemon grows by far less than the bytes sent', async () => {
    const TOKENS = 8;
    const PER_TOKEN = DEFAULT_TOKEN_LIMITS.maxSessionsPerToken;
    const FRAME = 256 * 1024;
    const tokens = Array.from({ length: TOKENS }, (_, i) => issue('web', `mem-${i}`));
    // Warm up the daemon (a few sessions) before the baseline.
    for (let i = 0; i < 5; i++) await servedOnce(tcp('127.0.2.1'), webToken.token);
    const before = rssOf(serve.proc.pid!);
    const conns: RawConn[] = [];
    const partial = Buffer.concat([u32(FRAME), Buffer.of(13), Buffer.alloc(FRAME - 2, 0x41)]);
    try {
      let next = 0;
      const worker = async () => {
        while (next < TOKENS * PER_TOKEN) {
          const i = next++;
          const conn = await RawConn.open(tcp(`127.0.2.${1 + (i % 16)}`), 5000);
          conns.push(conn);
          conn.send(Buffer.concat([tokenHandshake(tokens[i % TOKENS]!.token), partial]));
          await new Promise<void>((resolve) => {
            if (conn.socket.writableLength === 0 || conn.closed) return resolve();
            conn.socket.once('drain', resolve);
            conn.socket.once('close', resolve);
          });
        }
      };
      await Promise.all(Array.from({ length: 64 }, worker));
      await sleep(1500);
      const grown = rssOf(serve.proc.pid!) - before;
      const sent = conns.length * partial.length;
      const stillOpen = conns.filter((c) => !c.closed).length;
      console.log(`memory bound: ${conns.length} connections sent ${(sent / 2 ** 20).toFixed(0)} MiB of partial frames; ${stillOpen} still open; daemon RSS grew ${(grown / 2 ** 20).toFixed(0)} MiB (from ${(before / 2 ** 20).toFixed(0)} MiB)`);
      expect(daemonAlive(), daemonLog()).toBe(true);
      // The budget for partial frames is 64 MiB in total; the rest is per-socket overhead.
      expect(grown, `daemon RSS growth (bytes) with ${(sent / 2 ** 20).toFixed(0)} MiB of partial frames sent`).toBeLessThan(192 * 2 ** 20);
      await ownerAnswers('with every partial frame held');
    } finally {
      for (const c of conns) c.close();
    }
  }, 60_000);

  it('256 sessions on one token ask for ~13 MB of identities each and read nothing: closed, the daemon grows little', async () => {
    for (let i = 0; i < 4; i++) keyholdOk(k, ['key', 'generate', 'wide', '--comment', `${i}-${'c'.repeat(1000)}`]);
    const token = issue('wide', 'unread');
    for (let i = 0; i < 5; i++) await servedOnce(tcp('127.0.3.1'), token.token);
    const before = rssOf(serve.proc.pid!);
    const requests = Buffer.concat(Array.from({ length: (64 * 1024) / 5 }, () => identitiesFrame()));
    const conns: RawConn[] = [];
    try {
      for (let i = 0; i < DEFAULT_TOKEN_LIMITS.maxSessionsPerToken; i++) {
        const conn = await RawConn.open(tcp(`127.0.3.${1 + (i % 16)}`), 5000);
        conn.socket.pause();
        conn.send(Buffer.concat([tokenHandshake(token.token), requests]));
        conns.push(conn);
      }
      // The largest RSS seen until they are all closed: the queued replies count while they live.
      let largest = rssOf(serve.proc.pid!);
      await waitFor(() => {
        largest = Math.max(largest, rssOf(serve.proc.pid!));
        return conns.every((c) => c.closed);
      }, 10_000, 'the daemon to close the sessions that do not read').catch(() => {});
      const grown = largest - before;
      const closed = conns.filter((c) => c.closed).length;
      console.log(`unread replies: ${conns.length} sessions asked for ${((conns.length * requests.length) / 5 / 2 ** 10).toFixed(0)} Ki identities answers; ${closed} closed by the daemon; RSS grew ${(grown / 2 ** 20).toFixed(0)} MiB`);
      expect(daemonAlive(), daemonLog()).toBe(true);
      expect(closed, 'sessions that do not read their replies are closed').toBe(conns.length);
      expect(grown, 'daemon RSS growth (bytes)').toBeLessThan(192 * 2 ** 20);
      await ownerAnswers('after the unread-replies flood');
    } finally {
      for (const c of conns) c.close();
    }
  }, 60_000);
});
