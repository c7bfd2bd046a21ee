// Secret hygiene over one whole session at KEYHOLD_LOG_LEVEL=debug (PRODUCT.md, "Guarantees": no
// private key, passphrase, token or secret value appears in a log line, an error message, argv of
// a child, or in the vault file in the clear). The session uses every path a secret travels: init,
// key generate (all types) and import (OpenSSH, encrypted OpenSSH, PKCS#8, PKCS#1), tokens, secrets,
// a background daemon unlocked from KEYHOLD_PASSPHRASE, lock/unlock, OpenSSH clients on a scope
// socket, a container connection over TCP (raw and through `keyhold bridge`), wrong tokens and a
// wrong passphrase, `keyhold env` and `export`, an ssh-agent factor with a real ssh-agent. Then
// every log, every file (but those whose purpose is to hold a secret), every argv and the daemons'
// environments are searched for every secret in raw, hex, base64 and base64url form: zero hits.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, type KeyObject } from 'node:crypto';
import { lstatSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import {
  frameBytes,
  KEYHOLD_BIN,
  makeKeyholdEnv,
  processAlive,
  startServe,
  stopAllServes,
  waitFor,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';
import { generateKeyPair, startSshAgent, stopAllSshAgents, type KeyPair } from '../helpers/ssh-agent.js';
import { auditKey } from '../../src/audit/audit-log.js';
import { passphraseKeks } from '../../src/unlock/passphrase.js';
import { readKeyring, unwrapMasterKey } from '../../src/vault/keyring.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';

// ---------------------------------------------------------------------------------------------
// What is searched for, and how
// ---------------------------------------------------------------------------------------------

interface Needle {
  name: string;
  bytes: Buffer;
}

/** The forms a needle may take in a log or a file; base64 at each of the three byte alignments. */
function encodings(bytes: Buffer): { form: string; bytes: Buffer }[] {
  const out = [
    { form: 'raw', bytes },
    { form: 'hex', bytes: Buffer.from(bytes.toString('hex')) },
    { form: 'HEX', bytes: Buffer.from(bytes.toString('hex').toUpperCase()) },
  ];
  const text = bytes.toString('utf8');
  if (Buffer.from(text).equals(bytes)) {
    const escaped = JSON.stringify(text).slice(1, -1);
    if (escaped !== text) out.push({ form: 'json-escaped', bytes: Buffer.from(escaped) });
  }
  for (const enc of ['base64', 'base64url'] as const) {
    for (let r = 0; r < 3; r++) {
      // Only the characters that depend on the needle's bytes alone.
      const s = Buffer.concat([Buffer.alloc(r), bytes]).toString(enc);
      const part = s.slice(r > 0 ? 4 : 0, Math.floor((r + bytes.length) / 3) * 4);
      if (part.length >= 16) out.push({ form: `${enc}@${r}`, bytes: Buffer.from(part) });
    }
  }
  return out;
}

function search(haystack: Buffer, needles: Needle[]): string[] {
  const hits: string[] = [];
  for (const needle of needles) {
    for (const { form, bytes } of encodings(needle.bytes)) {
      if (haystack.includes(bytes)) {
        hits.push(`${needle.name} (${form})`);
        break;
      }
    }
  }
  return hits;
}

// ---------------------------------------------------------------------------------------------
// The session's record: every process, its argv and output
// ---------------------------------------------------------------------------------------------

interface Run {
  argv: string[];
  code: number | null;
  stdout: Buffer;
  stderr: Buffer;
  /** stdout is where this command is meant to print a secret (token issue, secret get, export). */
  stdoutIsSecret: boolean;
}

const runs: Run[] = [];
const procText: { where: string; bytes: Buffer }[] = [];
const children = new Set<ChildProcess>();

function exec(
  command: string,
  argv: string[],
  options: { env: NodeJS.ProcessEnv; input?: string | Buffer; secretStdout?: boolean; cwd?: string },
): Promise<Run> {
  return new Promise((resolve, reject) => {
    const proc = spawn(command, argv, { env: options.env, stdio: ['pipe', 'pipe', 'pipe'], ...(options.cwd ? { cwd: options.cwd } : {}) });
    children.add(proc);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    proc.stdout!.on('data', (d: Buffer) => out.push(d));
    proc.stderr!.on('data', (d: Buffer) => err.push(d));
    proc.stdin!.on('error', () => {});
    proc.stdin!.end(options.input ?? '');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
    proc.once('error', reject);
    proc.once('close', (code) => {
      clearTimeout(timer);
      children.delete(proc);
      const run: Run = {
        argv: [command, ...argv],
        code,
        stdout: Buffer.concat(out),
        stderr: Buffer.concat(err),
        stdoutIsSecret: options.secretStdout ?? false,
      };
      runs.push(run);
      resolve(run);
    });
  });
}

function expectExit(run: Run, code: number): Run {
  if (run.code !== code) throw new Error(`${run.argv.join(' ')} exited ${run.code}, expected ${code}: ${run.stderr.toString()}`);
  return run;
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as { port: number }).port;
      server.close(() => resolve(port));
    });
  });
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}
const sshString = (b: Buffer) => Buffer.concat([u32(b.length), b]);

