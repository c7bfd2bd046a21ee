// End-to-end: real OpenSSH clients (ssh-add, ssh-keygen -Y) and two independent agent clients
// (a hand-built SIGN_REQUEST checked with @noble/ed25519, and ssh2's OpenSSHAgent) against one
// `keyhold serve` holding two scopes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { createPublicKey, randomBytes, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ed from '@noble/ed25519';
import ssh2, { type BaseAgent, type ParsedKey, type SigningRequestOptions } from 'ssh2';
import { frame } from '../../src/agent-protocol/framing.js';
import { encodeRequest, parseResponse, type AgentResponse } from '../../src/agent-protocol/messages.js';
import { verifySsh } from '../../src/agent-protocol/signature.js';
import {
  initVault,
  keyholdOk,
  makeKeyholdEnv,
  RawAgentClient,
  startServe,
  stopAllServes,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';

// ---------------------------------------------------------------------------------------------
// Small local helpers
// ---------------------------------------------------------------------------------------------

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a program with a hard time limit (SIGKILL), stdin from `input`. */
function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string | Buffer; timeoutMs?: number } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      stdio: ['pipe', 'pipe', 'pipe'],
      timeout: opts.timeoutMs ?? 20_000,
      killSignal: 'SIGKILL',
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Minimal SSH wire reader (independent of keyhold's own codec). */
class Reader {
  private off = 0;
  constructor(private readonly buf: Buffer) {}
  u32(): number {
    const v = this.buf.readUInt32BE(this.off);
    this.off += 4;
    return v;
  }
  bytes(n: number): Buffer {
    if (this.off + n > this.buf.length) throw new Error('short buffer');
    const v = this.buf.subarray(this.off, this.off + n);
    this.off += n;
    return v;
  }
  string(): Buffer {
    return this.bytes(this.u32());
  }
  get remaining(): number {
    return this.buf.length - this.off;
  }
}

/** `string alg, string sig` */
function splitSignatureBlob(blob: Buffer): { alg: string; sig: Buffer } {
  const r = new Reader(blob);
  const alg = r.string().toString();
  const sig = r.string();
  expect(r.remaining).toBe(0);
  return { alg, sig };
}

/** Decodes an armored SSHSIG file (PROTOCOL.sshsig) far enough to name the signature algorithm. */
function sshsigInfo(armored: string): { publicKey: Buffer; namespace: string; alg: string } {
  const b64 = armored
    .split('\n')
    .filter((l) => l && !l.startsWith('-----'))
    .join('');
  const raw = Buffer.from(b64, 'base64');
  expect(raw.subarray(0, 6).toString()).toBe('SSHSIG');
  const r = new Reader(raw.subarray(6));
  expect(r.u32()).toBe(1);
  const publicKey = r.string();
  const namespace = r.string().toString();
  r.string(); // reserved
  r.string(); // hash algorithm
  const { alg } = splitSignatureBlob(r.string());
  return { publicKey, namespace, alg };
}

function blobOfLine(line: string): Buffer {
  return Buffer.from(line.trim().split(/\s+/)[1]!, 'base64');
}

/** "type base64 comment" → "type base64 comment" with whitespace normalised. */
function normLine(line: string): string {
  return line.trim().split(/\s+/).join(' ');
}

function nonEmptyLines(text: string): string[] {
  return text.split('\n').map((l) => l.trim()).filter(Boolean);
}

/** One request/response round trip on a raw connection. */
async function roundTrip(client: RawAgentClient, request: Parameters<typeof encodeRequest>[0]): Promise<{ raw: Buffer; parsed: AgentResponse }> {
  client.send(frame(encodeRequest(request)));
  const raw = await client.reply(5000);
  return { raw, parsed: parseResponse(raw) };
}

// ---------------------------------------------------------------------------------------------
// Fixture: one daemon, scopes web and ops
// ---------------------------------------------------------------------------------------------

interface KeyInfo {
  name: string;
  fingerprint: string;
  pubLine: string;
  blob: Buffer;
  scope: 'web' | 'ops';
}

interface KeyJson {
  fingerprint: string;
  type: string;
  bits: number;
  comment: string;
  scopes: string[];
  public: string;
}

let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
const keys: Record<string, KeyInfo> = {};
let webSock: string;
let opsSock: string;

function generate(name: string, scope: 'web' | 'ops', type: string, bits?: number): void {
  const args = ['key', 'generate', scope, '--type', type, '--comment', `e2e-${name}`, '--json'];
  if (bits !== undefined) args.push('--bits', String(bits));
  const out = JSON.parse(keyholdOk(k, args)) as KeyJson;
  keys[name] = { name, fingerprint: out.fingerprint, pubLine: out.public, blob: blobOfLine(out.public), scope };
}

function withAgent(sock: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(env)) if (name.startsWith('KEYHOLD_')) delete env[name];
  env.SSH_AUTH_SOCK = sock;
  return env;
}

