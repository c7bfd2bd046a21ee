// A flood of bad handshakes against the token listeners of a real `keyhold serve`: nobody gets a
// byte back, the daemon stays up, and a valid client elsewhere is served during and after.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { frame } from '../../src/agent-protocol/framing.js';
import { encodeRequest, parseResponse, type Identity } from '../../src/agent-protocol/messages.js';
import { initVault, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { freePort, RawConn, tokenHandshake, u32, type Target } from '../helpers/raw-wire.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const REQUEST_IDENTITIES = frame(encodeRequest({ type: 'request-identities' }));

function identitiesOf(payload: Buffer): Identity[] {
  const response = parseResponse(payload);
  if (response.type !== 'identities') throw new Error(`expected an identities answer, got ${response.type}`);
  return response.identities;
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
let port: number;
let unixPath: string;
let token: string;
let keyCount: number;

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-container-flood-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-cf-'));
  unixPath = join(work, 'signer.sock');
  initVault(k);
  keyholdOk(k, ['key', 'generate', 'web', '--type', 'ed25519']);
  keyholdOk(k, ['key', 'generate', 'web', '--type', 'ecdsa']);
  keyCount = 2;
  token = keyholdOk(k, ['token', 'issue', 'web', '--subject', 'flood']).trim();
  port = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${port}`, '--listen', `unix:${unixPath}`]);
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

function daemonLog(): string {
  return `\n--- keyhold serve stderr (tail) ---\n${serve?.stderr().slice(-2000) ?? ''}`;
}

function daemonAlive(): boolean {
  return serve.proc.exitCode === null && serve.proc.signalCode === null;
}

/** Bad handshakes of several kinds, each followed by a request that must not be answered. */
function badPayload(i: number): Buffer {
  switch (i % 5) {
    case 0:
      return Buffer.concat([tokenHandshake('khp_' + randomBytes(32).toString('base64url')), REQUEST_IDENTITIES]);
    case 1:
      return Buffer.concat([u32(0), REQUEST_IDENTITIES]);
    case 2:
      return Buffer.concat([u32(1025), Buffer.alloc(1025, 0x61), REQUEST_IDENTITIES]);
    case 3:
      return REQUEST_IDENTITIES;
    default:
      return Buffer.concat([tokenHandshake(token.slice(0, -1) + (token.endsWith('A') ? 'B' : 'A')), REQUEST_IDENTITIES]);
  }
}

interface FloodResult {
  connections: number;
  /** Connections refused before connect completed (e.g. reset at once). */
  connectErrors: number;
  bytesReceived: number;
  withBytes: number;
  notClosed: number;
}

/** Past this no new bad connection is started, so a daemon that holds every one keeps the run bounded. */
const FLOOD_DEADLINE_MS = 20_000;

/** `total` bad handshakes, at most `concurrency` at a time. */
async function flood(target: Target, total: number, concurrency: number): Promise<FloodResult> {
  const result: FloodResult = { connections: 0, connectErrors: 0, bytesReceived: 0, withBytes: 0, notClosed: 0 };
  const deadline = Date.now() + FLOOD_DEADLINE_MS;
  let next = 0;
  const worker = async () => {
    while (next < total && Date.now() < deadline) {
      const i = next++;
      let conn: RawConn;
      try {
        conn = await RawConn.open(target);
      } catch {
        result.connectErrors++;
        continue;
      }
      result.connections++;
      conn.send(badPayload(i));
      const closed = await conn.closedWithin(10_000);
      if (!closed) result.notClosed++;
      result.bytesReceived += conn.received;
      if (conn.received > 0) result.withBytes++;
      conn.close();
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return result;
}

/** A valid client from 127.0.0.1, over and over while `running()`; every one must be served. */
async function validLoop(running: () => boolean): Promise<{ served: number; servedDuringFlood: number; errors: string[] }> {
  const out = { served: 0, servedDuringFlood: 0, errors: [] as string[] };
  while (running()) {
    try {
      const conn = await RawConn.open({ kind: 'tcp', port });
      try {
        conn.send(Buffer.concat([tokenHandshake(token), REQUEST_IDENTITIES]));
        const ids = identitiesOf(await conn.reply(3000));
        if (ids.length !== keyCount) out.errors.push(`${ids.length} identities instead of ${keyCount}`);
        out.served++;
        if (running()) out.servedDuringFlood++;
      } finally {
        conn.close();
      }
    } catch (err) {
      out.errors.push((err as Error).message);
    }
    await sleep(50);
  }
  return out;
}

async function validTcpClient(localAddress?: string): Promise<RawConn> {
  const conn = await RawConn.open({ kind: 'tcp', port, ...(localAddress ? { localAddress } : {}) });
  conn.send(Buffer.concat([tokenHandshake(token), REQUEST_IDENTITIES]));
  return conn;
}

describe('a flood of bad handshakes', () => {
  it('1,000 from 127.0.0.2 over TCP (50 at a time): no byte back, daemon alive, 127.0.0.1 served during and after, and 127.0.0.2 too with a valid token', async () => {
    let flooding = true;
    const started = Date.now();
    const floodRun = flood({ kind: 'tcp', port, localAddress: '127.0.0.2' }, 1000, 50).finally(() => (flooding = false));
    const valid = validLoop(() => flooding);
    const [f, v] = await Promise.all([floodRun, valid]);
    const elapsed = Date.now() - started;

    expect(f.connections + f.connectErrors, `bad handshakes done within ${FLOOD_DEADLINE_MS} ms`).toBe(1000);
    expect(f.withBytes, `connections that got bytes back (${f.bytesReceived} bytes)${daemonLog()}`).toBe(0);
    expect(f.bytesReceived).toBe(0);
    expect(f.notClosed, `bad handshakes left open after 10 s${daemonLog()}`).toBe(0);
    expect(daemonAlive(), daemonLog()).toBe(true);
    expect(v.errors, `valid client failures during the flood${daemonLog()}`).toEqual([]);
    expect(v.servedDuringFlood, `valid clients served during a ${elapsed} ms flood`).toBeGreaterThanOrEqual(1);

    // After the flood: 127.0.0.1 is served at once…
    const after = await validTcpClient();
    try {
      expect(identitiesOf(await after.reply(3000))).toHaveLength(keyCount);
    } finally {
      after.close();
    }
    // The flooding source is blocked: a further bad token from it is closed with nothing written
    // and logged as a repeated failure…
    const bad = await RawConn.open({ kind: 'tcp', port, localAddress: '127.0.0.2' });
    bad.send(badPayload(0));
    expect(await bad.closedWithin(5000), 'a bad token from the blocked source was kept open').toBe(true);
    expect(bad.received, 'bytes written to the blocked source').toBe(0);
    expect(serve.stderr()).toMatch(/"address":"127\.0\.0\.2"[^\n]*\(repeated/);
    // …yet a valid token from that source is served: a source is never refused a valid token.
    const blocked = await validTcpClient('127.0.0.2');
    try {
      expect(identitiesOf(await blocked.reply(3000))).toHaveLength(keyCount);
    } finally {
      blocked.close();
    }
    expect(daemonAlive(), daemonLog()).toBe(true);
  });

  it('1,000 over the Unix listener (50 at a time): no byte back, daemon alive, a valid TCP client served during and after', async () => {
    let flooding = true;
    const floodRun = flood({ kind: 'unix', path: unixPath }, 1000, 50).finally(() => (flooding = false));
    const valid = validLoop(() => flooding);
    const [f, v] = await Promise.all([floodRun, valid]);

    expect(f.connections + f.connectErrors, `bad handshakes done within ${FLOOD_DEADLINE_MS} ms`).toBe(1000);
    expect(f.withBytes, `connections that got bytes back (${f.bytesReceived} bytes)${daemonLog()}`).toBe(0);
    expect(f.notClosed, `bad handshakes left open after 10 s${daemonLog()}`).toBe(0);
    expect(daemonAlive(), daemonLog()).toBe(true);
    expect(v.errors, `valid TCP client failures during the Unix flood${daemonLog()}`).toEqual([]);
    expect(v.served).toBeGreaterThanOrEqual(1);

    const after = await validTcpClient();
    try {
      expect(identitiesOf(await after.reply(3000))).toHaveLength(keyCount);
      // Still a working session: a second request on it is answered.
      after.send(REQUEST_IDENTITIES);
      expect(identitiesOf(await after.reply(3000))).toHaveLength(keyCount);
    } finally {
      after.close();
    }
    expect(daemonAlive(), daemonLog()).toBe(true);
  });

  it('the daemon log holds no token', () => {
    expect(serve.stderr().includes(token)).toBe(false);
    expect(serve.stderr()).toContain('token handshake failed');
  });
});