/** A raw TCP agent connection after the token handshake. */
class TcpAgent {
  private buffer = Buffer.alloc(0);
  closed = false;
  constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => (this.buffer = Buffer.concat([this.buffer, d])));
    socket.on('close', () => (this.closed = true));
    socket.on('error', () => {});
  }
  static open(port: number, token: string): Promise<TcpAgent> {
    return new Promise((resolve, reject) => {
      const s = connect(port, '127.0.0.1', () => {
        s.write(sshString(Buffer.from(token)));
        resolve(new TcpAgent(s));
      });
      s.once('error', reject);
    });
  }
  async request(payload: Buffer): Promise<Buffer | null> {
    this.socket.write(frameBytes(payload));
    await waitFor(() => this.closed || (this.buffer.length >= 4 && this.buffer.length >= 4 + this.buffer.readUInt32BE(0)), 5000, 'agent reply');
    if (this.buffer.length < 4 || this.buffer.length < 4 + this.buffer.readUInt32BE(0)) return null;
    const reply = this.buffer.subarray(4, 4 + this.buffer.readUInt32BE(0));
    this.buffer = this.buffer.subarray(4 + reply.length);
    return reply;
  }
  close(): void {
    this.socket.destroy();
  }
}

function firstIdentity(reply: Buffer): Buffer {
  expect(reply[0]).toBe(12);
  expect(reply.readUInt32BE(1)).toBeGreaterThan(0);
  return reply.subarray(9, 9 + reply.readUInt32BE(5));
}

/** The private part of an unencrypted OpenSSH ed25519 key file: its base64 body's bytes and the seed. */
function openSshEd25519(path: string): { blob: Buffer; seed: Buffer } {
  const text = readFileSync(path, 'utf8');
  const body = text.split('\n').filter((l) => l && !l.startsWith('-----')).join('');
  const blob = Buffer.from(body, 'base64');
  const magic = Buffer.from('openssh-key-v1\0');
  expect(blob.subarray(0, magic.length).equals(magic)).toBe(true);
  let off = magic.length;
  const str = () => {
    const len = blob.readUInt32BE(off);
    const value = blob.subarray(off + 4, off + 4 + len);
    off += 4 + len;
    return value;
  };
  expect(str().toString()).toBe('none'); // cipher
  str(); // kdf
  str(); // kdf options
  off += 4; // number of keys
  str(); // public key
  const priv = str();
  let p = 8; // check ints
  const pstr = () => {
    const len = priv.readUInt32BE(p);
    const value = priv.subarray(p + 4, p + 4 + len);
    p += 4 + len;
    return value;
  };
  expect(pstr().toString()).toBe('ssh-ed25519');
  pstr(); // public
  const secret = pstr(); // seed || public
  expect(secret.length).toBe(64);
  return { blob, seed: Buffer.from(secret.subarray(0, 32)) };
}

const pemBody = (pem: string) => Buffer.from(pem.split('\n').filter((l) => l && !l.startsWith('-----')).join(''), 'base64');