function daemonLog(): string {
  return `\n--- keyhold serve stderr (tail) ---\n${serve?.stderr().slice(-4000) ?? ''}`;
}

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-e2e-clients-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-e2e-clients-work-'));
  initVault(k);
  generate('ed25519', 'web', 'ed25519');
  generate('rsa3072', 'web', 'rsa', 3072);
  generate('ecdsa256', 'web', 'ecdsa', 256);
  generate('ecdsa384', 'ops', 'ecdsa', 384);
  generate('ecdsa521', 'ops', 'ecdsa', 521);
  generate('rsa2048', 'ops', 'rsa', 2048);
  generate('shared', 'web', 'ed25519');
  keyholdOk(k, ['key', 'assign', 'ops', keys.shared!.fingerprint]);
  serve = await startServe(k);
  webSock = keyholdOk(k, ['socket', 'web']).trim();
  opsSock = keyholdOk(k, ['socket', 'ops']).trim();
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

// ---------------------------------------------------------------------------------------------
// 1. ssh-add lists exactly the scope's keys
// ---------------------------------------------------------------------------------------------

describe('ssh-add against scope sockets', () => {
  it('the scope sockets are where `keyhold socket` says, and the daemon serves them', () => {
    expect(webSock).toBe(serve.socket('web'));
    expect(opsSock).toBe(serve.socket('ops'));
  });

  for (const scope of ['web', 'ops'] as const) {
    it(`ssh-add -l on ${scope} lists exactly the fingerprints of key list --scope ${scope}`, async () => {
      const listed = JSON.parse(keyholdOk(k, ['key', 'list', '--scope', scope, '--json'])) as KeyJson[];
      const expected = listed.map((x) => x.fingerprint).sort();
      // The fixture's own expectation, independent of keyhold's listing.
      const fixture = Object.values(keys)
        .filter((x) => x.scope === scope || x.name === 'shared')
        .map((x) => x.fingerprint)
        .sort();
      expect(expected).toEqual(fixture);
      expect(expected).toHaveLength(4);

      const r = await run('ssh-add', ['-l'], { env: withAgent(scope === 'web' ? webSock : opsSock) });
      expect(r.code, r.stderr + daemonLog()).toBe(0);
      const lines = nonEmptyLines(r.stdout);
      const fps = lines.map((l) => l.split(/\s+/)[1]!).sort();
      expect(fps).toEqual(expected);
      // Bits and type as ssh-add reports them match the vault's record.
      for (const l of lines) {
        const fp = l.split(/\s+/)[1]!;
        const rec = listed.find((x) => x.fingerprint === fp)!;
        expect(l.split(/\s+/)[0]).toBe(String(rec.bits));
        expect(l).toMatch(new RegExp(`\\(${rec.type === 'ecdsa' ? 'ECDSA' : rec.type.toUpperCase()}\\)$`));
      }
    });

    it(`ssh-add -L on ${scope} prints exactly the lines of key pub ${scope}`, async () => {
      const expected = nonEmptyLines(keyholdOk(k, ['key', 'pub', scope])).map(normLine).sort();
      expect(expected).toHaveLength(4);
      const r = await run('ssh-add', ['-L'], { env: withAgent(scope === 'web' ? webSock : opsSock) });
      expect(r.code, r.stderr + daemonLog()).toBe(0);
      expect(nonEmptyLines(r.stdout).map(normLine).sort()).toEqual(expected);
    });
  }

  it('the shared key is on both sockets and each scope-only key on exactly one', async () => {
    const web = await run('ssh-add', ['-L'], { env: withAgent(webSock) });
    const ops = await run('ssh-add', ['-L'], { env: withAgent(opsSock) });
    expect(web.code, web.stderr).toBe(0);
    expect(ops.code, ops.stderr).toBe(0);
    const onWeb = new Set(nonEmptyLines(web.stdout).map((l) => blobOfLine(l).toString('base64')));
    const onOps = new Set(nonEmptyLines(ops.stdout).map((l) => blobOfLine(l).toString('base64')));
    for (const key of Object.values(keys)) {
      const b = key.blob.toString('base64');
      if (key.name === 'shared') {
        expect(onWeb.has(b) && onOps.has(b), key.name).toBe(true);
      } else {
        expect(onWeb.has(b), `${key.name} on web`).toBe(key.scope === 'web');
        expect(onOps.has(b), `${key.name} on ops`).toBe(key.scope === 'ops');
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------
// 2. ssh-keygen -Y sign / verify through the scope socket
// ---------------------------------------------------------------------------------------------

describe('ssh-keygen -Y sign through the scope socket', () => {
  const cases: Array<{ name: string; alg: string }> = [
    { name: 'ed25519', alg: 'ssh-ed25519' },
    { name: 'rsa3072', alg: 'rsa-sha2-512' },
    { name: 'rsa2048', alg: 'rsa-sha2-512' },
    { name: 'ecdsa256', alg: 'ecdsa-sha2-nistp256' },
    { name: 'ecdsa384', alg: 'ecdsa-sha2-nistp384' },
    { name: 'ecdsa521', alg: 'ecdsa-sha2-nistp521' },
  ];

  for (const c of cases) {
    it(`${c.name}: signature verifies with ssh-keygen -Y verify, and fails on a modified message`, async () => {
      const key = keys[c.name]!;
      const dir = mkdtempSync(join(work, `sig-${c.name}-`));
      const pubFile = join(dir, 'key.pub');
      writeFileSync(pubFile, key.pubLine + '\n');
      const msgFile = join(dir, 'message');
      const message = `commit ${randomBytes(8).toString('hex')}\n\nsigned by ${c.name}\n`;
      writeFileSync(msgFile, message);
      const sock = key.scope === 'web' ? webSock : opsSock;

      const signed = await run('ssh-keygen', ['-Y', 'sign', '-n', 'git', '-f', pubFile, msgFile], { env: withAgent(sock) });
      expect(signed.code, signed.stderr + daemonLog()).toBe(0);
      const armored = readFileSync(`${msgFile}.sig`, 'utf8');
      const info = sshsigInfo(armored);
      expect(info.publicKey.equals(key.blob)).toBe(true);
      expect(info.namespace).toBe('git');
      expect(info.alg).toBe(c.alg);

      const allowed = join(dir, 'allowed_signers');
      writeFileSync(allowed, `signer@example.test namespaces="git" ${key.pubLine}\n`);
      const verifyArgs = ['-Y', 'verify', '-f', allowed, '-I', 'signer@example.test', '-n', 'git', '-s', `${msgFile}.sig`];
      const good = await run('ssh-keygen', verifyArgs, { input: message });
      expect(good.code, good.stdout + good.stderr).toBe(0);
      expect(good.stdout + good.stderr).toMatch(/Good "git" signature for signer@example\.test/);

      const bad = await run('ssh-keygen', verifyArgs, { input: message.replace('signed by', 'forged by') });
      expect(bad.code).not.toBe(0);
      expect(bad.stdout + bad.stderr).not.toMatch(/Good "git" signature/);

      // The same signature under another namespace is refused too.
      const wrongNsArgs = ['-Y', 'verify', '-f', allowed, '-I', 'signer@example.test', '-n', 'file', '-s', `${msgFile}.sig`];
      const wrongNs = await run('ssh-keygen', wrongNsArgs, { input: message });
      expect(wrongNs.code).not.toBe(0);
    });
  }

  it('a key of the other scope cannot sign through this scope socket', async () => {
    const key = keys.ecdsa384!; // ops only
    const dir = mkdtempSync(join(work, 'sig-cross-'));
    const pubFile = join(dir, 'key.pub');
    writeFileSync(pubFile, key.pubLine + '\n');
    const msgFile = join(dir, 'message');
    writeFileSync(msgFile, 'not for web\n');
    const r = await run('ssh-keygen', ['-Y', 'sign', '-n', 'git', '-f', pubFile, msgFile], { env: withAgent(webSock) });
    expect(r.code).not.toBe(0);
    expect(() => readFileSync(`${msgFile}.sig`)).toThrow();
  });
});

// ---------------------------------------------------------------------------------------------
// 2b. Raw SIGN_REQUEST for ed25519, checked with @noble/ed25519
// ---------------------------------------------------------------------------------------------

describe('raw agent protocol', () => {
  it('ed25519: the raw ssh-ed25519 signature verifies with @noble/ed25519 against the public key', async () => {
    const key = keys.ed25519!;
    const client = await RawAgentClient.connect(webSock);
    try {
      const ids = await roundTrip(client, { type: 'request-identities' });
      expect(ids.parsed.type).toBe('identities');
      const blobs = ids.parsed.type === 'identities' ? ids.parsed.identities.map((i) => i.keyBlob) : [];
      expect(blobs.some((b) => b.equals(key.blob))).toBe(true);

      const data = randomBytes(96);
      const res = await roundTrip(client, { type: 'sign', keyBlob: key.blob, data, flags: 0 });
      expect(res.raw[0], daemonLog()).toBe(14);
      if (res.parsed.type !== 'signature') throw new Error(`expected a signature, got ${res.parsed.type}`);
      const { alg, sig } = splitSignatureBlob(res.parsed.signature);
      expect(alg).toBe('ssh-ed25519');
      expect(sig).toHaveLength(64);

      // The public key: string "ssh-ed25519", string pk (32 bytes)
      const r = new Reader(key.blob);
      expect(r.string().toString()).toBe('ssh-ed25519');
      const pk = r.string();
      expect(pk).toHaveLength(32);

      expect(await ed.verifyAsync(new Uint8Array(sig), new Uint8Array(data), new Uint8Array(pk))).toBe(true);
      const tampered = Buffer.from(data);
      tampered[0]! ^= 1;
      expect(await ed.verifyAsync(new Uint8Array(sig), new Uint8Array(tampered), new Uint8Array(pk))).toBe(false);
      // Ed25519 is deterministic: the same request gives the same signature.
      const again = await roundTrip(client, { type: 'sign', keyBlob: key.blob, data, flags: 0 });
      expect(again.parsed.type === 'signature' && again.parsed.signature.equals(res.parsed.signature)).toBe(true);
    } finally {
      client.close();
    }
  });

  it('a sign request for a key of another scope gets SSH_AGENT_FAILURE and the connection goes on', async () => {
    const client = await RawAgentClient.connect(webSock);
    try {
      const refused = await roundTrip(client, { type: 'sign', keyBlob: keys.ecdsa521!.blob, data: randomBytes(32), flags: 0 });
      expect([...refused.raw]).toEqual([5]);
      const ok = await roundTrip(client, { type: 'sign', keyBlob: keys.ecdsa256!.blob, data: randomBytes(32), flags: 0 });
      expect(ok.raw[0]).toBe(14);
    } finally {
      client.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// 3. RSA flags
// ---------------------------------------------------------------------------------------------

/** PEM SubjectPublicKeyInfo from ssh-keygen itself, so the check does not rest on keyhold's parser. */
async function rsaPublicKeyViaSshKeygen(pubLine: string, dir: string): Promise<KeyObject> {
  const file = join(dir, `rsa-${randomBytes(4).toString('hex')}.pub`);
  writeFileSync(file, pubLine + '\n');
  const r = await run('ssh-keygen', ['-e', '-m', 'PKCS8', '-f', file]);
  expect(r.code, r.stderr).toBe(0);
  return createPublicKey(r.stdout);
}

describe('RSA signature flags through the daemon', () => {
  for (const name of ['rsa3072', 'rsa2048'] as const) {
    it(`${name}: flags 2 → rsa-sha2-256, 4 → rsa-sha2-512, 0 (SHA-1) → failure, and the connection goes on`, async () => {
      const key = keys[name]!;
      const pub = await rsaPublicKeyViaSshKeygen(key.pubLine, work);
      const client = await RawAgentClient.connect(key.scope === 'web' ? webSock : opsSock);
      try {
        const data = randomBytes(64);

        const s256 = await roundTrip(client, { type: 'sign', keyBlob: key.blob, data, flags: 2 });
        if (s256.parsed.type !== 'signature') throw new Error(`flags 2: got ${s256.parsed.type}${daemonLog()}`);
        const a = splitSignatureBlob(s256.parsed.signature);
        expect(a.alg).toBe('rsa-sha2-256');
        expect(cryptoVerify('sha256', data, pub, a.sig)).toBe(true);
        expect(cryptoVerify('sha512', data, pub, a.sig)).toBe(false);
        expect(verifySsh(key.blob, s256.parsed.signature, data)).toBe(true);

        const s512 = await roundTrip(client, { type: 'sign', keyBlob: key.blob, data, flags: 4 });
        if (s512.parsed.type !== 'signature') throw new Error(`flags 4: got ${s512.parsed.type}${daemonLog()}`);
        const b = splitSignatureBlob(s512.parsed.signature);
        expect(b.alg).toBe('rsa-sha2-512');
        expect(cryptoVerify('sha512', data, pub, b.sig)).toBe(true);
        expect(cryptoVerify('sha256', data, pub, b.sig)).toBe(false);
        expect(verifySsh(key.blob, s512.parsed.signature, data)).toBe(true);
        // The modulus size shows in the signature length.
        expect(b.sig.length).toBe(name === 'rsa3072' ? 384 : 256);

        const sha1 = await roundTrip(client, { type: 'sign', keyBlob: key.blob, data, flags: 0 });
        expect([...sha1.raw]).toEqual([5]);

        // Same connection, next request still served.
        expect(client.closed).toBe(false);
        const after = await roundTrip(client, { type: 'sign', keyBlob: key.blob, data: Buffer.from('after refusal'), flags: 2 });
        if (after.parsed.type !== 'signature') throw new Error(`after refusal: got ${after.parsed.type}${daemonLog()}`);
        expect(cryptoVerify('sha256', Buffer.from('after refusal'), pub, splitSignatureBlob(after.parsed.signature).sig)).toBe(true);
        const ids = await roundTrip(client, { type: 'request-identities' });
        expect(ids.parsed.type === 'identities' && ids.parsed.identities.length).toBe(4);
      } finally {
        client.close();
      }
    });
  }
});

// ---------------------------------------------------------------------------------------------
// 6. ssh2's agent client
// ---------------------------------------------------------------------------------------------

function ssh2Identities(agent: BaseAgent): Promise<ParsedKey[]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('ssh2 getIdentities timed out')), 10_000);
    agent.getIdentities((err, found) => {
      clearTimeout(timer);
      if (err) reject(err);
      else resolve((found ?? []) as ParsedKey[]);
    });
  });
}

function ssh2Sign(agent: BaseAgent, key: ParsedKey, data: Buffer, options: SigningRequestOptions = {}): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('ssh2 sign timed out')), 10_000);
    agent.sign(key, data, options, (err, sig) => {
      clearTimeout(timer);
      if (err) reject(err);
      else resolve(sig!);
    });
  });
}

describe("ssh2's OpenSSHAgent as an independent client", () => {
  it('lists the same keys as ssh-add -L for each scope', async () => {
    for (const sock of [webSock, opsSock]) {
      const agent = ssh2.createAgent(sock);
      expect(agent).toBeInstanceOf(ssh2.OpenSSHAgent);
      const ids = await ssh2Identities(agent);
      const viaSsh2 = ids.map((id) => `${id.type} ${id.getPublicSSH().toString('base64')}`).sort();
      const r = await run('ssh-add', ['-L'], { env: withAgent(sock) });
      expect(r.code, r.stderr).toBe(0);
      const viaSshAdd = nonEmptyLines(r.stdout).map((l) => l.split(/\s+/).slice(0, 2).join(' ')).sort();
      expect(viaSsh2).toEqual(viaSshAdd);
      expect(viaSsh2).toHaveLength(4);
      // Comments come through as well.
      const comments = ids.map((id) => id.comment).sort();
      const expectedComments = Object.values(keys)
        .filter((x) => x.name === 'shared' || x.scope === (sock === webSock ? 'web' : 'ops'))
        .map((x) => `e2e-${x.name}`)
        .sort();
      expect(comments).toEqual(expectedComments);
    }
  });

  it('gets an ed25519 signature that node:crypto verifies against the public key', async () => {
    const agent = new ssh2.OpenSSHAgent(webSock);
    const ids = await ssh2Identities(agent);
    const id = ids.find((x) => x.getPublicSSH().equals(keys.ed25519!.blob));
    expect(id, 'ed25519 key listed by ssh2').toBeDefined();
    const data = randomBytes(200);
    const sig = await ssh2Sign(agent, id!, data);
    expect(sig).toHaveLength(64);
    const pk = new Reader(keys.ed25519!.blob);
    pk.string();
    const pub = createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: pk.string().toString('base64url') }, format: 'jwk' });
    expect(cryptoVerify(null, data, pub, sig)).toBe(true);
    expect(cryptoVerify(null, Buffer.concat([data, Buffer.of(0)]), pub, sig)).toBe(false);
  });

  it('gets an rsa-sha2-256 signature (hash: sha256) that node:crypto verifies', async () => {
    const agent = new ssh2.OpenSSHAgent(opsSock);
    const ids = await ssh2Identities(agent);
    const id = ids.find((x) => x.getPublicSSH().equals(keys.rsa2048!.blob));
    expect(id).toBeDefined();
    const data = randomBytes(50);
    const sig = await ssh2Sign(agent, id!, data, { hash: 'sha256' });
    const pub = await rsaPublicKeyViaSshKeygen(keys.rsa2048!.pubLine, work);
    expect(cryptoVerify('sha256', data, pub, sig)).toBe(true);
  });
});
