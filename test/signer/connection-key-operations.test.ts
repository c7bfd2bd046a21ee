// serveConnection's key operations (ssh-add's add, remove, lock, unlock) in-process over a real
// Unix socket, with frames OpenSSH's ssh-add sent: a backend with the optional methods gets the
// parsed values, one without answers FAILURE, a malformed add is FAILURE and the connection goes
// on, replies keep request order, and no secret reaches the log.
import { afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import type { AddIdentityRequest } from '../../src/agent-protocol/messages.js';
import { serveConnection } from '../../src/signer/connection.js';
import type { AgentBackend, KeyOperationResult, RequestContext } from '../../src/signer/backend.js';
import { addExchanges, addFixture } from '../agent-protocol/add-frames-fixture.js';
import { frameBytes, parseLine } from '../agent-protocol/golden-fixture.js';
import { frame, identitiesFrame, RawConn, sshString } from '../helpers/raw-wire.js';

const FAILURE = 5;
const SUCCESS = 6;
const IDENTITIES_ANSWER = 12;

/** The framed request ssh-add sent for `client` with `keyType`. */
function golden(client: string, keyType: string | null = 'ssh-ed25519'): Buffer {
  const found = addExchanges().find((p) => p.request.client === client && p.request.keyType === keyType);
  if (!found) throw new Error(`no golden frame for ${client}`);
  return frameBytes(found.request);
}

const later = <T>(ms: number, value: T) => new Promise<T>((resolve) => setTimeout(() => resolve(value), ms));

interface Call {
  method: string;
  args: unknown[];
}

/** Records every call; answers with `answer` (true by default). */
class KeyBackend implements AgentBackend {
  readonly calls: Call[] = [];
  answer: (method: string) => KeyOperationResult = () => true;
  /** The passphrase buffers handed over, as given (to see they are wiped afterwards). */
  readonly passphrases: Buffer[] = [];

  identities() {
    return [];
  }
  sign() {
    return { ok: false, reason: 'unknown-key' } as const;
  }
  addIdentity(request: AddIdentityRequest, _context: RequestContext) {
    this.calls.push({ method: 'addIdentity', args: [request] });
    return this.answer('addIdentity');
  }
  removeIdentity(keyBlob: Buffer, _context: RequestContext) {
    this.calls.push({ method: 'removeIdentity', args: [Buffer.from(keyBlob)] });
    return this.answer('removeIdentity');
  }
  removeAllIdentities(_context: RequestContext) {
    this.calls.push({ method: 'removeAllIdentities', args: [] });
    return this.answer('removeAllIdentities');
  }
  lock(passphrase: Buffer, _context: RequestContext) {
    this.passphrases.push(passphrase);
    this.calls.push({ method: 'lock', args: [passphrase.toString()] });
    return this.answer('lock');
  }
  unlock(passphrase: Buffer, _context: RequestContext) {
    this.passphrases.push(passphrase);
    this.calls.push({ method: 'unlock', args: [passphrase.toString()] });
    return this.answer('unlock');
  }
}

/** Only what the wire server needed before key operations existed. */
const legacyBackend: AgentBackend = { identities: () => [], sign: () => ({ ok: false, reason: 'unknown-key' }) };

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

async function serve(backend: AgentBackend): Promise<{ client: RawConn; logs: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-keyops-'));
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      logs.push(...chunk.toString().split('\n').filter(Boolean));
      done();
    },
  });
  let accepted: Socket | undefined;
  const server = createServer((socket) => {
    accepted = socket;
    serveConnection(socket, backend, {
      peer: { kind: 'unix', pid: process.pid, uid: 0, gid: 0, exe: null },
      log: pino({ level: 'debug' }, sink),
      idleTimeoutMs: 10_000,
      maxPendingWrite: 64 * 1024,
    });
  });
  const path = join(dir, 'agent.sock');
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const client = await RawConn.connect(path);
  cleanups.push(() => {
    client.close();
    accepted?.destroy();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { client, logs };
}

describe('a backend with the key operations', () => {
  it('is called with the parsed add (key, comment, constraints) and its answer is the reply', async () => {
    const backend = new KeyBackend();
    const { client } = await serve(backend);
    client.send(golden('ssh-add -c KEY'));
    expect((await client.reply())[0]).toBe(SUCCESS);
    client.send(golden('ssh-add -h DEST KEY', 'ssh-rsa'));
    expect((await client.reply())[0]).toBe(SUCCESS);

    const [confirm, destination] = backend.calls.map((c) => c.args[0] as AddIdentityRequest);
    expect(confirm!.key.fingerprint).toBe(addFixture.keys['ssh-ed25519']!.fingerprint);
    expect(confirm!.comment).toBe(addFixture.keys['ssh-ed25519']!.comment);
    expect(confirm!.constraints).toEqual({ lifetimeSeconds: null, confirm: true, destinations: [] });
    expect(confirm!.key.key.type).toBe('private');
    expect(destination!.key.fingerprint).toBe(addFixture.keys['ssh-rsa']!.fingerprint);
    expect(destination!.constraints.destinations[0]!.to.hostKeys[0]!.keyBlob.equals(parseLine(addFixture.sshdHostKey).blob)).toBe(true);
  });

  it('remove, remove all, lock and unlock reach their methods; a false answer is FAILURE', async () => {
    const backend = new KeyBackend();
    backend.answer = (method) => method !== 'unlock';
    const { client } = await serve(backend);
    client.send(Buffer.concat([golden('ssh-add -d KEY'), golden('ssh-add -D', null), golden('ssh-add -x', null), golden('ssh-add -X', null)]));
    expect([(await client.reply())[0], (await client.reply())[0], (await client.reply())[0], (await client.reply())[0]]).toEqual([SUCCESS, SUCCESS, SUCCESS, FAILURE]);
    expect(backend.calls.map((c) => c.method)).toEqual(['removeIdentity', 'removeAllIdentities', 'lock', 'unlock']);
    expect((backend.calls[0]!.args[0] as Buffer).equals(parseLine(addFixture.keys['ssh-ed25519']!.publicKey).blob)).toBe(true);
    expect(backend.calls[2]!.args[0]).toBe(addFixture.lockPassword);
    expect(backend.calls[3]!.args[0]).toBe(addFixture.lockPassword);
  });

  it('answers that come later (Promises) keep request order, and a rejection is FAILURE', async () => {
    const backend = new KeyBackend();
    backend.answer = (method) => (method === 'unlock' ? later(60, true) : method === 'lock' ? Promise.reject(new Error(`secret ${addFixture.lockPassword}`)) : true);
    const { client, logs } = await serve(backend);
    client.send(Buffer.concat([golden('ssh-add -X', null), identitiesFrame(), golden('ssh-add -x', null), golden('ssh-add -D', null)]));
    expect([(await client.reply())[0], (await client.reply())[0], (await client.reply())[0], (await client.reply())[0]]).toEqual([
      SUCCESS,
      IDENTITIES_ANSWER,
      FAILURE,
      SUCCESS,
    ]);
    expect(logs.join('\n')).not.toContain(addFixture.lockPassword);
  });

  it('the passphrase handed over is wiped once the answer has settled', async () => {
    const backend = new KeyBackend();
    backend.answer = (method) => (method === 'unlock' ? later(20, true) : true);
    const { client } = await serve(backend);
    client.send(Buffer.concat([golden('ssh-add -x', null), golden('ssh-add -X', null)]));
    await client.reply();
    await client.reply();
    expect(backend.passphrases).toHaveLength(2);
    for (const passphrase of backend.passphrases) expect(passphrase.equals(Buffer.alloc(passphrase.length))).toBe(true);
  });

  it('an empty lock or unlock passphrase is FAILURE without asking the backend (as OpenSSH)', async () => {
    const backend = new KeyBackend();
    const { client } = await serve(backend);
    client.send(Buffer.concat([frame(Buffer.concat([Buffer.of(22), sshString('')])), frame(Buffer.concat([Buffer.of(23), sshString('')]))]));
    expect([(await client.reply())[0], (await client.reply())[0]]).toEqual([FAILURE, FAILURE]);
    expect(backend.calls).toEqual([]);
  });

  it('a backend that throws answers FAILURE; its message is not logged', async () => {
    const backend = new KeyBackend();
    backend.answer = () => {
      throw new Error(`leaked ${addFixture.lockPassword}`);
    };
    const { client, logs } = await serve(backend);
    client.send(Buffer.concat([golden('ssh-add -x', null), identitiesFrame()]));
    expect([(await client.reply())[0], (await client.reply())[0]]).toEqual([FAILURE, IDENTITIES_ANSWER]);
    expect(logs.join('\n')).not.toContain('leaked');
  });

  it('logs the operation and the key fingerprint at debug, never the key, the comment or the passphrase', async () => {
    const backend = new KeyBackend();
    const { client, logs } = await serve(backend);
    client.send(Buffer.concat([golden('ssh-add KEY'), golden('ssh-add -x', null)]));
    await client.reply();
    await client.reply();
    const text = logs.join('\n');
    expect(text).toContain(addFixture.keys['ssh-ed25519']!.fingerprint);
    expect(text).not.toContain(addFixture.lockPassword);
    const addPayload = golden('ssh-add KEY').subarray(4);
    // The private part in any encoding a log might use.
    const secret = addPayload.subarray(addPayload.length - 4 - addFixture.keys['ssh-ed25519']!.comment.length - 64, addPayload.length - 4 - addFixture.keys['ssh-ed25519']!.comment.length - 32);
    for (const encoding of ['hex', 'base64', 'base64url'] as const) expect(text).not.toContain(secret.toString(encoding));
  });
});

describe('a backend without the key operations', () => {
  it('answers FAILURE to each, as before, and goes on serving', async () => {
    const { client } = await serve(legacyBackend);
    const requests = [
      golden('ssh-add KEY'),
      golden('ssh-add -t 60 KEY'),
      golden('ssh-add -d KEY'),
      golden('ssh-add -D', null),
      golden('ssh-add -x', null),
      golden('ssh-add -X', null),
    ];
    client.send(Buffer.concat([...requests, identitiesFrame()]));
    for (let i = 0; i < requests.length; i++) expect((await client.reply())[0]).toBe(FAILURE);
    expect((await client.reply())[0]).toBe(IDENTITIES_ANSWER);
  });
});

describe('a malformed key operation', () => {
  it('a damaged add, a forged certificate, an unknown constraint: FAILURE, the backend is not called, the connection goes on', async () => {
    const backend = new KeyBackend();
    const { client } = await serve(backend);
    const damaged = Buffer.from(golden('ssh-add KEY'));
    // Flip a bit of the ed25519 seed: its public key no longer matches.
    const seedByte = 4 + 1 + 4 + 'ssh-ed25519'.length + 4 + 32 + 4 + 5;
    damaged[seedByte] = damaged[seedByte]! ^ 0x01;
    // A certificate whose key id was changed: its CA signature no longer verifies.
    const certificate = Buffer.from(frameBytes(addExchanges().filter((p) => p.request.client === 'ssh-add KEY (with KEY-cert.pub)')[1]!.request));
    const keyIdAt = certificate.indexOf(Buffer.from('keyhold-fixture'));
    certificate[keyIdAt] = certificate[keyIdAt]! ^ 0x01;
    const plain = golden('ssh-add KEY').subarray(4);
    const unknownConstraint = frame(Buffer.concat([Buffer.of(25), plain.subarray(1), Buffer.of(3), Buffer.alloc(4)]));
    const truncatedLock = frame(Buffer.of(22, 0, 0, 0, 9, 0x61));
    client.send(Buffer.concat([damaged, certificate, unknownConstraint, truncatedLock, identitiesFrame(), golden('ssh-add KEY')]));
    for (let i = 0; i < 4; i++) expect((await client.reply())[0]).toBe(FAILURE);
    expect((await client.reply())[0]).toBe(IDENTITIES_ANSWER);
    expect((await client.reply())[0]).toBe(SUCCESS);
    expect(backend.calls.map((c) => c.method)).toEqual(['addIdentity']);
    expect(client.closed).toBe(false);
  });

  it('an add refused as unsupported (a key type not held, an unknown constraint) is told to the backend with our reason; a damaged one is not', async () => {
    const refused: string[] = [];
    const backend = new KeyBackend();
    Object.assign(backend, { addRefused: (reason: string) => refused.push(reason) });
    const { client } = await serve(backend);
    const plain = golden('ssh-add KEY').subarray(4);
    const unknownConstraint = frame(Buffer.concat([Buffer.of(25), plain.subarray(1), Buffer.of(3), Buffer.alloc(4)]));
    const dsa = frame(Buffer.concat([Buffer.of(17), sshString('ssh-dss'), sshString('p'), sshString('q')]));
    const security = frame(Buffer.concat([Buffer.of(17), sshString('sk-ssh-ed25519@openssh.com'), sshString('x')]));
    const truncated = frame(Buffer.of(17, 0, 0, 0, 40, 0x73));
    client.send(Buffer.concat([unknownConstraint, dsa, security, truncated]));
    for (let i = 0; i < 4; i++) expect((await client.reply())[0]).toBe(FAILURE);
    expect(refused).toEqual([
      'unsupported constraint 3',
      'DSA keys are refused ("ssh-dss" signs with SHA-1 only)',
      'security keys are not supported ("sk-ssh-ed25519@openssh.com"): keyhold loads no FIDO provider',
    ]);
    expect(backend.calls).toEqual([]);
  });
});