/** Every form of a private key worth finding: PKCS#8 DER, PKCS#1/SEC1 DER, the private scalars. */
function privateKeyNeedles(name: string, key: KeyObject): Needle[] {
  const needles: Needle[] = [{ name: `${name} PKCS#8 DER`, bytes: key.export({ format: 'der', type: 'pkcs8' }) }];
  const jwk = key.export({ format: 'jwk' });
  if (key.asymmetricKeyType === 'rsa') {
    needles.push({ name: `${name} PKCS#1 DER`, bytes: key.export({ format: 'der', type: 'pkcs1' }) });
    for (const part of ['d', 'p', 'q', 'dp', 'dq', 'qi'] as const) needles.push({ name: `${name} ${part}`, bytes: Buffer.from(jwk[part]!, 'base64url') });
  } else if (key.asymmetricKeyType === 'ec') {
    needles.push({ name: `${name} SEC1 DER`, bytes: key.export({ format: 'der', type: 'sec1' }) });
    needles.push({ name: `${name} d`, bytes: Buffer.from(jwk.d!, 'base64url') });
  } else {
    needles.push({ name: `${name} seed`, bytes: Buffer.from(jwk.d!, 'base64url') });
  }
  return needles;
}

function walk(dir: string, out: string[] = []): string[] {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    const stat = lstatSync(path);
    if (stat.isDirectory()) walk(path, out);
    else if (stat.isFile()) out.push(path);
  }
  return out;
}

