// serveConnection in-process, in the manner of Go's x/crypto/ssh/agent tests that run ServeAgent
// over a pipe: a fake backend behind a real Unix socket pair, one test per message handler, plus
// the loop's framing, ordering, backpressure, half-close, memory budget and idle timeout.
import { afterEach, describe, expect, it } from 'vitest';
import { generateKeyPairSync, sign as signBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { serveConnection, type ConnectionOptions } from '../../src/signer/connection.js';
import type { AgentBackend, MemoryBudget, RequestContext, SignResult } from '../../src/signer/backend.js';
import { generateKeyPair } from '../helpers/ssh-agent.js';
import { signCertificate } from '../helpers/certificates.js';
import { frame, identitiesFrame, parseIdentities, RawConn, readString, signPayload, signRequestFrame, sshString, u32 } from '../helpers/raw-wire.js';

const FAILURE = 5;
const SUCCESS = 6;
const IDENTITIES_ANSWER = 12;
const SIGN_RESPONSE = 14;
const EXTENSION = 27;
const EXTENSION_FAILURE = 28;
const EXTENSION_RESPONSE = 29;

const KEY_BLOB = Buffer.concat([sshString('ssh-ed25519'), sshString(Buffer.alloc(32, 7))]);
const OTHER_BLOB = Buffer.concat([sshString('ssh-ed25519'), sshString(Buffer.alloc(32, 9))]);

/** A fake signature: the data it was asked to sign, so a reply out of order is seen. */
const fakeSignature = (data: Buffer) => Buffer.concat([Buffer.from('sig:'), data]);
const signed = (data: Buffer): SignResult => ({ ok: true, signature: fakeSignature(data), fingerprint: 'SHA256:fake', algorithm: 'ssh-ed25519' });
const later = <T>(ms: number, value: T) => new Promise<T>((resolve) => setTimeout(() => resolve(value), ms));

/** Signs KEY_BLOB, refuses anything else; `signWith` changes how (e.g. later, on a Promise). */
class FakeBackend implements AgentBackend {
  comment = 'fake key';
  identityCalls = 0;
  signCalls = 0;
  readonly contexts: RequestContext[] = [];
  signWith: (data: Buffer) => SignResult | Promise<SignResult> = signed;

  identities(context: RequestContext) {
    this.identityCalls++;
    this.contexts.push(context);
    return [{ keyBlob: KEY_BLOB, comment: this.comment }];
  }

  sign(keyBlob: Buffer, data: Buffer, _flags: number, context: RequestContext) {
    this.signCalls++;
    this.contexts.push({ ...context, bindings: [...context.bindings] });
    if (!keyBlob.equals(KEY_BLOB)) return { ok: false, reason: 'unknown-key' } as const;
    return this.signWith(Buffer.from(data));
  }
}

class FakeBudget implements MemoryBudget {
  reserved = 0;
  peak = 0;
  refusals = 0;
  constructor(private readonly limit = Infinity) {}
  reserve(bytes: number): boolean {
    expect(bytes).toBeGreaterThan(0);
    if (this.reserved + bytes > this.limit) {
      this.refusals++;
      return false;
    }
    this.reserved += bytes;
    this.peak = Math.max(this.peak, this.reserved);
    return true;
  }
  release(bytes: number): void {
    expect(bytes).toBeGreaterThan(0);
    this.reserved -= bytes;
    expect(this.reserved).toBeGreaterThanOrEqual(0);
  }
}

interface Harness {
  client: RawConn;
  backend: FakeBackend;
  /** JSON log lines the connection wrote (level debug and up). */
  logs: { msg: string; level: number }[];
  /** The server's side of the connection. */
  socket: Socket;
  /** Listeners per event on `socket` before serveConnection added its own (node registers some). */
  listenersBefore: Map<string, number>;
  /** Resolves when the server's side of the connection has closed. */
  serverClosed: Promise<void>;
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

/** A Unix socket in a temp dir whose one connection runs serveConnection with a fake backend. */
async function serve(options: Partial<ConnectionOptions> = {}, backend = new FakeBackend()): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-conn-'));
  const logs: Harness['logs'] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n')) if (line) logs.push(JSON.parse(line) as Harness['logs'][number]);
      done();
    },
  });
  const log = pino({ level: 'debug' }, sink);
  let serverSocket: (socket: Socket) => void = () => {};
  const accepted = new Promise<Socket>((resolve) => (serverSocket = resolve));
  const listenersBefore = new Map<string, number>();
  const server: Server = createServer((socket) => {
    for (const event of ['data', 'end', 'error', 'timeout', 'drain']) listenersBefore.set(event, socket.listenerCount(event));
    serverSocket(socket);
    serveConnection(socket, backend, {
      peer: { kind: 'unix', pid: process.pid, uid: 0, gid: 0, exe: null },
      log,
      idleTimeoutMs: 10_000,
      maxPendingWrite: 64 * 1024,
      ...options,
    });
  });
  const path = join(dir, 'agent.sock');
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const client = await RawConn.connect(path);
  const socket = await accepted;
  const serverClosed = new Promise<void>((resolve) => (socket.destroyed ? resolve() : socket.once('close', () => resolve())));
  cleanups.push(() => {
    client.close();
    socket.destroy();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { client, backend, logs, socket, listenersBefore, serverClosed };
}

/** Polls a condition on the server's side (bounded). */
async function eventually(pred: () => boolean, what: string, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await later(5, null);
  }
}

