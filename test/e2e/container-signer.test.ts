// The token-gated container signer of a real `keyhold serve --listen tcp:… --listen unix:…`, driven
// by a raw client: the handshake (uint32 n + token), then agent frames on the same stream.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { frame } from '../../src/agent-protocol/framing.js';
import { encodeRequest, parseResponse, type Identity } from '../../src/agent-protocol/messages.js';
import { fingerprint } from '../../src/agent-protocol/public-key.js';
import { verifySsh } from '../../src/agent-protocol/signature.js';
import { initVault, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { freePort, RawConn, tokenHandshake, u32, type Target } from '../helpers/raw-wire.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const REQUEST_IDENTITIES = frame(encodeRequest({ type: 'request-identities' }));

function signRequest(keyBlob: Buffer, data: Buffer, flags = 0): Buffer {
  return frame(encodeRequest({ type: 'sign', keyBlob, data, flags }));
}

function identitiesOf(payload: Buffer): Identity[] {
  const response = parseResponse(payload);
  if (response.type !== 'identities') throw new Error(`expected an identities answer, got ${response.type}`);
  return response.identities;
}

function signatureOf(payload: Buffer): Buffer {
  const response = parseResponse(payload);
  if (response.type !== 'signature') throw new Error(`expected a signature, got ${response.type}`);
  return response.signature;
}

// Bad handshakes over TCP each come from their own loopback address, so the per-source slow-down
// of one case does not delay the next (and 127.0.0.1, used by the good clients, is never blamed).
let nextSource = 10;
const freshSource = () => `127.0.0.${nextSource++}`;

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

interface KeyInfo {
  fingerprint: string;
  type: string;
}

let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
let port: number;
let unixPath: string;
let webKeys: KeyInfo[];
let otherKey: KeyInfo;
let otherBlob: Buffer;
const tokens: Record<string, { id: string; token: string; expires: string | null }> = {};
const allTokens: string[] = [];

function issue(name: string, scope: string, extra: string[] = []): void {
  const t = JSON.parse(keyholdOk(k, ['token', 'issue', scope, '--json', ...extra])) as { id: string; token: string; expires: string | null };
  tokens[name] = t;
  allTokens.push(t.token);
}

function generate(scope: string, type: string, bits?: string): KeyInfo {
  const args = ['key', 'generate', scope, '--type', type, '--json', '--comment', `container-${scope}-${type}`];
  if (bits) args.push('--bits', bits);
  const out = JSON.parse(keyholdOk(k, args)) as { fingerprint: string; type: string };
  return { fingerprint: out.fingerprint, type: out.type };
}

const tcp = (localAddress?: string): Target => ({ kind: 'tcp', port, ...(localAddress ? { localAddress } : {}) });
const unix = (): Target => ({ kind: 'unix', path: unixPath });
const targets = { tcp: () => tcp(), unix } as const;

function daemonLog(): string {
  return `\n--- keyhold serve stderr (tail) ---\n${serve?.stderr().slice(-3000) ?? ''}`;
}

/** Opens a session with a valid token; the handshake and the first request in one write. */
async function session(target: Target, token: string): Promise<{ conn: RawConn; identities: Identity[] }> {
  const conn = await RawConn.open(target);
  conn.send(Buffer.concat([tokenHandshake(token), REQUEST_IDENTITIES]));
  const identities = identitiesOf(await conn.reply());
  return { conn, identities };
}

/** A refused handshake: the daemon closes the connection and never writes a byte. */
async function expectRefused(conn: RawConn, what: string, timeoutMs = 6000): Promise<void> {
  await conn.waitClosed(timeoutMs).catch((err: Error) => {
    throw new Error(`${what}: ${err.message} (received ${conn.received} bytes)${daemonLog()}`);
  });
  expect(conn.received, `${what}: bytes written by the daemon`).toBe(0);
}

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-container-signer-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-cs-'));
  unixPath = join(work, 'signer.sock');
  initVault(k);
  webKeys = [generate('web', 'ed25519'), generate('web', 'ecdsa'), generate('web', 'rsa', '2048')];
  otherKey = generate('other', 'ed25519');
  otherBlob = Buffer.from(keyholdOk(k, ['key', 'pub', 'other']).trim().split(/\s+/)[1]!, 'base64');
  issue('web', 'web', ['--subject', 'ci-1']);
  issue('other', 'other', ['--subject', 'ci-1']);
  issue('empty', 'keyless', ['--subject', 'ci-1']);
  issue('revoked', 'web', ['--subject', 'gone']);
  keyholdOk(k, ['token', 'revoke', tokens.revoked!.id]);
  issue('expired', 'web', ['--subject', 'short', '--ttl', '1s']);
  port = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${port}`, '--listen', `unix:${unixPath}`]);
  // The 1 s token is expired by now or very soon.
  const expiredAt = Date.parse(tokens.expired!.expires!);
  await sleep(Math.max(0, expiredAt + 100 - Date.now()));
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

// ---------------------------------------------------------------------------------------------
// Valid sessions
// ---------------------------------------------------------------------------------------------

describe('a valid token', () => {
  it('the Unix listener is a socket at the --listen path', () => {
    expect(statSync(unixPath).isSocket()).toBe(true);
  });

  for (const via of ['tcp', 'unix'] as const) {
    it(`${via}: handshake + requests in one write: the scope's identities, signatures that verify`, async () => {
      const conn = await RawConn.open(targets[via]());
      try {
        const data = randomBytes(64);
        // One write: handshake, identities request.
        conn.send(Buffer.concat([tokenHandshake(tokens.web!.token), REQUEST_IDENTITIES]));
        const ids = identitiesOf(await conn.reply());
        expect(ids.map((i) => fingerprint(i.keyBlob)).sort(), daemonLog()).toEqual(webKeys.map((x) => x.fingerprint).sort());
        expect(ids.map((i) => fingerprint(i.keyBlob))).not.toContain(otherKey.fingerprint);

        // Every key signs; RSA with SHA-256 and SHA-512.
        for (const id of ids) {
          const flagsList = fingerprint(id.keyBlob) === webKeys[2]!.fingerprint ? [2, 4] : [0];
          for (const flags of flagsList) {
            conn.send(signRequest(id.keyBlob, data, flags));
            const sig = signatureOf(await conn.reply());
            expect(verifySsh(id.keyBlob, sig, data), `signature by ${fingerprint(id.keyBlob)} flags ${flags}`).toBe(true);
            expect(verifySsh(id.keyBlob, sig, Buffer.concat([data, Buffer.of(0)]))).toBe(false);
          }
        }
        expect(conn.closed).toBe(false);
      } finally {
        conn.close();
      }
    });

    it(`${via}: a one-shot client (handshake + 3 RSA sign requests, then half-close) gets 3 signatures, then EOF`, async () => {
      const lookup = await RawConn.open(targets[via]());
      lookup.send(Buffer.concat([tokenHandshake(tokens.web!.token), REQUEST_IDENTITIES]));
      const rsa = identitiesOf(await lookup.reply()).find((i) => fingerprint(i.keyBlob) === webKeys[2]!.fingerprint)!.keyBlob;
      lookup.close();
      const conn = await RawConn.open(targets[via]());
      try {
        const data = [1, 2, 3].map(() => randomBytes(32));
        conn.send(Buffer.concat([tokenHandshake(tokens.web!.token), ...data.map((d) => signRequest(rsa, d, 4))]));
        conn.end();
        await conn.waitClosed(10_000);
        expect(conn.frames, daemonLog()).toHaveLength(3);
        conn.frames.forEach((reply, i) => expect(verifySsh(rsa, signatureOf(reply), data[i]!)).toBe(true));
      } finally {
        conn.close();
      }
    });

    it(`${via}: handshake, then frames in later writes (and the handshake itself split in pieces)`, async () => {
      const conn = await RawConn.open(targets[via]());
      try {
        const hs = tokenHandshake(tokens.web!.token);
        // Length split across writes, token split across writes.
        for (const piece of [hs.subarray(0, 2), hs.subarray(2, 4), hs.subarray(4, 20), hs.subarray(20)]) {
          conn.send(piece);
          await sleep(40);
        }
        await sleep(200);
        // A valid token gets no reply bytes, and the connection stays open.
        expect(conn.received, 'bytes written in answer to a valid handshake').toBe(0);
        expect(conn.closed).toBe(false);
        // Two requests in one write, one split across two writes.
        conn.send(Buffer.concat([REQUEST_IDENTITIES, REQUEST_IDENTITIES]));
        const a = identitiesOf(await conn.reply());
        const b = identitiesOf(await conn.reply());
        expect(a).toHaveLength(webKeys.length);
        expect(b).toHaveLength(webKeys.length);
        const data = randomBytes(32);
        const req = signRequest(a[0]!.keyBlob, data, 2);
        conn.send(req.subarray(0, 7));
        await sleep(50);
        conn.send(req.subarray(7));
        expect(verifySsh(a[0]!.keyBlob, signatureOf(await conn.reply()), data)).toBe(true);
      } finally {
        conn.close();
      }
    });

    it(`${via}: a key of another scope is neither listed nor used`, async () => {
      const { conn, identities } = await session(targets[via](), tokens.web!.token);
      try {
        expect(identities.map((i) => fingerprint(i.keyBlob))).not.toContain(otherKey.fingerprint);
        conn.send(signRequest(otherBlob, randomBytes(32)));
        const reply = await conn.reply();
        expect(reply[0], 'SSH_AGENT_FAILURE for a key of another scope').toBe(5);
        expect(reply).toHaveLength(1);
        // The connection goes on.
        conn.send(REQUEST_IDENTITIES);
        expect(identitiesOf(await conn.reply())).toHaveLength(webKeys.length);
      } finally {
        conn.close();
      }
      // And the other scope's token sees exactly its own key, which signs.
      const other = await session(targets[via](), tokens.other!.token);
      try {
        expect(other.identities.map((i) => fingerprint(i.keyBlob))).toEqual([otherKey.fingerprint]);
        const data = randomBytes(32);
        other.conn.send(signRequest(otherBlob, data));
        expect(verifySsh(otherBlob, signatureOf(await other.conn.reply()), data)).toBe(true);
        other.conn.send(signRequest(identities[0]!.keyBlob, data));
        expect((await other.conn.reply())[0]).toBe(5);
      } finally {
        other.conn.close();
      }
    });

    it(`${via}: a token of a scope without keys answers zero identities and stays open`, async () => {
      const { conn, identities } = await session(targets[via](), tokens.empty!.token);
      try {
        expect(identities).toEqual([]);
        conn.send(signRequest(otherBlob, randomBytes(16)));
        expect((await conn.reply())[0]).toBe(5);
        await sleep(300);
        expect(conn.closed).toBe(false);
        conn.send(REQUEST_IDENTITIES);
        expect(identitiesOf(await conn.reply())).toEqual([]);
        expect(conn.closed).toBe(false);
      } finally {
        conn.close();
      }
    });
  }
});