function readProc(pid: number, what: 'cmdline' | 'environ', label: string): Buffer {
  const bytes = readFileSync(`/proc/${pid}/${what}`);
  procText.push({ where: `/proc/${pid}/${what} (${label})`, bytes });
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------------

let k: KeyholdEnv;
let privateDir: string;
const needles: Needle[] = [];
let bgDaemonPid = 0;
let serve: ServeHandle | null = null;
let bridge: ChildProcess | null = null;
let bridgeOutput = { stdout: '', stderr: '' };
let envChild: { pid: number; chain: { pid: number; cmdline: string[] }[]; hashes: Record<string, string | null> } | null = null;
let envRunArgv: string[] = [];
let envRunPid = 0;
const expectedHashes: Record<string, string> = {};
let daemonLog = Buffer.alloc(0);

const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

beforeAll(async () => {
  k = makeKeyholdEnv('kh-hygiene-');
  privateDir = join(k.dir, 'private');
  const work = join(k.dir, 'work');
  mkdirSync(privateDir, { mode: 0o700 });
  mkdirSync(work, { mode: 0o700 });

  const passphrase = `PASSPHRASE-${randomBytes(12).toString('hex')}`;
  writeFileSync(k.passFile, passphrase + '\n', { mode: 0o600 });
  needles.push({ name: 'the passphrase', bytes: Buffer.from(passphrase) });
  const wrongPassphrase = `WRONGPASS-${randomBytes(12).toString('hex')}`;
  const wrongPassFile = join(privateDir, 'wrong-pass');
  writeFileSync(wrongPassFile, wrongPassphrase + '\n', { mode: 0o600 });
  needles.push({ name: 'a wrong passphrase', bytes: Buffer.from(wrongPassphrase) });

  const debug: NodeJS.ProcessEnv = { ...k.env, KEYHOLD_LOG_LEVEL: 'debug' };
  const bare: NodeJS.ProcessEnv = { ...debug };
  for (const name of ['KEYHOLD_PASSPHRASE_FILE', 'KEYHOLD_PASSPHRASE', 'CREDENTIALS_DIRECTORY', 'SSH_AUTH_SOCK']) delete bare[name];
  const kh = (args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string | Buffer; secretStdout?: boolean; code?: number } = {}) =>
    exec(process.execPath, [KEYHOLD_BIN, ...args], { env: opts.env ?? debug, ...opts }).then((r) => expectExit(r, opts.code ?? 0));
  const tool = (command: string, args: string[], sock: string, code = 0) =>
    exec(command, args, { env: { PATH: process.env.PATH, SSH_AUTH_SOCK: sock, HOME: k.dir } }).then((r) => expectExit(r, code));

  // --- vault, keys of every type, imports of every format -------------------------------------
  await kh(['init']);
  const generated: Record<string, string> = {};
  for (const [type, bits] of [['ed25519'], ['rsa', '2048'], ['ecdsa'], ['ecdsa', '384'], ['ecdsa', '521']] as const) {
    const out = await kh(['key', 'generate', 'app', '--type', type, ...(bits ? ['--bits', bits] : []), '--comment', `gen-${type}-${bits ?? ''}`, '--json']);
    generated[`${type}${bits ?? ''}`] = (JSON.parse(out.stdout.toString()) as { public: string }).public;
  }

  // An OpenSSH key made by ssh-keygen; an encrypted copy of another; PKCS#8 and PKCS#1 PEM from node.
  const opensshKey = generateKeyPair(privateDir, 'imp_openssh', 'ed25519');
  const openssh = openSshEd25519(opensshKey.path);
  needles.push({ name: 'imported OpenSSH key file body', bytes: openssh.blob }, { name: 'imported OpenSSH key seed', bytes: openssh.seed });
  await kh(['key', 'import', 'app', opensshKey.path, '--comment', 'imported-openssh']);

  const encKey = generateKeyPair(privateDir, 'imp_enc', 'ed25519');
  const enc = openSshEd25519(encKey.path);
  const keyPassphrase = `KEYPASS-${randomBytes(10).toString('hex')}`;
  const keyPassFile = join(privateDir, 'key-pass');
  writeFileSync(keyPassFile, keyPassphrase + '\n', { mode: 0o600 });
  // (Test setup, not a keyhold process: ssh-keygen takes the new passphrase in argv.)
  const p = spawnSync('ssh-keygen', ['-q', '-p', '-P', '', '-N', keyPassphrase, '-f', encKey.path], { encoding: 'utf8' });
  expect(p.status, p.stderr).toBe(0);
  needles.push({ name: 'encrypted key seed', bytes: enc.seed }, { name: 'the key file passphrase', bytes: Buffer.from(keyPassphrase) });
  await kh(['key', 'import', 'app', encKey.path, '--key-passphrase-file', keyPassFile, '--comment', 'imported-encrypted']);

  const pkcs8 = generateKeyPairSync('ed25519').privateKey;
  const pkcs8Pem = pkcs8.export({ format: 'pem', type: 'pkcs8' }).toString();
  writeFileSync(join(privateDir, 'imp_pkcs8.pem'), pkcs8Pem, { mode: 0o600 });
  needles.push({ name: 'imported PKCS#8 PEM body', bytes: pemBody(pkcs8Pem) }, ...privateKeyNeedles('imported PKCS#8 ed25519', pkcs8));
  await kh(['key', 'import', 'app', join(privateDir, 'imp_pkcs8.pem'), '--comment', 'imported-pkcs8']);

  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const rsaPem = rsa.export({ format: 'pem', type: 'pkcs1' }).toString();
  writeFileSync(join(privateDir, 'imp_rsa.pem'), rsaPem, { mode: 0o600 });
  needles.push({ name: 'imported PKCS#1 PEM body', bytes: pemBody(rsaPem) }, ...privateKeyNeedles('imported RSA', rsa));
  await kh(['key', 'import', 'box', join(privateDir, 'imp_rsa.pem'), '--comment', 'imported-rsa']);

  // --- tokens ----------------------------------------------------------------------------------
  const issue = async (scope: string, subject: string, env: NodeJS.ProcessEnv = debug) => {
    const out = await kh(['token', 'issue', scope, '--subject', subject, '--json'], { env, secretStdout: true });
    const t = JSON.parse(out.stdout.toString()) as { id: string; token: string };
    needles.push({ name: `token ${subject}`, bytes: Buffer.from(t.token) });
    needles.push({ name: `token ${subject} body`, bytes: Buffer.from(t.token.slice(4)) });
    needles.push({ name: `token ${subject} random bytes`, bytes: Buffer.from(t.token.slice(4), 'base64url') });
    return t;
  };
  const appToken = await issue('app', 'ci-app');
  const boxToken = await issue('box', 'ci-box');
  const revoked = await issue('app', 'to-revoke');
  await kh(['token', 'revoke', revoked.id]);
  const plain = await kh(['token', 'issue', 'app', '--subject', 'plain'], { secretStdout: true });
  needles.push({ name: 'token plain', bytes: Buffer.from(plain.stdout.toString().trim()) });
  // One character changed: what a mistyped or forged token looks like. It must not be logged either.
  const nearMiss = appToken.token.slice(0, 20) + (appToken.token[20] === 'A' ? 'B' : 'A') + appToken.token.slice(21);
  needles.push({ name: 'near-miss token', bytes: Buffer.from(nearMiss) });

  // --- secrets ---------------------------------------------------------------------------------
  const values: Record<string, Buffer> = {
    DB_PASSWORD: Buffer.from(`SECRETVAL-db-${randomBytes(12).toString('hex')}`),
    API_KEY: Buffer.from(`SECRETVAL-api-${randomBytes(12).toString('base64url')}`),
    MULTI: Buffer.from(`SECRETVAL-multi-${randomBytes(8).toString('hex')}\nline two "quoted" 'single' $HOME\n`),
  };
  await kh(['secret', 'set', 'app', 'DB_PASSWORD'], { input: values.DB_PASSWORD });
  const valueFile = join(privateDir, 'api-key');
  writeFileSync(valueFile, values.API_KEY!, { mode: 0o600 });
  await kh(['secret', 'set', 'app', 'API_KEY', '--value-file', valueFile]);
  await kh(['secret', 'set', 'app', 'MULTI'], { input: values.MULTI });
  const blob = randomBytes(48);
  await kh(['secret', 'set', 'bin', 'BLOB'], { input: blob });
  for (const [name, value] of Object.entries(values)) needles.push({ name: `secret ${name}`, bytes: value });
  needles.push({ name: 'secret BLOB (binary)', bytes: blob });

  expect((await kh(['secret', 'get', 'app', 'DB_PASSWORD'], { secretStdout: true })).stdout.equals(values.DB_PASSWORD!)).toBe(true);
  await kh(['secret', 'get', 'bin', 'BLOB', '--json'], { secretStdout: true });
  await kh(['secret', 'list', 'app']);
  await kh(['export', '-s', 'app'], { secretStdout: true });
  await kh(['export', '-s', 'app', '--format', 'shell'], { secretStdout: true });
  for (const args of [['key', 'list'], ['key', 'list', '--json'], ['key', 'pub', 'app'], ['scope', 'list'], ['token', 'list', '--json'], ['factor', 'list', '--json']]) await kh(args);
  // A wrong passphrase: exit 4, and the message must not quote it.
  await kh(['key', 'list'], { env: { ...debug, KEYHOLD_PASSPHRASE_FILE: wrongPassFile }, code: 4 });

  // --- phase A: a background daemon unlocked from KEYHOLD_PASSPHRASE --------------------------
  const unlocked = await kh(['unlock'], { env: { ...bare, KEYHOLD_PASSPHRASE: passphrase } });
  expect(unlocked.stderr.toString()).toMatch(/KEYHOLD_PASSPHRASE/);
  bgDaemonPid = Number(readFileSync(join(k.runtime, 'daemon.pid'), 'utf8').trim());
  expect(processAlive(bgDaemonPid)).toBe(true);
  expect(readProc(bgDaemonPid, 'environ', 'background daemon').toString()).toContain('KEYHOLD_LOG_LEVEL=debug');
  readProc(bgDaemonPid, 'cmdline', 'background daemon');

  values.VIA_DAEMON = Buffer.from(`SECRETVAL-daemon-${randomBytes(12).toString('hex')}`);
  needles.push({ name: 'secret VIA_DAEMON', bytes: values.VIA_DAEMON });
  await kh(['secret', 'set', 'app', 'VIA_DAEMON'], { env: bare, input: values.VIA_DAEMON });
  expect((await kh(['secret', 'get', 'app', 'VIA_DAEMON'], { env: bare, secretStdout: true })).stdout.equals(values.VIA_DAEMON)).toBe(true);
  await issue('app', 'via-daemon', bare);

  const appSock = join(k.runtime, 'scopes', 'app.sock');
  const listed = await tool('ssh-add', ['-l'], appSock);
  expect(listed.stdout.toString().trim().split('\n')).toHaveLength(8);
  await tool('ssh-add', ['-L'], appSock);
  const pubFile = join(work, 'signer.pub');
  writeFileSync(pubFile, generated.ed25519 + '\n');
  const message = join(work, 'message.txt');
  writeFileSync(message, 'signed through the scope socket\n');
  await tool('ssh-keygen', ['-Y', 'sign', '-n', 'file', '-f', pubFile, message], appSock);

  await kh(['lock'], { env: bare });
  await tool('ssh-add', ['-l'], appSock, 1); // locked: no identities
  await kh(['unlock'], { env: debug });
  await kh(['status', '--json'], { env: bare });

  // `keyhold env`: the child records its own argv, its ancestors' argv, and digests of what it got.
  const childScript = join(work, 'child.mjs');
  writeFileSync(
    childScript,
    `import { readFileSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
const chain = [];
for (let pid = process.pid; pid > 0; ) {
  let cmdline, ppid;
  try {
    cmdline = readFileSync('/proc/' + pid + '/cmdline', 'latin1').split('\\0').filter(Boolean);
    ppid = Number(/PPid:\\s+(\\d+)/.exec(readFileSync('/proc/' + pid + '/status', 'utf8'))[1]);
  } catch { break; }
  chain.push({ pid, cmdline });
  if (pid === 1) break;
  pid = ppid;
}
const hashes = {};
for (const name of process.argv.slice(3)) hashes[name] = process.env[name] === undefined ? null : createHash('sha256').update(process.env[name]).digest('hex');
writeFileSync(process.argv[2], JSON.stringify({ pid: process.pid, chain, hashes }));
`,
  );
  const childOut = join(work, 'env-child.json');
  const names = ['DB_PASSWORD', 'API_KEY', 'MULTI', 'VIA_DAEMON'];
  for (const name of names) expectedHashes[name] = sha256(values[name]!);
  envRunArgv = [KEYHOLD_BIN, 'env', '-s', 'app', '--', process.execPath, childScript, childOut, ...names];
  const envRun = await new Promise<Run>((resolve, reject) => {
    const started = exec(process.execPath, envRunArgv, { env: bare });
    // The pid of the keyhold process, which the child must have taken over (execve).
    const proc = [...children].pop()!;
    envRunPid = proc.pid!;
    started.then(resolve, reject);
  });
  expectExit(envRun, 0);
  envChild = JSON.parse(readFileSync(childOut, 'utf8')) as typeof envChild;

  await kh(['export', '-s', 'app', '--format', 'json'], { env: bare, secretStdout: true });
  await kh(['audit', 'verify'], { env: bare });
  await kh(['audit', 'tail', '-n', '100', '--json']);

  process.kill(bgDaemonPid, 'SIGTERM');
  await waitFor(() => !processAlive(bgDaemonPid), 10_000, 'the background daemon to stop');
  daemonLog = readFileSync(join(k.runtime, 'daemon.log'));

  // --- phase B: `keyhold serve` with a TCP token listener, stderr captured ---------------------
  const port = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${port}`], { KEYHOLD_LOG_LEVEL: 'debug' });
  readProc(serve.proc.pid!, 'cmdline', 'keyhold serve');
  readProc(serve.proc.pid!, 'environ', 'keyhold serve');

  const conn = await TcpAgent.open(port, appToken.token);
  const key = firstIdentity((await conn.request(Buffer.of(11)))!);
  const signed = await conn.request(Buffer.concat([Buffer.of(13), sshString(key), sshString(Buffer.from('container data')), u32(0)]));
  expect(signed?.[0]).toBe(14);
  conn.close();
  for (const bad of [nearMiss, revoked.token]) {
    const c = await TcpAgent.open(port, bad);
    expect(await c.request(Buffer.of(11))).toBeNull(); // closed without a reply
    c.close();
  }

  // A container-side bridge with the token in a file.
  const tokenFile = join(privateDir, 'box.token');
  writeFileSync(tokenFile, boxToken.token + '\n', { mode: 0o600 });
  const bridgeSock = join(work, 'bridge.sock');
  const bridgeArgv = [KEYHOLD_BIN, 'bridge', '--connect', `tcp:127.0.0.1:${port}`, '--token-file', tokenFile, '--listen', bridgeSock];
  runs.push({ argv: [process.execPath, ...bridgeArgv], code: 0, stdout: Buffer.alloc(0), stderr: Buffer.alloc(0), stdoutIsSecret: false });
  bridge = spawn(process.execPath, bridgeArgv, { env: debug, stdio: ['ignore', 'pipe', 'pipe'] });
  bridge.stdout!.on('data', (d: Buffer) => (bridgeOutput.stdout += d.toString()));
  bridge.stderr!.on('data', (d: Buffer) => (bridgeOutput.stderr += d.toString()));
  await waitFor(() => bridgeOutput.stdout.includes('SSH_AUTH_SOCK='), 10_000, 'the bridge');
  readProc(bridge.pid!, 'cmdline', 'keyhold bridge');
  expect((await tool('ssh-add', ['-L'], bridgeSock)).stdout.toString()).toContain('ssh-rsa ');
  const boxPub = join(work, 'box.pub');
  writeFileSync(boxPub, (await kh(['key', 'pub', 'box'], { env: bare })).stdout);
  await tool('ssh-keygen', ['-Y', 'sign', '-n', 'file', '-f', boxPub, message], bridgeSock);
  bridge.kill('SIGTERM');
  await new Promise((r) => bridge!.once('exit', r));

  // An ssh-agent unlock factor with a real ssh-agent.
  const agent = await startSshAgent();
  const factorKey: KeyPair = generateKeyPair(privateDir, 'factor_ed25519', 'ed25519');
  needles.push({ name: 'ssh-agent factor key seed', bytes: openSshEd25519(factorKey.path).seed });
  agent.add(factorKey.path);
  const withAgent = { ...bare, SSH_AUTH_SOCK: agent.sock };
  await kh(['factor', 'add', 'ssh-agent', '--key', factorKey.pubPath], { env: withAgent });
  await kh(['lock'], { env: bare });
  await kh(['unlock', '--factor', 'ssh-agent'], { env: withAgent });
  await tool('ssh-add', ['-l'], appSock);
  await kh(['lock'], { env: bare });
  await kh(['unlock'], { env: { ...bare, KEYHOLD_PASSPHRASE_FILE: wrongPassFile }, code: 4 });
  await kh(['unlock'], { env: debug });
  await kh(['audit', 'verify'], { env: bare });
  await kh(['audit', 'tail', '-n', '200']);
  await serve.stop();
  await agent.stop();

  // --- what else must never show: the vault's own keys, and the private keys it generated -----
  const paths = vaultPaths(k.vault);
  const keyring = readKeyring(paths.keys);
  const keks = await passphraseKeks(keyring, Buffer.from(passphrase));
  for (const [id, kek] of keks) needles.push({ name: `KEK of ${id}`, bytes: Buffer.from(kek) });
  const masterKey = unwrapMasterKey(keyring, keks);
  needles.push({ name: 'the master key', bytes: Buffer.from(masterKey) }, { name: 'the audit MAC key', bytes: auditKey(masterKey, keyring.vault_id) });
  const vault = await Vault.open(paths, async () => Buffer.from(passphrase));
  try {
    const seen = new Set<string>();
    for (const row of vault.scopeKeys()) {
      if (seen.has(row.fingerprint)) continue;
      seen.add(row.fingerprint);
      needles.push(...privateKeyNeedles(`vault key ${row.comment}`, createPrivateKey({ key: row.privatePkcs8, format: 'der', type: 'pkcs8' })));
    }
    expect(seen.size).toBe(9); // 5 generated + 4 imported
  } finally {
    vault.close();
  }
}, 120_000);

afterAll(async () => {
  for (const child of children) child.kill('SIGKILL');
  if (bridge && bridge.exitCode === null) bridge.kill('SIGKILL');
  await stopAllServes();
  await stopAllSshAgents();
  if (bgDaemonPid && processAlive(bgDaemonPid)) process.kill(bgDaemonPid, 'SIGKILL');
  k?.cleanup();
});

// ---------------------------------------------------------------------------------------------
// The searches
// ---------------------------------------------------------------------------------------------

/** Files whose purpose is to hold a secret: the passphrase file and everything in private/. */
const exempt = (path: string) => path === k.passFile || path.startsWith(privateDir + '/');

describe('secret hygiene over a whole debug-level session', () => {
  it('the search finds what it looks for (positive controls)', () => {
    expect(needles.length).toBeGreaterThan(60);
    const byName = (name: string) => needles.filter((n) => n.name === name);
    expect(search(readFileSync(k.passFile), byName('the passphrase'))).toEqual(['the passphrase (raw)']);
    const issued = runs.find((r) => r.argv.includes('ci-app'))!;
    expect(search(issued.stdout, byName('token ci-app'))).toEqual(['token ci-app (raw)']);
    const got = runs.find((r) => r.argv.includes('DB_PASSWORD') && r.argv.includes('get'))!;
    expect(search(got.stdout, byName('secret DB_PASSWORD'))).toEqual(['secret DB_PASSWORD (raw)']);
    const blobJson = runs.find((r) => r.argv.includes('BLOB') && r.argv.includes('get'))!;
    expect(search(blobJson.stdout, byName('secret BLOB (binary)'))[0]).toMatch(/base64@0/);
    expect(search(readFileSync(join(privateDir, 'imp_pkcs8.pem')), byName('imported PKCS#8 PEM body'))).toEqual(['imported PKCS#8 PEM body (base64@0)']);
    // Embedded at any offset, in any encoding.
    const seed = byName('imported OpenSSH key seed');
    for (const shift of [0, 1, 2, 5]) {
      const wrapped = Buffer.concat([randomBytes(shift), seed[0]!.bytes, randomBytes(7)]);
      for (const enc of ['base64', 'base64url', 'hex'] as const) expect(search(Buffer.from(`x${wrapped.toString(enc)}y`), seed)).toHaveLength(1);
    }
  });

  it('the session really ran: debug logs, the env child got every value, the bridge and factor worked', () => {
    expect(daemonLog.toString()).toMatch(/"level":20/); // debug lines in the background daemon's log
    expect(daemonLog.toString()).toContain('vault unlocked');
    expect(serve!.stderr()).toMatch(/"level":20/);
    expect(serve!.stderr()).toContain('token handshake failed');
    expect(bridgeOutput.stderr).toContain('bridge ready');
    expect(envChild!.hashes).toEqual(expectedHashes);
    const audit = readFileSync(vaultPaths(k.vault).audit, 'utf8');
    for (const event of ['sign', 'handshake-failed', 'secret-read', 'token-issued', 'token-revoked', 'unlock', 'unlock-failed', 'lock', 'factor-added', 'key-added']) {
      expect(audit, `audit event ${event}`).toContain(`"event":"${event}"`);
    }
  });

  it('no secret in any file under the test dir (vault.db, -wal, -shm, .keys, audit.jsonl, runtime dir, daemon.log)', () => {
    const files = walk(k.dir);
    const names = files.map((f) => f.slice(k.dir.length + 1));
    expect(names).toEqual(expect.arrayContaining(['data/vault.db', 'data/vault.db.keys', 'data/vault.db.audit.jsonl', 'run/daemon.log', 'work/env-child.json']));
    const hits: string[] = [];
    for (const file of files) {
      if (exempt(file)) continue;
      for (const hit of search(readFileSync(file), needles)) hits.push(`${file}: ${hit}`);
    }
    expect(hits).toEqual([]);
  });

  it('no secret in any log line or error message (daemon stderr, daemon.log, bridge, every CLI stderr)', () => {
    const hits: string[] = [];
    const check = (where: string, bytes: Buffer) => {
      for (const hit of search(bytes, needles)) hits.push(`${where}: ${hit}`);
    };
    check('keyhold serve stderr', Buffer.from(serve!.stderr()));
    check('daemon.log', daemonLog);
    check('bridge stderr', Buffer.from(bridgeOutput.stderr));
    check('bridge stdout', Buffer.from(bridgeOutput.stdout));
    for (const run of runs) {
      check(`stderr of ${run.argv.slice(1).join(' ')}`, run.stderr);
      if (!run.stdoutIsSecret) check(`stdout of ${run.argv.slice(1).join(' ')}`, run.stdout);
    }
    expect(runs.length).toBeGreaterThan(50);
    expect(hits).toEqual([]);
  });

  it('no secret in argv: every process started, the daemons and bridge (/proc), the env child and its ancestors', () => {
    const hits: string[] = [];
    for (const run of runs) for (const hit of search(Buffer.from(run.argv.join('\0')), needles)) hits.push(`argv ${run.argv.join(' ')}: ${hit}`);
    for (const { where, bytes } of procText) for (const hit of search(bytes, needles)) hits.push(`${where}: ${hit}`);
    // The child took over the keyhold process (execve): same pid, its argv exactly the command.
    expect(envChild!.chain[0]!.pid).toBe(envRunPid);
    expect(envChild!.chain[0]!.cmdline).toEqual(envRunArgv.slice(envRunArgv.indexOf('--') + 1));
    expect(envChild!.chain[1]!.pid).toBe(process.pid);
    for (const { pid, cmdline } of envChild!.chain) {
      for (const hit of search(Buffer.from(cmdline.join('\0')), needles)) hits.push(`env child ancestor ${pid} argv: ${hit}`);
    }
    expect(hits).toEqual([]);
  });

  it('the background daemon started by `unlock` with KEYHOLD_PASSPHRASE did not inherit it', () => {
    const environ = procText.find((p) => p.where.includes('environ (background daemon)'))!.bytes.toString();
    expect(environ).not.toMatch(/(^|\0)KEYHOLD_PASSPHRASE=/);
    expect(environ).not.toMatch(/(^|\0)KEYHOLD_PASSPHRASE_FILE=/);
  });
});
