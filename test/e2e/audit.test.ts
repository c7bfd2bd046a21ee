// The audit log end to end: a real `keyhold serve` (scope sockets and a token listener), real
// OpenSSH clients and sshd, and the CLI: what each request and each change writes, who it names as
// the peer, and `keyhold audit tail` / `audit verify` on the real file.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { frame } from '../../src/agent-protocol/framing.js';
import { encodeRequest, MSG } from '../../src/agent-protocol/messages.js';
import type { AuditEntry } from '../../src/audit/audit-log.js';
import {
  initVault,
  KEYHOLD_BIN,
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
import { startSshd, stopAllSshd } from '../helpers/sshd.js';

// ---------------------------------------------------------------------------------------------
// Helpers

interface Cli {
  status: number | null;
  stdout: string;
  stderr: string;
  pid: number;
}

/** Runs the CLI with exactly `env` (no merging), and reports its pid: the peer the log must name. */
function cli(env: NodeJS.ProcessEnv, args: string[], input = ''): Cli {
  const r = spawnSync(process.execPath, [KEYHOLD_BIN, ...args], { env, input, encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, pid: r.pid };
}

function cliOk(env: NodeJS.ProcessEnv, args: string[], input = ''): Cli {
  const r = cli(env, args, input);
  if (r.status !== 0) throw new Error(`keyhold ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r;
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  pid: number;
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, cwd?: string): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, cwd, stdio: ['ignore', 'pipe', 'pipe'], timeout: 20_000, killSignal: 'SIGKILL' });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr, pid: child.pid! }));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function sshString(value: string | Buffer): Buffer {
  const b = Buffer.from(value);
  return Buffer.concat([u32(b.length), b]);
}

function signRequest(keyBlob: Buffer, data: Buffer): Buffer {
  return frame(encodeRequest({ type: 'sign', keyBlob, data, flags: 0 }));
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** A TCP connection to the token listener: handshake bytes, then agent frames. */
class TcpClient {
  private buffer = Buffer.alloc(0);
  closed = false;
  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => (this.buffer = Buffer.concat([this.buffer, d])));
    socket.on('close', () => (this.closed = true));
    socket.on('error', () => {});
  }
  static open(port: number): Promise<TcpClient> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port });
      socket.once('connect', () => resolve(new TcpClient(socket)));
      socket.once('error', reject);
    });
  }
  send(bytes: Buffer): void {
    this.socket.write(bytes);
  }
  async reply(): Promise<Buffer> {
    await waitFor(() => (this.buffer.length >= 4 && this.buffer.length >= 4 + this.buffer.readUInt32BE(0)) || this.closed, 5000, 'reply');
    if (this.buffer.length < 4 || this.buffer.length < 4 + this.buffer.readUInt32BE(0)) throw new Error('connection closed');
    const n = this.buffer.readUInt32BE(0);
    const payload = this.buffer.subarray(4, 4 + n);
    this.buffer = this.buffer.subarray(4 + n);
    return payload;
  }
  close(): void {
    this.socket.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// Fixture: one vault, one daemon (scope web, token listener on loopback)

let k: KeyholdEnv;
let bareEnv: NodeJS.ProcessEnv;
let serve: ServeHandle;
let work: string;
let webSock: string;
let webPub: string;
let webFp: string;
let webBlob: Buffer;
let otherBlob: Buffer;
let tokenPort: number;
let logPath: string;
const nodeExe = realpathSync(process.execPath);
const uid = process.getuid!();
const gid = process.getgid!();

function logText(): string {
  try {
    return readFileSync(logPath, 'utf8');
  } catch {
    return '';
  }
}

function entries(): AuditEntry[] {
  return logText()
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as AuditEntry);
}

const lastSeq = () => entries().at(-1)?.seq ?? 0;
const after = (seq: number) => entries().filter((e) => e.seq > seq);

/** Waits (the daemon writes within its 100 ms batch window) for an entry after `seq` matching. */
async function waitEntry(seq: number, match: (e: AuditEntry) => boolean, what: string, timeoutMs = 3000): Promise<AuditEntry> {
  await waitFor(() => after(seq).some(match), timeoutMs, what);
  return after(seq).find(match)!;
}

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-e2e-audit-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-e2e-audit-work-'));
  bareEnv = { ...k.env };
  delete bareEnv.KEYHOLD_PASSPHRASE_FILE;
  delete bareEnv.KEYHOLD_PASSPHRASE;
  delete bareEnv.CREDENTIALS_DIRECTORY;
  delete bareEnv.SSH_AUTH_SOCK;
  logPath = `${k.vault}.audit.jsonl`;
  initVault(k);
  const web = JSON.parse(keyholdOk(k, ['key', 'generate', 'web', '--comment', 'audit-web', '--json'])) as { fingerprint: string; public: string };
  webPub = web.public;
  webFp = web.fingerprint;
  webBlob = Buffer.from(webPub.split(' ')[1]!, 'base64');
  const other = JSON.parse(keyholdOk(k, ['key', 'generate', 'elsewhere', '--json'])) as { public: string };
  otherBlob = Buffer.from(other.public.split(' ')[1]!, 'base64');
  tokenPort = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${tokenPort}`]);
  webSock = serve.socket('web');
  await waitFor(() => existsSync(webSock), 10_000, 'the web scope socket');
}, 60_000);

