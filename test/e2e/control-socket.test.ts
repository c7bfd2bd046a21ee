// Hostile input and access control on a real daemon's control socket (uint32 length + UTF-8 JSON,
// at most 4 MiB), and the token listener while the vault is locked.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { encodeRequest, parseResponse, type Identity } from '../../src/agent-protocol/messages.js';
import { frame } from '../../src/agent-protocol/framing.js';
import { fingerprint } from '../../src/agent-protocol/public-key.js';
import { passphraseKeks } from '../../src/unlock/passphrase.js';
import { readKeyring } from '../../src/vault/keyring.js';
import {
  frameBytes,
  initVault,
  keyhold,
  keyholdOk,
  makeKeyholdEnv,
  RawAgentClient,
  startServe,
  stopAllServes,
  stopBackgroundDaemon,
  waitFor,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';
import { connectAs, freePort, RawConn, tokenHandshake } from '../helpers/raw-wire.js';

const NOBODY = 65534;
const MAX_FRAME = 4 * 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Fixture: one daemon (unlocked from the passphrase file) with a key in scope `web` and a token
// listener on loopback TCP.
// ---------------------------------------------------------------------------------------------

let k: KeyholdEnv;
let serve: ServeHandle;
let vaultId: string;
let keyFp: string;
let keyBlob: Buffer;
let webToken: string;
let port: number;
let controlPath: string;

function daemonLog(): string {
  return `\n--- keyhold serve stderr (tail) ---\n${serve?.stderr().slice(-3000) ?? ''}`;
}

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-control-');
  initVault(k);
  const gen = JSON.parse(keyholdOk(k, ['key', 'generate', 'web', '--type', 'ed25519', '--json', '--comment', 'control-key'])) as { fingerprint: string };
  keyFp = gen.fingerprint;
  keyBlob = Buffer.from(keyholdOk(k, ['key', 'pub', 'web']).trim().split(/\s+/)[1]!, 'base64');
  webToken = (JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--json', '--subject', 'ctl'])) as { token: string }).token;
  vaultId = readKeyring(`${k.vault}.keys`).vault_id;
  port = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${port}`]);
  controlPath = join(k.runtime, 'control.sock');
  await waitFor(() => existsSync(serve.socket('web')), 10_000, 'the web scope socket');
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  // A daemon that `keyhold unlock` might have started in the background (it should not have: one runs).
  if (k) await stopBackgroundDaemon(k.runtime);
  k?.cleanup();
}, 30_000);

// ---------------------------------------------------------------------------------------------
// A raw control client
// ---------------------------------------------------------------------------------------------

interface Ok {
  ok: true;
  result: unknown;
}
interface Err {
  ok: false;
  error: { message: string; hint?: string; exitCode: number };
}
type Response = Ok | Err;

function controlFrame(value: unknown): Buffer {
  return frameBytes(Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)));
}

async function openControl(): Promise<RawAgentClient> {
  return RawAgentClient.connect(controlPath);
}

async function readResponse(c: RawAgentClient, timeoutMs = 5000): Promise<Response> {
  const payload = await c.reply(timeoutMs);
  return JSON.parse(payload.toString('utf8')) as Response;
}

/** One request on a fresh connection. */
async function request(value: unknown): Promise<Response> {
  const c = await openControl();
  try {
    c.send(controlFrame(value));
    return await readResponse(c);
  } finally {
    c.close();
  }
}

function expectError(r: Response, exitCode: number, what: string): Err {
  expect(r.ok, `${what}: ${JSON.stringify(r)}`).toBe(false);
  const e = r as Err;
  expect(e.error.exitCode, `${what}: ${JSON.stringify(r)}`).toBe(exitCode);
  expect(typeof e.error.message).toBe('string');
  return e;
}

function resultOf<T>(r: Response, what: string): T {
  expect(r.ok, `${what}: ${JSON.stringify(r)}${daemonLog()}`).toBe(true);
  return (r as Ok).result as T;
}

interface StatusResult {
  pid: number;
  locked: boolean;
  vault_id: string;
  sockets: string[];
}

function sshAddList(): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('ssh-add', ['-l'], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', SSH_AUTH_SOCK: serve.socket('web') },
    encoding: 'utf8',
    timeout: 10_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** The daemon still runs, answers status on a fresh connection, and `ssh-add -l` lists the key. */
async function expectHealthy(what: string): Promise<void> {
  expect(serve.proc.exitCode, `${what}: daemon exited${daemonLog()}`).toBeNull();
  expect(serve.proc.signalCode, `${what}: daemon killed${daemonLog()}`).toBeNull();
  const status = resultOf<StatusResult>(await request({ op: 'status' }), `${what}: status`);
  expect(status.pid).toBe(serve.proc.pid);
  expect(status.locked).toBe(false);
  const list = sshAddList();
  expect(list.status, `${what}: ssh-add -l: ${list.stdout}${list.stderr}`).toBe(0);
  expect(list.stdout).toContain(keyFp);
}

// ---------------------------------------------------------------------------------------------
// 1. The protocol, spoken by hand
// ---------------------------------------------------------------------------------------------

describe('a raw client speaking the control protocol', () => {
  it('status: ok, unlocked, the daemon pid, this vault, the web socket', async () => {
    const s = resultOf<StatusResult>(await request({ op: 'status' }), 'status');
    expect(s.locked).toBe(false);
    expect(s.pid).toBe(serve.proc.pid);
    expect(s.vault_id).toBe(vaultId);
    expect(s.sockets).toContain(serve.socket('web'));
  });

  it('call listKeys with the right vault id: the key, its public blob as {$b64}', async () => {
    const keys = resultOf<{ fingerprint: string; scopes: string[]; publicBlob: unknown }[]>(
      await request({ op: 'call', vaultId, method: 'listKeys', args: [] }),
      'listKeys',
    );
    expect(keys).toHaveLength(1);
    expect(keys[0]!.fingerprint).toBe(keyFp);
    expect(keys[0]!.scopes).toEqual(['web']);
    const blob = keys[0]!.publicBlob as { $b64: string };
    expect(Object.keys(blob)).toEqual(['$b64']);
    expect(Buffer.from(blob.$b64, 'base64').equals(keyBlob)).toBe(true);
    // No private material in what a listing returns.
    expect(JSON.stringify(keys)).not.toMatch(/private|pkcs8/i);

    const inScope = resultOf<unknown[]>(await request({ op: 'call', vaultId, method: 'listKeys', args: ['web'] }), 'listKeys web');
    expect(inScope).toHaveLength(1);
    const elsewhere = resultOf<unknown[]>(await request({ op: 'call', vaultId, method: 'listKeys', args: ['nowhere'] }), 'listKeys nowhere');
    expect(elsewhere).toEqual([]);
  });

  it('a wrong vault id: ok:false, exit code 1, nothing done', async () => {
    const other = vaultId.replace(/.$/, (ch) => (ch === 'a' ? 'b' : 'a'));
    expectError(await request({ op: 'call', vaultId: other, method: 'listKeys', args: [] }), 1, 'wrong vault id');
    expectError(await request({ op: 'call', vaultId: '', method: 'removeKey', args: [keyFp] }), 1, 'empty vault id');
    expectError(await request({ op: 'call', vaultId: other, method: 'removeKey', args: [keyFp] }), 1, 'wrong vault id, removeKey');
    await expectHealthy('after wrong vault ids');
  });

  it('methods outside the list (constructor, __proto__, close, hasOwnProperty, …): exit 2, and the same connection goes on', async () => {
    const c = await openControl();
    try {
      const bad = ['constructor', '__proto__', 'close', 'hasOwnProperty', 'toString', 'valueOf', 'prototype', 'api', 'lock', '', 'listKeys '];
      for (const method of bad) {
        c.send(controlFrame({ op: 'call', vaultId, method, args: [] }));
        expectError(await readResponse(c), 2, `method ${JSON.stringify(method)}`);
      }
      // Not a string, args not an array, too many args.
      for (const req of [
        { op: 'call', vaultId, method: ['listKeys'], args: [] },
        { op: 'call', vaultId, method: 'listKeys', args: { 0: 'web' } },
        { op: 'call', vaultId, method: 'listKeys' },
        { op: 'call', vaultId, method: 'listKeys', args: new Array(9).fill('web') },
        { op: 'call', vaultId: 42, method: 'listKeys', args: [] },
        { op: 'Status' },
        { op: 'status ' },
        {},
      ]) {
        c.send(controlFrame(req));
        expectError(await readResponse(c), 2, `request ${JSON.stringify(req)}`);
      }
      // The connection still serves real requests, in order.
      c.send(Buffer.concat([controlFrame({ op: 'status' }), controlFrame({ op: 'call', vaultId, method: 'listKeys', args: [] })]));
      expect(resultOf<StatusResult>(await readResponse(c), 'status after errors').locked).toBe(false);
      expect(resultOf<unknown[]>(await readResponse(c), 'listKeys after errors')).toHaveLength(1);
      expect(c.closed).toBe(false);
    } finally {
      c.close();
    }
    await expectHealthy('after bad methods');
  });

  it('a "__proto__" key cannot smuggle an op in: {"__proto__":{"op":"lock"}} is an unknown op and nothing locks', async () => {
    expectError(await request('{"__proto__":{"op":"lock"}}'), 2, '__proto__ op');
    expectError(await request(`{"__proto__":{"op":"call","vaultId":"${vaultId}","method":"listKeys","args":[]}}`), 2, '__proto__ call');
    // A call whose method is smuggled the same way.
    expectError(await request(`{"op":"call","vaultId":"${vaultId}","__proto__":{"method":"listKeys","args":[]}}`), 2, '__proto__ method');
    await expectHealthy('after __proto__ requests');
  });
});

// ---------------------------------------------------------------------------------------------
// 2. Garbage
// ---------------------------------------------------------------------------------------------

describe('garbage on the control socket', () => {
  const STATUS = controlFrame({ op: 'status' });

  const answered: { name: string; payload: () => Buffer; exitCodes: number[] }[] = [
    { name: 'not JSON', payload: () => Buffer.from('hello {op: status}'), exitCodes: [2] },
    { name: 'truncated JSON', payload: () => Buffer.from('{"op":"status"'), exitCodes: [2] },
    { name: 'a JSON array', payload: () => Buffer.from('[{"op":"status"}]'), exitCodes: [2] },
    { name: 'JSON null', payload: () => Buffer.from('null'), exitCodes: [2] },
    { name: 'a JSON number', payload: () => Buffer.from('42'), exitCodes: [2] },
    { name: 'a JSON string', payload: () => Buffer.from('"status"'), exitCodes: [2] },
    { name: 'invalid UTF-8', payload: () => Buffer.from([0x7b, 0xff, 0xfe, 0xc3, 0x28, 0x7d]), exitCodes: [2] },
    { name: 'NUL bytes', payload: () => Buffer.alloc(64), exitCodes: [2] },
  ];

  for (const c of answered) {
    it(`${c.name}: answered ok:false with exit ${c.exitCodes.join('/')}; the daemon serves on`, async () => {
      const conn = await openControl();
      try {
        conn.send(frameBytes(c.payload()));
        const r = await readResponse(conn);
        expect(r.ok).toBe(false);
        expect(c.exitCodes).toContain((r as Err).error.exitCode);
        // The same connection still works.
        conn.send(STATUS);
        expect(resultOf<StatusResult>(await readResponse(conn), 'status after garbage').pid).toBe(serve.proc.pid);
      } finally {
        conn.close();
      }
      await expectHealthy(c.name);
    });
  }

  const deep: { name: string; payload: () => Buffer }[] = [
    { name: 'arrays nested 10,000 deep', payload: () => Buffer.from('['.repeat(10_000) + ']'.repeat(10_000)) },
    { name: 'objects nested 10,000 deep', payload: () => Buffer.from('{"a":'.repeat(10_000) + '1' + '}'.repeat(10_000)) },
    {
      name: 'a call whose args are nested 10,000 deep',
      payload: () => Buffer.from(`{"op":"call","vaultId":"${vaultId}","method":"listKeys","args":[${'['.repeat(10_000)}${']'.repeat(10_000)}]}`),
    },
    {
      name: 'an unlock whose keks are nested 10,000 deep',
      payload: () => Buffer.from(`{"op":"unlock","vaultId":"${vaultId}","keks":${'{"x":'.repeat(10_000)}1${'}'.repeat(10_000)}}`),
    },
  ];

  for (const c of deep) {
    it(`${c.name}: an error response or a closed connection, never a crash`, async () => {
      const conn = await openControl();
      try {
        conn.send(frameBytes(c.payload()));
        await waitFor(() => conn.closed || conn.pendingBytes >= 4, 10_000, 'an answer or a close');
        if (!conn.closed || conn.pendingBytes > 0) {
          const r = await readResponse(conn);
          expect(r.ok, JSON.stringify(r)).toBe(false);
          expect([1, 2]).toContain((r as Err).error.exitCode);
        }
      } finally {
        conn.close();
      }
      await expectHealthy(c.name);
    });
  }

  const closing: { name: string; bytes: () => Buffer }[] = [
    { name: 'a length of 0', bytes: () => Buffer.alloc(4) },
    { name: 'a length of 4 MiB + 1', bytes: () => Buffer.from([0x00, 0x40, 0x00, 0x01]) },
    { name: 'a length of 2^32-1', bytes: () => Buffer.from([0xff, 0xff, 0xff, 0xff]) },
    { name: 'a length of 0 followed by a valid status request', bytes: () => Buffer.concat([Buffer.alloc(4), STATUS]) },
  ];

  for (const c of closing) {
    it(`${c.name}: the connection is closed with no reply`, async () => {
      const conn = await openControl();
      conn.send(c.bytes());
      await conn.waitClosed(5000);
      expect(conn.pendingBytes).toBe(0);
      await expectHealthy(c.name);
    });
  }

  it('a length over 4 MiB followed by 4 MiB + 1 bytes of body: closed at the header, nothing buffered or answered', async () => {
    const conn = await openControl();
    const header = Buffer.alloc(4);
    header.writeUInt32BE(MAX_FRAME + 1);
    conn.send(header);
    conn.send(Buffer.alloc(MAX_FRAME + 1, 0x61));
    await conn.waitClosed(5000);
    expect(conn.pendingBytes).toBe(0);
    await expectHealthy('over-long frame with body');
  });

  it('exactly 4 MiB of valid JSON (one string): answered (not an object) or closed, never a crash', async () => {
    const conn = await openControl();
    try {
      const payload = Buffer.alloc(MAX_FRAME, 0x61);
      payload[0] = 0x22;
      payload[payload.length - 1] = 0x22;
      conn.send(frameBytes(payload));
      await waitFor(() => conn.closed || conn.pendingBytes >= 4, 15_000, 'an answer or a close');
      if (!conn.closed || conn.pendingBytes > 0) {
        expectError(await readResponse(conn, 15_000), 2, '4 MiB string');
      }
    } finally {
      conn.close();
    }
    await expectHealthy('4 MiB string');
  });

  it('a frame announced but never completed, then the client hangs up: nothing answered, the daemon serves on', async () => {
    const conn = await openControl();
    const header = Buffer.alloc(4);
    header.writeUInt32BE(1000);
    conn.send(Buffer.concat([header, Buffer.from('{"op":"status"}')]));
    await sleep(200);
    expect(conn.pendingBytes).toBe(0);
    expect(conn.closed).toBe(false);
    conn.close();
    await expectHealthy('half frame');
  });

  it('random bytes (fast-check, 50 runs, each on a fresh connection): closed, or answered with errors only', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 600 }), async (bytes) => {
        const conn = await openControl();
        try {
          conn.send(Buffer.from(bytes));
          await conn.closedWithin(150);
          while (conn.pendingBytes >= 4) {
            const r = await readResponse(conn, 1000);
            expect(r.ok, JSON.stringify(r)).toBe(false);
          }
        } finally {
          conn.close();
        }
        expect(serve.proc.exitCode).toBeNull();
        expect(resultOf<StatusResult>(await request({ op: 'status' }), 'status after random bytes').locked).toBe(false);
      }),
      { numRuns: 50 },
    );
    await expectHealthy('random bytes');
  });

  it('random payloads in well-formed frames (fast-check, 50 runs): each answered ok:false, exit 1 or 2', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.uint8Array({ minLength: 1, maxLength: 2048 }).map((b) => Buffer.from(b)),
          fc
            .jsonValue()
            .filter((v) => !(v !== null && typeof v === 'object' && !Array.isArray(v) && 'op' in v))
            .map((v) => Buffer.from(JSON.stringify(v) ?? 'null'))
            .filter((b) => b.length > 0),
        ),
        async (payload) => {
          const conn = await openControl();
          try {
            conn.send(frameBytes(payload));
            const r = await readResponse(conn);
            expect(r.ok, JSON.stringify(r)).toBe(false);
            expect([1, 2]).toContain((r as Err).error.exitCode);
          } finally {
            conn.close();
          }
        },
      ),
      { numRuns: 50 },
    );
    await expectHealthy('random framed payloads');
  });

  it('a valid status request written one byte at a time is answered', async () => {
    const conn = await openControl();
    try {
      conn.socket.setNoDelay?.(true);
      for (let i = 0; i < STATUS.length; i++) {
        conn.send(STATUS.subarray(i, i + 1));
        await sleep(10);
        if (i < STATUS.length - 1) expect(conn.pendingBytes, `answered after only ${i + 1} bytes`).toBe(0);
      }
      expect(resultOf<StatusResult>(await readResponse(conn), 'byte-by-byte status').pid).toBe(serve.proc.pid);
    } finally {
      conn.close();
    }
    await expectHealthy('byte by byte');
  });

  it('a valid status request split in two at every byte offset (fresh connection each) is answered', async () => {
    for (let cut = 1; cut < STATUS.length; cut++) {
      const conn = await openControl();
      try {
        conn.send(STATUS.subarray(0, cut));
        await sleep(15);
        expect(conn.pendingBytes, `answered after ${cut} bytes`).toBe(0);
        conn.send(STATUS.subarray(cut));
        expect(resultOf<StatusResult>(await readResponse(conn), `status split at ${cut}`).pid).toBe(serve.proc.pid);
      } finally {
        conn.close();
      }
    }
    await expectHealthy('split frames');
  });

  it('several requests in one write are answered in order', async () => {
    const conn = await openControl();
    try {
      conn.send(
        Buffer.concat([
          STATUS,
          controlFrame('nope'),
          controlFrame({ op: 'call', vaultId, method: 'listKeys', args: [] }),
          controlFrame({ op: 'call', vaultId, method: 'constructor', args: [] }),
          STATUS,
        ]),
      );
      expect(resultOf<StatusResult>(await readResponse(conn), '1st').pid).toBe(serve.proc.pid);
      expectError(await readResponse(conn), 2, '2nd');
      expect(resultOf<unknown[]>(await readResponse(conn), '3rd')).toHaveLength(1);
      expectError(await readResponse(conn), 2, '4th');
      expect(resultOf<StatusResult>(await readResponse(conn), '5th').locked).toBe(false);
    } finally {
      conn.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// 3. Unlock with garbage KEKs
// ---------------------------------------------------------------------------------------------

describe('unlock requests with garbage KEKs', () => {
  const sentSecrets: Buffer[] = [];
  const b64 = (b: Buffer) => ({ $b64: b.toString('base64') });

  it('locked by a raw lock request: identities empty, calls exit 3', async () => {
    const s = resultOf<StatusResult>(await request({ op: 'lock' }), 'lock');
    expect(s.locked).toBe(true);
    const list = sshAddList();
    expect(list.status, list.stdout + list.stderr).toBe(1);
    expect(list.stdout + list.stderr).toMatch(/no identities/i);
    expectError(await request({ op: 'call', vaultId, method: 'listKeys', args: [] }), 3, 'listKeys while locked');
  });

  it('wrong-length or mistyped KEKs: exit 2; a wrong KEK of the right length: exit 4; the daemon stays locked', async () => {
    const keyring = readKeyring(`${k.vault}.keys`);
    const ppId = keyring.factors.find((f) => f.type === 'passphrase')!.id;
    const k31 = randomBytes(31);
    const k33 = randomBytes(33);
    const k64 = randomBytes(64);
    const wrong = randomBytes(32);
    const wrong2 = randomBytes(32);
    const wrong3 = randomBytes(32);
    sentSecrets.push(k31, k33, k64, wrong, wrong2, wrong3);

    const usage: unknown[] = [
      { op: 'unlock', vaultId, keks: { [ppId]: b64(k31) } },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(k33) } },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(k64) } },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(Buffer.alloc(0)) } },
      { op: 'unlock', vaultId, keks: { [ppId]: wrong.toString('base64') } },
      { op: 'unlock', vaultId, keks: { [ppId]: wrong.toString('hex') } },
      { op: 'unlock', vaultId, keks: { [ppId]: [...wrong] } },
      { op: 'unlock', vaultId, keks: { [ppId]: { $b64: 42 } } },
      { op: 'unlock', vaultId, keks: { [ppId]: { $b64: wrong.toString('base64'), extra: 1 } } },
      { op: 'unlock', vaultId, keks: null },
      { op: 'unlock', vaultId, keks: 'x' },
      { op: 'unlock', vaultId },
      { op: 'unlock', keks: { [ppId]: b64(wrong) } },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(wrong) }, idleMs: -1 },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(wrong) }, ttlMs: 1e308 },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(wrong) }, idleMs: '5000' },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(wrong) }, ttlMs: 0.5 },
    ];
    for (const req of usage) {
      expectError(await request(req), 2, `unlock ${JSON.stringify(req).slice(0, 120)}`);
    }

    const denied: unknown[] = [
      { op: 'unlock', vaultId, keks: { [ppId]: b64(wrong) } },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(Buffer.alloc(32)) } },
      { op: 'unlock', vaultId, keks: {} },
      { op: 'unlock', vaultId, keks: { 'pp-00000000': b64(wrong2) } },
      { op: 'unlock', vaultId, keks: { [ppId]: b64(wrong3), 'sa-00000000': b64(wrong2) } },
    ];
    for (const req of denied) {
      expectError(await request(req), 4, `unlock ${JSON.stringify(req).slice(0, 120)}`);
    }
    // A "__proto__" factor id in raw JSON: refused (exit 4 or 2), never a crash.
    const proto = await request(`{"op":"unlock","vaultId":"${vaultId}","keks":{"__proto__":{"$b64":"${wrong.toString('base64')}"}}}`);
    expect(proto.ok).toBe(false);
    expect([2, 4]).toContain((proto as Err).error.exitCode);
    // Another vault's id: exit 1 before any KEK is tried.
    expectError(await request({ op: 'unlock', vaultId: 'not-this-vault', keks: { [ppId]: b64(wrong) } }), 1, 'unlock other vault');

    // Still locked, still alive.
    expect(serve.proc.exitCode).toBeNull();
    const s = resultOf<StatusResult>(await request({ op: 'status' }), 'status after bad unlocks');
    expect(s.locked).toBe(true);
    expect(s.pid).toBe(serve.proc.pid);
    const list = sshAddList();
    expect(list.status).toBe(1);
    expect(list.stdout).not.toContain(keyFp);
  });

  it('the right KEK over the raw protocol unlocks; the key is listed again', async () => {
    const keyring = readKeyring(`${k.vault}.keys`);
    const keks = await passphraseKeks(keyring, Buffer.from(k.passphrase));
    expect(keks.size).toBe(1);
    const [id, kek] = [...keks.entries()][0]!;
    sentSecrets.push(Buffer.from(kek));
    const s = resultOf<StatusResult>(await request({ op: 'unlock', vaultId, keks: { [id]: b64(kek) } }), 'unlock with the right KEK');
    expect(s.locked).toBe(false);
    await expectHealthy('after the raw unlock');
  });

  it('on the unlocked daemon, malformed unlocks are still refused (exit 2) and change nothing', async () => {
    const ppId = readKeyring(`${k.vault}.keys`).factors[0]!.id;
    expectError(await request({ op: 'unlock', vaultId, keks: { [ppId]: b64(randomBytes(31)) } }), 2, 'short KEK while unlocked');
    expectError(await request({ op: 'unlock', vaultId: 'x', keks: {} }), 1, 'other vault while unlocked');
    await expectHealthy('malformed unlocks while unlocked');
  });

  it("no KEK, passphrase or part of one appears in the daemon's stderr", () => {
    const log = serve.stderr();
    expect(log).toContain('unlock refused');
    const needles: string[] = [k.passphrase];
    for (const secret of sentSecrets) {
      needles.push(secret.toString('base64'), secret.toString('hex'), secret.toString('base64url'));
      needles.push(secret.toString('base64').slice(0, 16), secret.toString('hex').slice(0, 16));
      if (secret.length > 0) needles.push(JSON.stringify([...secret]).slice(0, 40));
    }
    for (const needle of needles) {
      expect(log.includes(needle), `secret material in the daemon log: ${needle}`).toBe(false);
    }
  });
});

// ---------------------------------------------------------------------------------------------
// 4. Peer check
// ---------------------------------------------------------------------------------------------

describe('control socket peer check', () => {
  it('control.sock is a 0600 socket in a 0700 runtime dir', () => {
    const st = statSync(controlPath);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(process.getuid!());
    expect(statSync(k.runtime).mode & 0o777).toBe(0o700);
  });

  it('uid 65534, with the socket opened up to 0666, is closed without a reply (status and lock alike)', async () => {
    if (process.getuid!() !== 0) {
      throw new Error(`this test must run as root (uid 0) to connect as uid ${NOBODY}; it runs as uid ${process.getuid!()}.`);
    }
    const refusalsBefore = serve.stderr().split('refused connection from another user').length;
    const dirs = [k.dir, k.runtime];
    try {
      // Only SO_PEERCRED stands in the way once the file modes let uid 65534 reach the socket.
      for (const dir of dirs) chmodSync(dir, 0o755);
      chmodSync(controlPath, 0o666);
      for (const req of [{ op: 'status' }, { op: 'lock' }, { op: 'call', vaultId, method: 'listKeys', args: [] }]) {
        const report = await connectAs(NOBODY, controlPath, controlFrame(req));
        expect(report.uid).toBe(NOBODY);
        expect(report.connected, JSON.stringify(report)).toBe(true);
        expect(report.error).not.toBe('EACCES');
        expect(report.bytes, `bytes answered to uid ${NOBODY} for ${req.op}`).toBe('');
        expect(report.closed).toBe(true);
      }
    } finally {
      for (const dir of dirs) chmodSync(dir, 0o700);
      chmodSync(controlPath, 0o600);
    }
    const refusalsAfter = serve.stderr().split('refused connection from another user').length;
    expect(refusalsAfter - refusalsBefore).toBe(3);
    // The lock request of uid 65534 did nothing.
    await expectHealthy('after uid 65534');
  });
});

// ---------------------------------------------------------------------------------------------
// 5. Token listener while locked
// ---------------------------------------------------------------------------------------------

/** A raw TCP connection to the token listener whose errors carry the daemon's log. */
async function openTcp(localAddress?: string): Promise<RawConn> {
  const conn = await RawConn.open({ kind: 'tcp', port, ...(localAddress ? { localAddress } : {}) });
  conn.context = daemonLog;
  return conn;
}

const REQUEST_IDENTITIES = frame(encodeRequest({ type: 'request-identities' }));

function identitiesOf(payload: Buffer): Identity[] {
  const response = parseResponse(payload);
  if (response.type !== 'identities') throw new Error(`expected an identities answer, got ${response.type}`);
  return response.identities;
}

async function tokenSession(localAddress?: string): Promise<{ conn: RawConn; identities: Identity[] }> {
  const conn = await openTcp(localAddress);
  conn.send(Buffer.concat([tokenHandshake(webToken), REQUEST_IDENTITIES]));
  return { conn, identities: identitiesOf(await conn.reply()) };
}

describe('the token listener while the vault is locked', () => {
  const SOURCE = '127.0.0.77';

  it('an open token connection at lock time: its next request is not answered and the connection closes', async () => {
    const { conn, identities } = await tokenSession(SOURCE);
    try {
      expect(identities.map((i) => fingerprint(i.keyBlob))).toEqual([keyFp]);
      const r = keyhold(k, ['lock']);
      expect(r.status, r.stderr).toBe(0);
      const before = conn.received;
      conn.send(REQUEST_IDENTITIES);
      // The session re-checks its token before each request (stillValid: no token cache while
      // locked), so the daemon closes the connection rather than answering an empty list.
      await conn.waitClosed(5000).catch((err: Error) => {
        throw new Error(`${err.message}${daemonLog()}`);
      });
      expect(conn.received - before, 'bytes answered after the lock').toBe(0);
    } finally {
      conn.close();
    }
  });

  it('30 handshakes with a VALID token while locked: each closed with nothing written; after unlock the same source is served at once', async () => {
    const status = keyhold(k, ['status', '--json']);
    expect(status.status).toBe(3);
    expect((JSON.parse(status.stdout) as { locked: boolean }).locked).toBe(true);
    for (let i = 0; i < 30; i++) {
      const conn = await openTcp(SOURCE);
      conn.send(Buffer.concat([tokenHandshake(webToken), REQUEST_IDENTITIES]));
      await conn.waitClosed(5000).catch((err: Error) => {
        throw new Error(`locked handshake #${i + 1}: ${err.message}${daemonLog()}`);
      });
      expect(conn.received, `locked handshake #${i + 1}: bytes written`).toBe(0);
    }
    // Logged as refused because locked (not as failed tokens).
    expect(serve.stderr().split('"reason":"vault locked"').length - 1).toBeGreaterThanOrEqual(30);

    const unlocked = keyhold(k, ['unlock']);
    expect(unlocked.status, unlocked.stderr).toBe(0);
    // The same daemon (no background one was started).
    const s = resultOf<StatusResult>(await request({ op: 'status' }), 'status after unlock');
    expect(s.pid).toBe(serve.proc.pid);
    expect(s.locked).toBe(false);

    // Immediately: the same token from the same source is served (the source was not blocked).
    const { conn, identities } = await tokenSession(SOURCE);
    try {
      expect(identities.map((i) => fingerprint(i.keyBlob))).toEqual([keyFp]);
      conn.send(REQUEST_IDENTITIES);
      expect(identitiesOf(await conn.reply())).toHaveLength(1);
    } finally {
      conn.close();
    }
    await expectHealthy('after lock/unlock');
  });

  it('contrast: 20 invalid-token handshakes from one source do get that source blocked (so the check above can fail)', async () => {
    const BLAMED = '127.0.0.78';
    const bad = 'khp_' + randomBytes(32).toString('base64url');
    const badHandshake = async (source: string) => {
      const conn = await openTcp(source);
      conn.send(Buffer.concat([tokenHandshake(bad), REQUEST_IDENTITIES]));
      await conn.waitClosed(10_000);
      expect(conn.received).toBe(0);
    };
    await Promise.all(Array.from({ length: 20 }, () => badHandshake(BLAMED)));
    // Now that source is blocked: its next failure is logged as a repeated one...
    await badHandshake(BLAMED);
    expect(serve.stderr()).toMatch(/"address":"127\.0\.0\.78"[^\n]*"reason":"unknown token \(repeated/);
    // ...yet a valid token from it is still served (a valid token is never refused for its source)...
    const blamed = await tokenSession(BLAMED);
    expect(blamed.identities).toHaveLength(1);
    blamed.conn.close();
    // ...while the source that only met a locked vault is not blocked: its first failure is a plain one.
    await badHandshake(SOURCE);
    expect(serve.stderr()).toMatch(/"address":"127\.0\.0\.77"[^\n]*"reason":"unknown token"/);
    expect(serve.stderr()).not.toMatch(/"address":"127\.0\.0\.77"[^\n]*"reason":"unknown token \(repeated/);
  });
});

// ---------------------------------------------------------------------------------------------
// 6. Many concurrent control connections
// ---------------------------------------------------------------------------------------------

describe('many concurrent control connections', () => {
  it('200 connections each sending status: all answered; the daemon lives', async () => {
    const conns = await Promise.all(Array.from({ length: 200 }, () => openControl()));
    try {
      for (const c of conns) c.send(controlFrame({ op: 'status' }));
      const results = await Promise.all(conns.map((c) => readResponse(c, 15_000)));
      for (const r of results) {
        const s = resultOf<StatusResult>(r, 'concurrent status');
        expect(s.pid).toBe(serve.proc.pid);
        expect(s.locked).toBe(false);
      }
      expect(results).toHaveLength(200);
    } finally {
      for (const c of conns) c.close();
    }
    await expectHealthy('after 200 concurrent connections');
  });
});