function signatureIn(reply: Buffer): Buffer {
  expect(reply[0], 'SIGN_RESPONSE').toBe(SIGN_RESPONSE);
  return readString(reply, 1)[0];
}

function extensionFrame(name: string, contents: Buffer = Buffer.alloc(0)): Buffer {
  return frame(Buffer.concat([Buffer.of(EXTENSION), sshString(name), contents]));
}

/** A host key that signs session ids, as sshd does for session-bind@openssh.com. */
function hostKey() {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  const raw = Buffer.from(publicKey.export({ format: 'jwk' }).x!, 'base64url');
  const blob = Buffer.concat([sshString('ssh-ed25519'), sshString(raw)]);
  /** `presented`: the key ssh names (a host certificate of this key, say); the session is signed by `signer`. */
  const bind = (sessionId: Buffer, forwarding: boolean, signer = privateKey, presented: Buffer = blob) =>
    extensionFrame(
      'session-bind@openssh.com',
      Buffer.concat([
        sshString(presented),
        sshString(sessionId),
        sshString(Buffer.concat([sshString('ssh-ed25519'), sshString(signBytes(null, sessionId, signer))])),
        Buffer.of(forwarding ? 1 : 0),
      ]),
    );
  return { blob, bind };
}

describe('processRequestIdentities', () => {
  it('answers the backend identities, with the connection context', async () => {
    const { client, backend } = await serve({ tokenId: 'tok-1' });
    client.send(identitiesFrame());
    expect(parseIdentities(await client.reply())).toEqual([{ blob: KEY_BLOB, comment: 'fake key' }]);
    expect(backend.contexts[0]).toMatchObject({ peer: { kind: 'unix', pid: process.pid }, tokenId: 'tok-1', bindings: [] });
  });
});