afterAll(async () => {
  await stopAllSshd();
  await stopAllServes();
  // A daemon a test may have started in the background (none expected: serve holds the runtime dir).
  if (k) await stopBackgroundDaemon(k.runtime);
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

// ---------------------------------------------------------------------------------------------

describe('the log file', () => {
  it('is mode 0600 and verifies after the setup: two key-added lines by the CLI, then the daemon’s unlock at start', async () => {
    expect(statSync(logPath).mode & 0o777).toBe(0o600);
    await waitEntry(0, (e) => e.event === 'unlock', 'the daemon’s unlock at start');
    const all = entries();
    expect(all.map((e) => [e.event, e.scope])).toEqual([
      ['key-added', 'web'],
      ['key-added', 'elsewhere'],
      ['unlock', undefined],
    ]);
    expect(all[0]!.peer).toMatchObject({ kind: 'process', uid, exe: nodeExe });
    const r = cliOk(k.env, ['audit', 'verify']);
    expect(r.stdout).toMatch(new RegExp(`^ok: ${all.length} entries`));
  });
});

describe('signatures through a scope socket', () => {
  const agentEnv = () => {
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const name of Object.keys(env)) if (name.startsWith('KEYHOLD_')) delete env[name];
    return { ...env, SSH_AUTH_SOCK: webSock };
  };

  it('ssh-add -l writes nothing; ssh-keygen -Y sign writes one sign line naming ssh-keygen as the peer', async () => {
    const before = lastSeq();
    const list = await run('ssh-add', ['-l'], agentEnv());
    expect(list.code, list.stderr).toBe(0);
    expect(list.stdout).toContain(webFp);

    const pubFile = join(work, 'web.pub');
    const msgFile = join(work, 'message.txt');
    const message = `audit me ${randomBytes(8).toString('hex')}\n`;
    writeFileSync(pubFile, `${webPub}\n`);
    writeFileSync(msgFile, message);
    const sign = await run('ssh-keygen', ['-Y', 'sign', '-f', pubFile, '-n', 'file', msgFile], agentEnv(), work);
    expect(sign.code, sign.stderr).toBe(0);
    expect(existsSync(`${msgFile}.sig`)).toBe(true);

    const entry = await waitEntry(before, (e) => e.event === 'sign', 'the sign line');
    // What ssh-keygen asked the agent to sign: the SSHSIG blob over SHA-512 of the message.
    const signed = Buffer.concat([
      Buffer.from('SSHSIG'),
      sshString('file'),
      sshString(''),
      sshString('sha512'),
      sshString(createHash('sha512').update(message).digest()),
    ]);
    expect(entry).toMatchObject({
      event: 'sign',
      scope: 'web',
      fingerprint: webFp,
      algorithm: 'ssh-ed25519',
      data_sha256: createHash('sha256').update(signed).digest('hex'),
      peer: { kind: 'unix', pid: sign.pid, uid, gid },
    });
    expect(entry.peer!.kind === 'unix' && entry.peer!.exe).toMatch(/\/ssh-keygen$/);
    // Not an SSH login: no user, no host key; and nothing else was written (not for ssh-add -l).
    expect(entry.user).toBeUndefined();
    expect(entry.host_key).toBeUndefined();
    expect(after(before).map((e) => e.event)).toEqual(['sign']);
  });

  it('a real ssh login: the sign line names the login user and the sshd host key fingerprint', async () => {
    const sshd = await startSshd({ authorizedKeys: [webPub] });
    const hostPub = join(sshd.dir, 'ssh_host_ed25519_key.pub');
    const hostFp = execFileSync('ssh-keygen', ['-lf', hostPub], { encoding: 'utf8' }).trim().split(/\s+/)[1]!;
    expect(hostFp).toMatch(/^SHA256:/);
    const before = lastSeq();
    const login = await run('ssh', [...sshd.sshArgs(), 'echo', 'ok'], agentEnv());
    expect(login.code, `${login.stderr}\n${sshd.stderr().slice(-2000)}`).toBe(0);
    expect(login.stdout).toBe('ok\n');
    const entry = await waitEntry(before, (e) => e.event === 'sign', 'the login sign line');
    expect(entry).toMatchObject({
      scope: 'web',
      fingerprint: webFp,
      algorithm: 'ssh-ed25519',
      user: sshd.user,
      host_key: hostFp,
      peer: { kind: 'unix', pid: login.pid, uid },
    });
    expect(entry.peer!.kind === 'unix' && entry.peer!.exe).toMatch(/\/ssh$/);
    expect(entry.data_sha256).toMatch(/^[0-9a-f]{64}$/);
    await sshd.stop();
  });

  it('a key not in the scope → sign-refused unknown-key, naming this process', async () => {
    const before = lastSeq();
    const client = await RawAgentClient.connect(webSock);
    try {
      client.send(signRequest(otherBlob, Buffer.from('not for this scope')));
      expect((await client.reply())[0]).toBe(MSG.FAILURE);
    } finally {
      client.close();
    }
    const entry = await waitEntry(before, (e) => e.event === 'sign-refused', 'the sign-refused line');
    expect(entry).toMatchObject({
      scope: 'web',
      reason: 'unknown-key',
      data_sha256: createHash('sha256').update('not for this scope').digest('hex'),
      peer: { kind: 'unix', pid: process.pid, uid, gid, exe: nodeExe },
    });
    expect(entry.fingerprint).toBeUndefined();
    expect(entry.algorithm).toBeUndefined();
  });

  it('while locked → sign-refused locked, written at the next unlock: after the lock line, before the unlock line', async () => {
    const before = lastSeq();
    const lock = cliOk(bareEnv, ['lock']);
    const lockEntry = await waitEntry(before, (e) => e.event === 'lock', 'the lock line');
    expect(lockEntry).toMatchObject({ reason: 'keyhold lock', peer: { kind: 'unix', pid: lock.pid, uid, gid, exe: nodeExe } });

    const client = await RawAgentClient.connect(webSock);
    try {
      client.send(signRequest(webBlob, Buffer.from('while locked')));
      expect((await client.reply())[0]).toBe(MSG.FAILURE);
    } finally {
      client.close();
    }
    // Nothing can be MAC'd while locked: not in the file yet (well past the 100 ms batch window).
    await sleep(400);
    expect(after(lockEntry.seq)).toEqual([]);

    const unlock = cliOk(k.env, ['unlock']);
    const unlockEntry = await waitEntry(lockEntry.seq, (e) => e.event === 'unlock', 'the unlock line');
    const refused = after(lockEntry.seq).find((e) => e.event === 'sign-refused');
    expect(refused).toMatchObject({
      scope: 'web',
      reason: 'locked',
      data_sha256: createHash('sha256').update('while locked').digest('hex'),
      peer: { kind: 'unix', pid: process.pid },
    });
    expect(after(lockEntry.seq).map((e) => e.event)).toEqual(['sign-refused', 'unlock']);
    expect(refused!.seq).toBeLessThan(unlockEntry.seq);
    // Its time is when it happened, not when it was written.
    expect(Date.parse(refused!.time)).toBeGreaterThanOrEqual(Date.parse(lockEntry.time));
    expect(Date.parse(refused!.time)).toBeLessThanOrEqual(Date.parse(unlockEntry.time));
    expect(unlockEntry).toMatchObject({ peer: { kind: 'unix', pid: unlock.pid, uid, gid, exe: nodeExe } });
    expect(unlockEntry.names).toEqual([expect.stringMatching(/^pp-/)]);
    expect(cliOk(k.env, ['audit', 'verify']).stdout).toMatch(/^ok: /);
  });
});

describe('the token listener', () => {
  it('a bad token → handshake-failed with the TCP peer', async () => {
    const before = lastSeq();
    const client = await TcpClient.open(tokenPort);
    const localPort = client.socket.localPort!;
    const bogus = `khp_${randomBytes(32).toString('base64url')}`;
    client.send(Buffer.concat([sshString(bogus)]));
    await waitFor(() => client.closed, 5000, 'the listener to close the connection');
    const entry = await waitEntry(before, (e) => e.event === 'handshake-failed', 'the handshake-failed line');
    expect(entry).toMatchObject({ peer: { kind: 'tcp', address: '127.0.0.1', port: localPort } });
    expect(typeof entry.reason).toBe('string');
    expect(logText()).not.toContain(bogus);
  });

  it('a valid token’s signature → sign with token_id; the token itself is nowhere in the log', async () => {
    const issued = JSON.parse(cliOk(bareEnv, ['token', 'issue', 'web', '--subject', 'ci-audit', '--json']).stdout) as { id: string; token: string };
    expect(issued.token.length).toBeGreaterThan(20);
    const before = lastSeq();
    const client = await TcpClient.open(tokenPort);
    const localPort = client.socket.localPort!;
    try {
      client.send(Buffer.concat([sshString(issued.token), signRequest(webBlob, Buffer.from('container data'))]));
      expect((await client.reply())[0]).toBe(MSG.SIGN_RESPONSE);
    } finally {
      client.close();
    }
    const entry = await waitEntry(before, (e) => e.event === 'sign', 'the token sign line');
    expect(entry).toMatchObject({
      scope: 'web',
      token_id: issued.id,
      fingerprint: webFp,
      data_sha256: createHash('sha256').update('container data').digest('hex'),
      peer: { kind: 'tcp', address: '127.0.0.1', port: localPort },
    });
    const issuedEntry = entries().find((e) => e.event === 'token-issued' && e.token_id === issued.id);
    expect(issuedEntry).toMatchObject({ scope: 'web', subject: 'ci-audit' });
    expect(logText()).not.toContain(issued.token);
    // Not even the secret part after the prefix.
    expect(logText()).not.toContain(issued.token.slice(8));
  });
});

describe('CLI changes', () => {
  for (const mode of ['direct', 'daemon'] as const) {
    it(`each change writes its line (${mode === 'direct' ? 'vault opened by the CLI: peer process' : 'through the unlocked daemon: peer unix'})`, async () => {
      const env = mode === 'direct' ? k.env : bareEnv;
      const peerOf = (pid: number) =>
        mode === 'direct' ? { kind: 'process', pid, uid, exe: nodeExe } : { kind: 'unix', pid, uid, gid, exe: nodeExe };
      const s = `s-${mode}`;

      /** Runs the command and expects exactly one `event` line after it, naming the CLI process. */
      const expectLine = async (args: string[], event: string, fields: Record<string, unknown>, input = ''): Promise<Cli> => {
        const before = lastSeq();
        const r = cliOk(env, args, input);
        if (mode === 'direct') {
          // The CLI flushes before it exits (and before printing success).
          expect(after(before).map((e) => e.event), args.join(' ')).toEqual([event]);
        } else {
          await waitEntry(before, (e) => e.event === event, `${event} for ${args.join(' ')}`);
          await sleep(50);
          expect(after(before).map((e) => e.event), args.join(' ')).toEqual([event]);
        }
        expect(after(before)[0], args.join(' ')).toMatchObject({ event, ...fields, peer: peerOf(r.pid) });
        return r;
      };

      const generated = await expectLine(['key', 'generate', s, '--json'], 'key-added', { scope: s });
      const fp = (JSON.parse(generated.stdout) as { fingerprint: string }).fingerprint;
      expect(after(lastSeq() - 1)[0]!.fingerprint).toBe(fp);
      await expectLine(['key', 'assign', `${s}-2`, fp], 'key-assigned', { scope: `${s}-2`, fingerprint: fp });
      await expectLine(['key', 'unassign', `${s}-2`, fp], 'key-unassigned', { scope: `${s}-2`, fingerprint: fp });

      const issued = await expectLine(['token', 'issue', s, '--subject', 'sub', '--json'], 'token-issued', { scope: s, subject: 'sub' });
      const token = JSON.parse(issued.stdout) as { id: string; token: string };
      expect(after(lastSeq() - 1)[0]!.token_id).toBe(token.id);
      await expectLine(['token', 'revoke', token.id], 'token-revoked', { scope: s, token_id: token.id });
      expect(logText()).not.toContain(token.token);

      const secretValue = `value-${randomBytes(12).toString('hex')}`;
      await expectLine(['secret', 'set', s, 'AUDITED'], 'secret-set', { scope: s, name: 'AUDITED' }, secretValue);
      const got = await expectLine(['secret', 'get', s, 'AUDITED'], 'secret-read', { scope: s, name: 'AUDITED' });
      expect(got.stdout).toBe(secretValue);
      await expectLine(['secret', 'rm', s, 'AUDITED'], 'secret-removed', { scope: s, name: 'AUDITED' });
      expect(logText()).not.toContain(secretValue);

      await expectLine(['key', 'rm', fp], 'key-removed', { fingerprint: fp });

      const newPass = join(work, `new-pass-${mode}`);
      writeFileSync(newPass, `a new passphrase ${mode}\n`, { mode: 0o600 });
      const added = await expectLine(['factor', 'add', 'passphrase', '--new-passphrase-file', newPass], 'factor-added', { type: 'passphrase' });
      const factorId = after(lastSeq() - 1)[0]!.factor!;
      expect(factorId).toMatch(/^pp-/);
      expect(added.stderr).toContain(factorId);
      const changedPass = join(work, `changed-pass-${mode}`);
      writeFileSync(changedPass, `a changed passphrase ${mode}\n`, { mode: 0o600 });
      await expectLine(['passphrase', 'change', '--new-passphrase-file', changedPass, '--factor', factorId], 'factor-changed', { factor: factorId, type: 'passphrase' });
      await expectLine(['factor', 'rm', factorId], 'factor-removed', { factor: factorId });

      if (mode === 'daemon') {
        await expectLine(['lock'], 'lock', { reason: 'keyhold lock' });
        // Unlock needs a secret: the passphrase file, but still through the daemon.
        const before = lastSeq();
        const unlock = cliOk(k.env, ['unlock']);
        const entry = await waitEntry(before, (e) => e.event === 'unlock', 'the unlock line');
        expect(entry).toMatchObject({ peer: { kind: 'unix', pid: unlock.pid, uid, gid, exe: nodeExe } });
      }
      expect(cliOk(k.env, ['audit', 'verify']).stdout).toMatch(/^ok: /);
    });
  }
});

describe('keyhold audit tail and verify', () => {
  it('tail -n 3 --json prints the last three entries', () => {
    const r = cliOk(bareEnv, ['audit', 'tail', '-n', '3', '--json']);
    const printed = JSON.parse(r.stdout) as AuditEntry[];
    expect(printed).toEqual(entries().slice(-3));
    expect(printed).toHaveLength(3);
  });

  it('tail --follow prints an entry written while it runs', async () => {
    const follow = spawn(process.execPath, [KEYHOLD_BIN, 'audit', 'tail', '--follow', '--json', '-n', '1'], { env: bareEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    follow.stdout.on('data', (d: Buffer) => (out += d.toString()));
    follow.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((resolve) => follow.once('exit', (code) => resolve(code)));
    try {
      await waitFor(() => out.split('\n').filter(Boolean).length === 1, 10_000, `the first entry (stderr: ${err})`);
      const first = JSON.parse(out.split('\n')[0]!) as AuditEntry;
      expect(first).toEqual(entries().at(-1));
      cliOk(k.env, ['secret', 'set', 'followed', 'LIVE'], 'x');
      await waitFor(() => out.includes('"LIVE"'), 5000, 'the followed entry');
      const lines = out.split('\n').filter(Boolean).map((l) => JSON.parse(l) as AuditEntry);
      expect(lines).toHaveLength(2);
      expect(lines[1]).toMatchObject({ seq: first.seq + 1, event: 'secret-set', scope: 'followed', name: 'LIVE' });
    } finally {
      follow.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
  });

  it('verify: exit 0; an edited line → exit 1 naming it; the last line deleted → exit 1 truncated; the same through the daemon', () => {
    const original = readFileSync(logPath);
    const n = entries().length;
    expect(n).toBeGreaterThan(10);
    try {
      for (const env of [k.env, bareEnv]) {
        const ok = cli(env, ['audit', 'verify']);
        expect(ok.status, ok.stderr).toBe(0);
        expect(ok.stdout).toBe(`ok: ${n} entries, chained and authentic\n`);
      }
      const json = JSON.parse(cliOk(k.env, ['audit', 'verify', '--json']).stdout) as { ok: boolean; entries: number; file: string };
      expect(json).toMatchObject({ ok: true, entries: n, file: logPath });

      // One character of line 5's time.
      execFileSync('sed', ['-i', '5s/"time":"2/"time":"1/', logPath]);
      expect(readFileSync(logPath).equals(original)).toBe(false);
      for (const env of [k.env, bareEnv]) {
        const edited = cli(env, ['audit', 'verify']);
        expect(edited.status, edited.stderr).toBe(1);
        expect(edited.stdout).toBe('');
        expect(edited.stderr).toContain(`${logPath} line 5: bad mac`);
      }
      const editedJson = cli(k.env, ['audit', 'verify', '--json']);
      expect(editedJson.status).toBe(1);
      expect(JSON.parse(editedJson.stdout)).toMatchObject({ ok: false, line: 5 });

      writeFileSync(logPath, original);
      execFileSync('sed', ['-i', '$d', logPath]);
      expect(readFileSync(logPath, 'utf8').split('\n').filter(Boolean)).toHaveLength(n - 1);
      for (const env of [k.env, bareEnv]) {
        const truncated = cli(env, ['audit', 'verify']);
        expect(truncated.status, truncated.stderr).toBe(1);
        expect(truncated.stderr).toContain(`${logPath} line ${n}: truncated: the vault recorded ${n} entries, the log has ${n - 1}`);
      }
    } finally {
      writeFileSync(logPath, original);
    }
    expect(cli(bareEnv, ['audit', 'verify']).status).toBe(0);
    expect(statSync(logPath).mode & 0o777).toBe(0o600);
  });

  it('verify with no passphrase source and no unlocked daemon → exit 3', () => {
    cliOk(bareEnv, ['lock']);
    try {
      const r = cli(bareEnv, ['audit', 'verify']);
      expect(r.status, r.stderr).toBe(3);
      // tail needs no unlock.
      expect(cli(bareEnv, ['audit', 'tail', '-n', '1']).status).toBe(0);
    } finally {
      cliOk(k.env, ['unlock']);
    }
  });
});