describe('a token session follows vault changes', () => {
  it('a key generated for the scope by the CLI (another process) is listed and signs on the already open connection', async () => {
    issue('grows', 'grows', ['--subject', 'ci']);
    const { conn, identities } = await session(tcp(), tokens.grows!.token);
    try {
      expect(identities).toEqual([]);
      const added = generate('grows', 'ed25519');
      conn.send(REQUEST_IDENTITIES);
      const now = identitiesOf(await conn.reply());
      expect(now.map((i) => fingerprint(i.keyBlob))).toEqual([added.fingerprint]);
      const data = randomBytes(32);
      conn.send(signRequest(now[0]!.keyBlob, data));
      expect(verifySsh(now[0]!.keyBlob, signatureOf(await conn.reply()), data)).toBe(true);
    } finally {
      conn.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Refused handshakes: closed, nothing written
// ---------------------------------------------------------------------------------------------

describe('a refused handshake closes the connection with nothing written', () => {
  const cases: { name: string; bytes: () => Buffer }[] = [
    { name: 'an unknown token', bytes: () => tokenHandshake('khp_' + randomBytes(32).toString('base64url')) },
    {
      name: 'the valid token with one character changed',
      bytes: () => {
        const t = tokens.web!.token;
        return tokenHandshake(t.slice(0, 30) + (t[30] === 'A' ? 'B' : 'A') + t.slice(31));
      },
    },
    { name: 'an expired token', bytes: () => tokenHandshake(tokens.expired!.token) },
    { name: 'a revoked token', bytes: () => tokenHandshake(tokens.revoked!.token) },
    { name: 'n = 0', bytes: () => u32(0) },
    { name: 'n = 1025', bytes: () => Buffer.concat([u32(1025), Buffer.alloc(1025, 0x41)]) },
    { name: 'n = 2^32-1', bytes: () => u32(0xffffffff) },
    { name: 'an agent frame instead of a handshake', bytes: () => REQUEST_IDENTITIES },
  ];

  for (const c of cases) {
    it(`tcp: ${c.name} (followed by a request that must not be answered)`, async () => {
      const conn = await RawConn.open(tcp(freshSource()));
      // The request after the bad handshake would get an answer if the daemon served it.
      conn.send(Buffer.concat([c.bytes(), REQUEST_IDENTITIES]));
      await expectRefused(conn, `tcp ${c.name}`);
    });
  }

  // Every Unix client of one uid is one source, whose failures are answered ever later; the cases
  // run side by side so the slow-down does not add up.
  it(`unix: ${cases.map((c) => c.name).join(', ')}: each closed with nothing written`, async () => {
    await Promise.all(
      cases.map(async (c) => {
        const conn = await RawConn.open(unix());
        conn.send(Buffer.concat([c.bytes(), REQUEST_IDENTITIES]));
        await expectRefused(conn, `unix ${c.name}`);
      }),
    );
  });

  it('tcp: nothing sent for more than 5 s, or a handshake dribbled byte by byte: closed at ~5 s, nothing written', async () => {
    const silent = await RawConn.open(tcp(freshSource()));
    const dribble = await RawConn.open(tcp(freshSource()));
    const opened = Date.now();
    // A valid handshake, one byte every 400 ms: it would take ~19 s to complete.
    const hs = tokenHandshake(tokens.web!.token);
    let sent = 0;
    const timer = setInterval(() => {
      if (sent < hs.length && !dribble.closed) dribble.send(hs.subarray(sent, ++sent));
    }, 400);
    try {
      await sleep(4000);
      expect(silent.closed, 'closed before the 5 s handshake window ended').toBe(false);
      expect(dribble.closed, 'closed before the 5 s handshake window ended').toBe(false);
      await Promise.all([expectRefused(silent, 'silent client', 6000), expectRefused(dribble, 'dribbling client', 6000)]);
      expect(Date.now() - opened).toBeGreaterThanOrEqual(4900);
      expect(sent).toBeLessThan(hs.length);
    } finally {
      clearInterval(timer);
      silent.close();
      dribble.close();
    }
  });

  it('a valid client is still served after the refusals (TCP and Unix)', async () => {
    for (const target of [tcp(), unix()]) {
      const { conn, identities } = await session(target, tokens.web!.token);
      expect(identities).toHaveLength(webKeys.length);
      conn.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Revocation and expiry on open connections
// ---------------------------------------------------------------------------------------------

describe('revocation and expiry reach open connections', () => {
  for (const via of ['tcp', 'unix'] as const) {
    it(`${via}: \`keyhold token revoke ID\` (another process): the next request gets no answer and the connection closes`, async () => {
      issue(`live-${via}`, 'web', ['--subject', `live-${via}`]);
      const t = tokens[`live-${via}`]!;
      const { conn, identities } = await session(targets[via](), t.token);
      // A second connection of another token of the same scope must survive.
      const bystander = await session(targets[via](), tokens.web!.token);
      try {
        expect(identities).toHaveLength(webKeys.length);
        const before = conn.received;
        keyholdOk(k, ['token', 'revoke', t.id]);
        conn.send(REQUEST_IDENTITIES);
        await conn.waitClosed(5000).catch((err: Error) => {
          throw new Error(`${err.message}${daemonLog()}`);
        });
        expect(conn.received - before, 'bytes answered after the revocation').toBe(0);
        // A new handshake with the revoked token is refused.
        const again = await RawConn.open(tcp(freshSource()));
        again.send(Buffer.concat([tokenHandshake(t.token), REQUEST_IDENTITIES]));
        await expectRefused(again, 'revoked token, new connection');
        // The other token's connection goes on.
        bystander.conn.send(REQUEST_IDENTITIES);
        expect(identitiesOf(await bystander.conn.reply())).toHaveLength(webKeys.length);
      } finally {
        conn.close();
        bystander.conn.close();
      }
    });
  }

  it('`keyhold token revoke --scope web --subject S` ends that subject\'s open connection only', async () => {
    issue('subj-a', 'web', ['--subject', 'subject-a']);
    issue('subj-b', 'web', ['--subject', 'subject-b']);
    const a = await session(tcp(), tokens['subj-a']!.token);
    const b = await session(unix(), tokens['subj-b']!.token);
    try {
      keyholdOk(k, ['token', 'revoke', '--scope', 'web', '--subject', 'subject-a']);
      const before = a.conn.received;
      a.conn.send(REQUEST_IDENTITIES);
      await a.conn.waitClosed(5000);
      expect(a.conn.received - before).toBe(0);
      b.conn.send(REQUEST_IDENTITIES);
      expect(identitiesOf(await b.conn.reply())).toHaveLength(webKeys.length);
      expect(b.conn.closed).toBe(false);
    } finally {
      a.conn.close();
      b.conn.close();
    }
  });

  it('--ttl 5s: served before; after ~5.5 s the open connection is closed on its next request and a new handshake is refused', async () => {
    const issuedAt = Date.now();
    // 5 s: two sessions must open before it ends, on a machine that may be loaded.
    issue('ttl', 'web', ['--subject', 'ttl', '--ttl', '5s']);
    const t = tokens.ttl!;
    const open = await session(tcp(), t.token);
    const openUnix = await session(unix(), t.token);
    try {
      expect(open.identities).toHaveLength(webKeys.length);
      expect(openUnix.identities).toHaveLength(webKeys.length);
      // From the expiry the CLI reported: issuing can take a while on a busy machine.
      await sleep(Math.max(0, Date.parse(t.expires!) + 500 - Date.now(), issuedAt + 5500 - Date.now()));
      for (const s of [open, openUnix]) {
        const before = s.conn.received;
        s.conn.send(REQUEST_IDENTITIES);
        await s.conn.waitClosed(5000).catch((err: Error) => {
          throw new Error(`expired token's open connection: ${err.message}${daemonLog()}`);
        });
        expect(s.conn.received - before).toBe(0);
      }
      const fresh = await RawConn.open(tcp(freshSource()));
      fresh.send(Buffer.concat([tokenHandshake(t.token), REQUEST_IDENTITIES]));
      await expectRefused(fresh, 'expired 5 s token');
    } finally {
      open.conn.close();
      openUnix.conn.close();
    }
  });
});

describe('the daemon log', () => {
  it('never contains a token, and the daemon is still running', () => {
    expect(serve.proc.exitCode).toBeNull();
    const log = serve.stderr();
    expect(log).toContain('token handshake failed');
    for (const token of allTokens) {
      expect(log.includes(token), 'a token in the daemon log').toBe(false);
      expect(log.includes(token.slice(4, 20)), 'part of a token in the daemon log').toBe(false);
    }
  });
});