describe('processSignRequest', () => {
  it('answers a signature, and FAILURE for a refusal', async () => {
    const { client } = await serve();
    client.send(Buffer.concat([signRequestFrame(KEY_BLOB, Buffer.from('a')), signRequestFrame(OTHER_BLOB, Buffer.from('b'))]));
    expect(signatureIn(await client.reply())).toEqual(fakeSignature(Buffer.from('a')));
    expect((await client.reply())[0]).toBe(FAILURE);
  });

  it('a signature answered by a Promise is still in request order, ahead of later ready replies', async () => {
    const { client, backend } = await serve();
    backend.signWith = (data) => (data.toString() === 'slow' ? later(60, signed(data)) : signed(data));
    // Within one chunk: a ready signature, a slow one, then identities (ready at once).
    client.send(Buffer.concat([signRequestFrame(KEY_BLOB, Buffer.from('fast')), signRequestFrame(KEY_BLOB, Buffer.from('slow')), identitiesFrame()]));
    // Across chunks: identities sent after the slow request must still wait for it.
    await later(10, null);
    client.send(identitiesFrame());
    expect(signatureIn(await client.reply()).toString()).toBe('sig:fast');
    expect(signatureIn(await client.reply()).toString()).toBe('sig:slow');
    expect((await client.reply())[0]).toBe(IDENTITIES_ANSWER);
    expect((await client.reply())[0]).toBe(IDENTITIES_ANSWER);
  });

  it('a rejected signature Promise answers FAILURE and the connection goes on', async () => {
    const { client, backend } = await serve();
    backend.signWith = (data) => (data.toString() === 'boom' ? Promise.reject(new Error('secret detail')) : later(5, signed(data)));
    client.send(Buffer.concat([signRequestFrame(KEY_BLOB, Buffer.from('boom')), signRequestFrame(KEY_BLOB, Buffer.from('ok'))]));
    expect((await client.reply())[0]).toBe(FAILURE);
    expect(signatureIn(await client.reply()).toString()).toBe('sig:ok');
  });
});

describe('processExtension', () => {
  it('query lists the supported extensions beyond query itself, as OpenSSH\'s agent does', async () => {
    const { client } = await serve();
    client.send(extensionFrame('query'));
    const reply = await client.reply();
    expect(reply[0]).toBe(EXTENSION_RESPONSE);
    const [name, offset] = readString(reply, 1);
    expect(name.toString()).toBe('query');
    const names: string[] = [];
    for (let o = offset; o < reply.length; ) {
      const [n, next] = readString(reply, o);
      names.push(n.toString());
      o = next;
    }
    expect(names).toEqual(['session-bind@openssh.com']);
  });

  it('an unknown extension answers FAILURE (5), not EXTENSION_FAILURE', async () => {
    const { client } = await serve();
    client.send(Buffer.concat([extensionFrame('no-such@example.com', Buffer.from('x')), identitiesFrame()]));
    expect((await client.reply())[0]).toBe(FAILURE);
    expect((await client.reply())[0]).toBe(IDENTITIES_ANSWER);
  });

  describe('processSessionBind', () => {
    it('a valid binding succeeds and reaches the backend; a bad signature or a truncated body is refused', async () => {
      const { client, backend } = await serve();
      const host = hostKey();
      const impostor = generateKeyPairSync('ed25519').privateKey;
      const id = Buffer.alloc(32, 1);
      client.send(host.bind(Buffer.alloc(32, 2), true, impostor));
      expect((await client.reply())[0]).toBe(EXTENSION_FAILURE);
      client.send(extensionFrame('session-bind@openssh.com', sshString(host.blob)));
      expect((await client.reply())[0]).toBe(EXTENSION_FAILURE);
      client.send(host.bind(Buffer.alloc(0), true));
      expect((await client.reply())[0]).toBe(EXTENSION_FAILURE);
      client.send(host.bind(id, false));
      expect((await client.reply())[0]).toBe(SUCCESS);
      client.send(signRequestFrame(KEY_BLOB, Buffer.from('m')));
      expect((await client.reply())[0]).toBe(SIGN_RESPONSE);
      expect(backend.contexts.at(-1)!.bindings).toEqual([{ hostKey: host.blob, sessionId: id, isForwarding: false }]);
    });

    it('a bind that failed is remembered (sessionBindAttempted), as OpenSSH\'s session_bind_attempted: ssh-add -h keys are then refused', async () => {
      const { client, backend } = await serve();
      client.send(identitiesFrame());
      await client.reply();
      expect(backend.contexts.at(-1)!.sessionBindAttempted).toBeUndefined();
      client.send(extensionFrame('session-bind@openssh.com', sshString(hostKey().blob)));
      expect((await client.reply())[0]).toBe(EXTENSION_FAILURE);
      client.send(identitiesFrame());
      await client.reply();
      expect(backend.contexts.at(-1)).toMatchObject({ bindings: [], sessionBindAttempted: true });
    });

    it('a host certificate (ssh-keygen -s -h) binds: checked under its CA, verified with the certified key, recorded as given', async () => {
      const { client, backend } = await serve();
      const host = hostKey();
      const dir = mkdtempSync(join(tmpdir(), 'keyhold-conn-cert-'));
      cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
      const ca = generateKeyPair(dir, 'host_ca', 'ed25519');
      writeFileSync(join(dir, 'host.pub'), `ssh-ed25519 ${host.blob.toString('base64')} host\n`);
      const cert = signCertificate(ca.path, join(dir, 'host.pub'), { keyId: 'bound-host', principals: ['host.example'], host: true }).blob;
      const forged = Buffer.from(cert);
      const at = forged.indexOf(Buffer.from('bound-host'));
      forged[at] = forged[at]! ^ 0x01;
      const id = Buffer.alloc(32, 4);
      const impostor = generateKeyPairSync('ed25519').privateKey;
      client.send(host.bind(Buffer.alloc(32, 5), true, undefined, forged));
      expect((await client.reply())[0], 'a certificate whose CA signature fails').toBe(EXTENSION_FAILURE);
      client.send(host.bind(Buffer.alloc(32, 6), true, impostor, cert));
      expect((await client.reply())[0], 'a session signed by another key than the certified one').toBe(EXTENSION_FAILURE);
      client.send(host.bind(id, false, undefined, cert));
      expect((await client.reply())[0]).toBe(SUCCESS);
      client.send(identitiesFrame());
      await client.reply();
      expect(backend.contexts.at(-1)!.bindings).toEqual([{ hostKey: cert, sessionId: id, isForwarding: false }]);
    });

    it('forwarding hops add bindings; a repeated session id needs the same host key; nothing rebinds an authentication binding', async () => {
      const { client } = await serve();
      const hop1 = hostKey();
      const hop2 = hostKey();
      const id1 = Buffer.alloc(32, 1);
      const id2 = Buffer.alloc(32, 2);
      const expectReply = async (bytes: Buffer, type: number, what: string) => {
        client.send(bytes);
        expect((await client.reply())[0], what).toBe(type);
      };
      await expectReply(hop1.bind(id1, true), SUCCESS, 'first forwarding hop');
      await expectReply(hop1.bind(id1, true), SUCCESS, 'same session, same host key');
      await expectReply(hop2.bind(id1, true), EXTENSION_FAILURE, 'same session, another host key');
      await expectReply(hop2.bind(id2, false), SUCCESS, 'the authentication hop');
      await expectReply(hop2.bind(id2, false), EXTENSION_FAILURE, 'rebinding after authentication');
      await expectReply(hop1.bind(Buffer.alloc(32, 3), true), EXTENSION_FAILURE, 'a new hop after authentication');
    });
  });
});

describe('processUnsupported and malformed requests', () => {
  it('answer FAILURE and the connection goes on', async () => {
    const { client } = await serve();
    client.send(
      Buffer.concat([
        frame(Buffer.of(200, 1, 2, 3)), // unknown type
        frame(Buffer.concat([Buffer.of(13), u32(1000)])), // sign request whose key blob is cut short
        frame(Buffer.concat([signPayload(KEY_BLOB, Buffer.from('x')), Buffer.of(0)])), // trailing byte
        identitiesFrame(),
      ]),
    );
    expect((await client.reply())[0]).toBe(FAILURE);
    expect((await client.reply())[0]).toBe(FAILURE);
    expect((await client.reply())[0]).toBe(FAILURE);
    expect((await client.reply())[0]).toBe(IDENTITIES_ANSWER);
    expect(client.closed).toBe(false);
  });
});

describe('the connection loop', () => {
  for (const [what, header] of [
    ['an oversize frame', u32(256 * 1024 + 1)],
    ['a zero-length frame', u32(0)],
  ] as const) {
    it(`${what} closes the connection after answering what came before it`, async () => {
      const { client, backend } = await serve();
      backend.signWith = (data) => later(20, signed(data));
      client.send(Buffer.concat([identitiesFrame(), signRequestFrame(KEY_BLOB, Buffer.from('before')), header, identitiesFrame()]));
      expect((await client.reply())[0]).toBe(IDENTITIES_ANSWER);
      expect(signatureIn(await client.reply()).toString()).toBe('sig:before');
      await client.waitClosed(3000);
      expect(client.frames).toHaveLength(2);
      expect(backend.identityCalls).toBe(1);
    });
  }

  it('admit() false closes the connection without an answer and without asking the backend', async () => {
    let admitted = true;
    const { client, backend } = await serve({ admit: () => admitted });
    client.send(identitiesFrame());
    await client.reply();
    admitted = false;
    client.send(Buffer.concat([identitiesFrame(), signRequestFrame(KEY_BLOB, Buffer.from('x'))]));
    await client.waitClosed(3000);
    expect(client.frames).toHaveLength(1);
    expect(backend.identityCalls).toBe(1);
    expect(backend.signCalls).toBe(0);
  });

  it('pipelines many requests in one chunk, ready and Promise-answered mixed, all in order', async () => {
    const { client, backend } = await serve();
    backend.signWith = (data) => (data[0]! % 3 === 0 ? new Promise((resolve) => setImmediate(() => resolve(signed(data)))) : signed(data));
    const count = 300;
    const requests: Buffer[] = [];
    for (let i = 0; i < count; i++) requests.push(i % 5 === 4 ? identitiesFrame() : signRequestFrame(KEY_BLOB, Buffer.of(i % 256, i >> 8)));
    client.send(Buffer.concat(requests));
    for (let i = 0; i < count; i++) {
      const reply = await client.reply();
      if (i % 5 === 4) expect(reply[0], `reply ${i}`).toBe(IDENTITIES_ANSWER);
      else expect(signatureIn(reply), `reply ${i}`).toEqual(fakeSignature(Buffer.of(i % 256, i >> 8)));
    }
  });

  it('stops reading while a client does not read its replies, and resumes when it does', async () => {
    const { client, backend } = await serve({ maxPendingWrite: 64 * 1024 });
    const count = 80;
    const payload = (i: number) => Buffer.concat([Buffer.of(i), Buffer.alloc(60 * 1024, i)]);
    client.socket.pause();
    for (let i = 0; i < count; i++) client.send(signRequestFrame(KEY_BLOB, payload(i)));
    await later(300, null);
    // Kernel buffers both ways hold a few ~60 KiB replies; without backpressure all 80 would be signed.
    expect(backend.signCalls).toBeLessThan(30);
    client.socket.resume();
    for (let i = 0; i < count; i++) expect(signatureIn(await client.reply()).subarray(4, 5)[0], `reply ${i}`).toBe(i);
    expect(backend.signCalls).toBe(count);
  });

  it('closes a client whose one read asks for far more reply bytes than it may leave unread', async () => {
    // 5-byte identities requests whose ~1 KiB answers the client never reads: pausing after the
    // read comes too late, since one 64 KiB read alone asks for ~13 MB of replies.
    const backend = new FakeBackend();
    backend.comment = 'c'.repeat(1000);
    const { client, serverClosed, logs } = await serve({ maxPendingWrite: 64 * 1024 }, backend);
    client.socket.pause();
    client.send(Buffer.concat(Array.from({ length: 13_000 }, () => identitiesFrame())));
    await serverClosed;
    expect(backend.identityCalls).toBeLessThanOrEqual(300);
    expect(logs.some((l) => l.msg === 'client does not read its replies; closing agent connection')).toBe(true);
  });

  it('stops reading while too many requests wait for a signature, and resumes as they are answered', async () => {
    const { client, backend } = await serve();
    const held: (() => void)[] = [];
    backend.signWith = (data) => new Promise((resolve) => held.push(() => resolve(signed(data))));
    const count = 150;
    // ~60 KiB each, so that they reach the server in many chunks (the bound applies between chunks).
    for (let i = 0; i < count; i++) client.send(signRequestFrame(KEY_BLOB, Buffer.concat([Buffer.of(i), Buffer.alloc(60 * 1024)])));
    await eventually(() => backend.signCalls >= 64, 'the first 64 requests');
    await later(200, null);
    expect(backend.signCalls).toBeLessThan(80);
    const release = setInterval(() => held.splice(0).forEach((answer) => answer()), 5);
    try {
      for (let i = 0; i < count; i++) expect(signatureIn(await client.reply())[4], `reply ${i}`).toBe(i);
    } finally {
      clearInterval(release);
    }
  });

  describe('half-close', () => {
    it('a client that half-closes gets every reply, the signatures still being made included, then EOF', async () => {
      const { client, backend, serverClosed } = await serve();
      backend.signWith = (data) => later(30, signed(data));
      client.send(Buffer.concat([1, 2, 3].map((i) => signRequestFrame(KEY_BLOB, Buffer.from(`m${i}`)))));
      client.end();
      await client.waitClosed(3000);
      expect(client.frames.map((f) => signatureIn(f).toString())).toEqual(['sig:m1', 'sig:m2', 'sig:m3']);
      await serverClosed;
    });

    it('the request context says the client is gone (hangup) once it stops sending or closes; its reply still goes out', async () => {
      const { client, backend } = await serve({ processStart: '123', tokenSubject: 'ci-42' });
      let answer: (r: SignResult) => void = () => {};
      backend.signWith = () => new Promise((resolve) => (answer = resolve));
      client.send(signRequestFrame(KEY_BLOB, Buffer.from('waits')));
      await client.until(() => backend.signCalls === 1, 3000, 'the sign request');
      const context = backend.contexts[0]!;
      expect(context).toMatchObject({ processStart: '123', tokenSubject: 'ci-42' });
      expect(context.hangup!.aborted).toBe(false);
      const aborted = new Promise<void>((resolve) => context.hangup!.addEventListener('abort', () => resolve()));
      client.end();
      await aborted;
      answer({ ok: false, reason: 'withdrawn' });
      expect((await client.reply())[0]).toBe(FAILURE);
    });

    it('a signature that never comes does not hold a half-closed connection past the idle timeout', async () => {
      const { client, backend, serverClosed } = await serve({ idleTimeoutMs: 200 });
      backend.signWith = () => new Promise(() => {});
      client.send(signRequestFrame(KEY_BLOB, Buffer.from('never')));
      client.end();
      await client.waitClosed(3000);
      await serverClosed;
      expect(client.frames).toHaveLength(0);
    });

    it('with ready replies, and with nothing pending, the connection closes promptly', async () => {
      for (const requests of [Buffer.concat([identitiesFrame(), identitiesFrame()]), null]) {
        const { client, serverClosed } = await serve();
        if (requests) client.send(requests);
        client.end();
        const started = Date.now();
        await client.waitClosed(2000);
        expect(Date.now() - started).toBeLessThan(1000);
        expect(client.frames).toHaveLength(requests ? 2 : 0);
        await serverClosed;
      }
    });
  });

  it('registers each of its listeners once', async () => {
    const { socket, listenersBefore } = await serve();
    for (const event of ['data', 'end', 'error', 'timeout', 'drain']) {
      expect(socket.listenerCount(event) - listenersBefore.get(event)!, event).toBeLessThanOrEqual(1);
    }
    expect(socket.listenerCount('timeout') - listenersBefore.get('timeout')!).toBe(1);
  });

  it('keeps a connection whose request waits (a confirmation) past idleTimeoutMs, and answers it', async () => {
    const { client, backend } = await serve({ idleTimeoutMs: 150 });
    backend.signWith = (data) => later(600, signed(data));
    client.send(signRequestFrame(KEY_BLOB, Buffer.from('waits for a human')));
    expect((await client.reply())[0]).toBe(SIGN_RESPONSE);
    client.end();
  });

  it('closes an idle connection after idleTimeoutMs', async () => {
    const { client, serverClosed } = await serve({ idleTimeoutMs: 150 });
    client.send(identitiesFrame());
    await client.reply();
    const started = Date.now();
    await client.waitClosed(3000);
    expect(Date.now() - started).toBeGreaterThanOrEqual(100);
    await serverClosed;
  });
});

describe('memory budget', () => {
  it('replies the client leaves unread are charged too: past the budget the connection is closed, and all is returned', async () => {
    const backend = new FakeBackend();
    backend.comment = 'c'.repeat(1000);
    const budget = new FakeBudget(256 * 1024);
    // A 1 MiB write limit and a 4 MiB cap per read: only the budget can stop ~1 MB of unread answers.
    const { client, serverClosed } = await serve({ maxPendingWrite: 1024 * 1024, memory: budget }, backend);
    client.socket.pause();
    client.send(Buffer.concat(Array.from({ length: 1000 }, () => identitiesFrame())));
    await serverClosed;
    expect(budget.refusals).toBeGreaterThan(0);
    expect(budget.reserved).toBe(0);
  });

  /** A sign request of `size` bytes in all (framed), cut after `sent` bytes. */
  const bigRequest = (size: number) => signRequestFrame(KEY_BLOB, Buffer.alloc(size - 4 - 1 - 4 - KEY_BLOB.length - 4 - 4, 1));

  it('reserves as a partial frame grows and releases all of it when the frame completes', async () => {
    const memory = new FakeBudget();
    const { client } = await serve({ memory });
    const request = bigRequest(200_000);
    client.send(request.subarray(0, 5_000));
    await eventually(() => memory.reserved >= 5_000 - 4, 'the first reservation');
    const first = memory.reserved;
    client.send(request.subarray(5_000, 120_000));
    await eventually(() => memory.reserved > first, 'the reservation to grow');
    expect(memory.reserved).toBeGreaterThanOrEqual(120_000 - 4);
    // Never more than the frame's announced length.
    expect(memory.reserved).toBeLessThanOrEqual(200_000 - 4);
    client.send(request.subarray(120_000));
    expect((await client.reply())[0]).toBe(SIGN_RESPONSE);
    expect(memory.reserved).toBe(0);
    expect(memory.peak).toBeLessThanOrEqual(200_000 - 4);
  });

  const closePaths: [string, Partial<ConnectionOptions>, (h: Harness, rest: Buffer) => void][] = [
    ['the client goes away', {}, (h) => h.client.close()],
    ['the client half-closes mid-frame', {}, (h) => h.client.end()],
    ['the idle timeout', { idleTimeoutMs: 200 }, () => {}],
    ['a protocol error after the frame', {}, (h, rest) => h.client.send(Buffer.concat([rest, u32(0)]))],
  ];
  for (const [path, options, provoke] of closePaths) {
    it(`releases everything when the connection ends: ${path}`, async () => {
      const memory = new FakeBudget();
      const harness = await serve({ ...options, memory });
      const request = bigRequest(100_000);
      harness.client.send(request.subarray(0, 30_000));
      await eventually(() => memory.reserved > 0, 'a reservation');
      provoke(harness, request.subarray(30_000));
      await harness.serverClosed;
      expect(memory.reserved).toBe(0);
    });
  }

  it('releases everything when admit() turns false as the frame completes', async () => {
    const memory = new FakeBudget();
    let admitted = true;
    const { client, serverClosed } = await serve({ memory, admit: () => admitted });
    const request = bigRequest(100_000);
    client.send(request.subarray(0, 30_000));
    await eventually(() => memory.reserved > 0, 'a reservation');
    admitted = false;
    client.send(Buffer.concat([request.subarray(30_000), bigRequest(100_000).subarray(0, 50_000)]));
    await serverClosed;
    expect(client.frames).toHaveLength(0);
    expect(memory.reserved).toBe(0);
  });

  it('a refused reservation closes the connection (logged at debug) and holds nothing', async () => {
    const memory = new FakeBudget(16 * 1024);
    const { client, logs, serverClosed } = await serve({ memory });
    client.send(identitiesFrame());
    await client.reply();
    client.send(bigRequest(200_000).subarray(0, 60_000));
    await client.waitClosed(3000);
    await serverClosed;
    expect(memory.refusals).toBeGreaterThan(0);
    expect(memory.reserved).toBe(0);
    expect(logs.some((l) => l.level === 20 && /memory budget/.test(l.msg))).toBe(true);
  });
});
