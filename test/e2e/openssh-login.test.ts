// End-to-end: real `ssh` logins, `git push` over ssh and agent forwarding (`ssh -A`) against a real
// sshd on 127.0.0.1, with a keyhold scope socket as the agent.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FrameReader } from '../../src/agent-protocol/framing.js';
import { parseRequest, parseSessionBind } from '../../src/agent-protocol/messages.js';
import { initVault, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { run, startSshd, stopAllSshd, type Run, type SshdHandle } from '../helpers/sshd.js';

// ---------------------------------------------------------------------------------------------
// Small local helpers
// ---------------------------------------------------------------------------------------------

async function waitUntil(check: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

function blobOfLine(line: string): Buffer {
  return Buffer.from(line.trim().split(/\s+/)[1]!, 'base64');
}

function nonEmptyLines(text: string): string[] {
  return text.split('\n').map((l) => l.trim()).filter(Boolean);
}

/**
 * A recording Unix-socket proxy in front of an agent socket: every client connection is relayed to
 * `target`, and the frames of both directions are kept, so a test can see what OpenSSH sent and
 * what keyhold answered.
 */
interface AgentConversation {
  requests: Buffer[];
  responses: Buffer[];
}

class RecordingProxy {
  readonly conversations: AgentConversation[] = [];
  private readonly sockets = new Set<Socket>();
  private constructor(
    private readonly server: Server,
    readonly path: string,
  ) {}

  static async start(path: string, target: string): Promise<RecordingProxy> {
    let proxy: RecordingProxy;
    const server = createServer((client) => {
      const conv: AgentConversation = { requests: [], responses: [] };
      proxy.conversations.push(conv);
      const upstream = connect(target);
      proxy.sockets.add(client);
      proxy.sockets.add(upstream);
      const up = new FrameReader();
      const down = new FrameReader();
      client.on('data', (d: Buffer) => {
        try {
          up.push(d, (p) => conv.requests.push(Buffer.from(p)));
        } catch {
          /* recorded what we could */
        }
        upstream.write(d);
      });
      upstream.on('data', (d: Buffer) => {
        try {
          down.push(d, (p) => conv.responses.push(Buffer.from(p)));
        } catch {
          /* recorded what we could */
        }
        client.write(d);
      });
      const end = () => {
        client.destroy();
        upstream.destroy();
      };
      client.on('close', end).on('error', end);
      upstream.on('close', end).on('error', end);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    proxy = new RecordingProxy(server, path);
    return proxy;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

// ---------------------------------------------------------------------------------------------
// Fixture: one daemon (scopes `login` and `other`) and one sshd
// ---------------------------------------------------------------------------------------------

interface KeyInfo {
  name: string;
  fingerprint: string;
  pubLine: string;
}

let k: KeyholdEnv;
let serve: ServeHandle;
let sshd: SshdHandle;
let work: string;
let loginSock: string;
let otherSock: string;
const keys: Record<string, KeyInfo> = {};
const proxies: RecordingProxy[] = [];

function generate(name: string, scope: string, type: string, bits?: number): void {
  const args = ['key', 'generate', scope, '--type', type, '--comment', `e2e-login-${name}`, '--json'];
  if (bits !== undefined) args.push('--bits', String(bits));
  const out = JSON.parse(keyholdOk(k, args)) as { fingerprint: string; public: string };
  keys[name] = { name, fingerprint: out.fingerprint, pubLine: out.public };
}

function agentEnv(sock: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(env)) if (name.startsWith('KEYHOLD_') || name.startsWith('GIT_')) delete env[name];
  return { ...env, SSH_AUTH_SOCK: sock, ...extra };
}

function authorize(...lines: string[]): void {
  writeFileSync(sshd.authorizedKeysFile, lines.map((l) => `${l}\n`).join(''), { mode: 0o600 });
}

function diagnostics(r?: Run): string {
  return [
    r ? `--- client stderr ---\n${r.stderr}` : '',
    `--- sshd stderr (tail) ---\n${sshd?.stderr().slice(-3000) ?? ''}`,
    `--- keyhold serve stderr (tail) ---\n${serve?.stderr().slice(-3000) ?? ''}`,
  ].join('\n');
}

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-e2e-login-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-e2e-login-work-'));
  initVault(k);
  generate('ed25519', 'login', 'ed25519');
  generate('rsa', 'login', 'rsa', 2048);
  generate('ecdsa256', 'login', 'ecdsa', 256);
  generate('ecdsa384', 'login', 'ecdsa', 384);
  generate('ecdsa521', 'login', 'ecdsa', 521);
  generate('other', 'other', 'ed25519');
  serve = await startServe(k);
  loginSock = keyholdOk(k, ['socket', 'login']).trim();
  otherSock = keyholdOk(k, ['socket', 'other']).trim();
  sshd = await startSshd({
    authorizedKeys: [],
    // git on the far side must not read the machine's or the user's git config.
    extraConfig: ['SetEnv GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null'],
  });
}, 60_000);

afterAll(async () => {
  await Promise.all(proxies.map((p) => p.close()));
  await stopAllSshd();
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

// ---------------------------------------------------------------------------------------------
// 4. ssh login with each key type
// ---------------------------------------------------------------------------------------------

describe('ssh login through a scope socket', () => {
  for (const name of ['ed25519', 'rsa', 'ecdsa256', 'ecdsa384', 'ecdsa521']) {
    it(`logs in with the ${name} key (the only one authorized)`, async () => {
      const key = keys[name]!;
      authorize(key.pubLine);
      const before = sshd.stderr().length;
      const r = await run('ssh', [...sshd.sshArgs(), 'echo', 'ok'], { env: agentEnv(loginSock) });
      expect(r.code, diagnostics(r)).toBe(0);
      expect(r.stdout).toBe('ok\n');
      // sshd says which key it accepted.
      const accepted = new RegExp(`Accepted publickey for ${sshd.user} from 127\\.0\\.0\\.1 port \\d+ ssh2: \\S+ ${key.fingerprint.replace(/[+/]/g, '\\$&')}`);
      await waitUntil(() => accepted.test(sshd.stderr().slice(before)), 5000, `sshd to log the accepted ${name} key`);
    });
  }

  it('a vault key of another scope is not offered: login fails with Permission denied', async () => {
    authorize(keys.other!.pubLine);
    const denied = await run('ssh', [...sshd.sshArgs(), 'echo', 'ok'], { env: agentEnv(loginSock) });
    expect(denied.code, diagnostics(denied)).toBe(255);
    expect(denied.stdout).toBe('');
    expect(denied.stderr).toMatch(/Permission denied/);

    // Control: the same authorized key works through its own scope's socket.
    const allowed = await run('ssh', [...sshd.sshArgs(), 'echo', 'ok'], { env: agentEnv(otherSock) });
    expect(allowed.code, diagnostics(allowed)).toBe(0);
    expect(allowed.stdout).toBe('ok\n');
  });
});

// ---------------------------------------------------------------------------------------------
// 5. git push over ssh
// ---------------------------------------------------------------------------------------------

describe('git push over ssh', () => {
  it('pushes a commit to a bare repository with the scope socket as the agent', async () => {
    authorize(...nonEmptyLines(keyholdOk(k, ['key', 'pub', 'login'])));
    const dir = mkdtempSync(join(work, 'git-'));
    const bare = join(dir, 'remote.git');
    const repo = join(dir, 'work');
    const gitEnv = agentEnv(loginSock, {
      GIT_CONFIG_NOSYSTEM: '1',
      GIT_CONFIG_GLOBAL: '/dev/null',
      GIT_TERMINAL_PROMPT: '0',
      GIT_AUTHOR_NAME: 'keyhold e2e',
      GIT_AUTHOR_EMAIL: 'e2e@example.test',
      GIT_COMMITTER_NAME: 'keyhold e2e',
      GIT_COMMITTER_EMAIL: 'e2e@example.test',
      GIT_SSH_COMMAND: sshd.sshCommand(),
    });
    const git = async (args: string[], env = gitEnv): Promise<Run> => run('git', args, { env, cwd: repo });
    const ok = async (args: string[]): Promise<string> => {
      const r = await git(args);
      if (r.code !== 0) throw new Error(`git ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
      return r.stdout.trim();
    };

    let r = await run('git', ['init', '-q', '--bare', bare], { env: gitEnv });
    expect(r.code, r.stderr).toBe(0);
    r = await run('git', ['init', '-q', '-b', 'main', repo], { env: gitEnv });
    expect(r.code, r.stderr).toBe(0);
    writeFileSync(join(repo, 'README'), `hello ${randomBytes(6).toString('hex')}\n`);
    await ok(['add', 'README']);
    await ok(['commit', '-q', '-m', 'first']);
    const head = await ok(['rev-parse', 'HEAD']);
    expect(head).toMatch(/^[0-9a-f]{40}$/);

    const url = `ssh://${sshd.user}@127.0.0.1:${sshd.port}${bare}`;
    const push = await git(['push', '-q', url, 'main']);
    expect(push.code, diagnostics(push)).toBe(0);
    const remoteRef = await run('git', ['--git-dir', bare, 'rev-parse', 'refs/heads/main'], { env: gitEnv });
    expect(remoteRef.code, remoteRef.stderr).toBe(0);
    expect(remoteRef.stdout.trim()).toBe(head);

    // A second commit pushed through a scope with no authorized key is refused; the ref stays.
    writeFileSync(join(repo, 'README'), 'second\n');
    await ok(['commit', '-q', '-a', '-m', 'second']);
    const second = await ok(['rev-parse', 'HEAD']);
    expect(second).not.toBe(head);
    const refused = await git(['push', '-q', url, 'main'], { ...gitEnv, SSH_AUTH_SOCK: otherSock });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/Permission denied/);
    const still = await run('git', ['--git-dir', bare, 'rev-parse', 'refs/heads/main'], { env: gitEnv });
    expect(still.stdout.trim()).toBe(head);

    // And through the right scope it goes.
    const again = await git(['push', '-q', url, 'main']);
    expect(again.code, diagnostics(again)).toBe(0);
    const now = await run('git', ['--git-dir', bare, 'rev-parse', 'refs/heads/main'], { env: gitEnv });
    expect(now.stdout.trim()).toBe(second);
  });
});

// ---------------------------------------------------------------------------------------------
// 7. agent forwarding
// ---------------------------------------------------------------------------------------------

describe('ssh -A (agent forwarding)', () => {
  const forward = ['-o', 'ForwardAgent=yes'];

  it("ssh-add -l on the far side lists the scope's keys", async () => {
    authorize(keys.ed25519!.pubLine);
    const expected = (JSON.parse(keyholdOk(k, ['key', 'list', '--scope', 'login', '--json'])) as Array<{ fingerprint: string }>)
      .map((x) => x.fingerprint)
      .sort();
    expect(expected).toHaveLength(5);
    const r = await run('ssh', [...sshd.sshArgs(forward), 'ssh-add', '-l'], { env: agentEnv(loginSock) });
    expect(r.code, r.stdout + diagnostics(r)).toBe(0);
    const fps = nonEmptyLines(r.stdout).map((l) => l.split(/\s+/)[1]!).sort();
    expect(fps).toEqual(expected);
    expect(fps).not.toContain(keys.other!.fingerprint);
  });

  it('without ForwardAgent the far side has no agent', async () => {
    authorize(keys.ed25519!.pubLine);
    const r = await run('ssh', [...sshd.sshArgs(['-o', 'ForwardAgent=no']), 'ssh-add', '-l'], { env: agentEnv(loginSock) });
    // ssh-add exits 2 when it cannot reach an agent.
    expect(r.code, r.stdout + diagnostics(r)).toBe(2);
  });

  it('a second hop logs in through the forwarded agent; keyhold accepts both session-binds', async () => {
    authorize(keys.ecdsa384!.pubLine);
    const proxy = await RecordingProxy.start(join(work, `proxy-${randomBytes(4).toString('hex')}.sock`), loginSock);
    proxies.push(proxy);
    const hop2 = ['ssh', ...sshd.sshArgs(), 'echo', 'hop2-ok'].map(shellQuote).join(' ');
    const r = await run('ssh', [...sshd.sshArgs(forward), hop2], { env: agentEnv(proxy.path) });
    expect(r.code, r.stdout + diagnostics(r)).toBe(0);
    expect(r.stdout).toBe('hop2-ok\n');

    const hostKey = blobOfLine(sshd.hostKeyPub);
    const binds: Array<{ conv: number; index: number; isForwarding: boolean; reply: number | undefined }> = [];
    proxy.conversations.forEach((conv, ci) => {
      conv.requests.forEach((req, ri) => {
        const parsed = parseRequest(req);
        if (parsed.type !== 'extension' || parsed.name !== 'session-bind@openssh.com') return;
        const bind = parseSessionBind(parsed.contents);
        expect(bind.hostKey.equals(hostKey)).toBe(true);
        binds.push({ conv: ci, index: ri, isForwarding: bind.isForwarding, reply: conv.responses[ri]?.[0] });
      });
    });
    // First hop: ssh binds its own auth connection (is_forwarding = 0)…
    const authBinds = binds.filter((b) => !b.isForwarding);
    const fwdBinds = binds.filter((b) => b.isForwarding);
    expect(fwdBinds.length, JSON.stringify(binds)).toBeGreaterThanOrEqual(1);
    expect(authBinds.length, JSON.stringify(binds)).toBeGreaterThanOrEqual(2);
    // …every bind is answered SSH_AGENT_SUCCESS (6).
    for (const b of binds) expect(b.reply, JSON.stringify(binds) + diagnostics(r)).toBe(6);
    // The forwarded connection carries a forwarding bind, then the second hop's auth bind, then a
    // signature (14) for the second hop's login.
    const fwdConv = proxy.conversations[fwdBinds[0]!.conv]!;
    const types = fwdConv.requests.map((q) => q[0]);
    const firstFwd = fwdBinds[0]!.index;
    const hopAuth = binds.find((b) => b.conv === fwdBinds[0]!.conv && !b.isForwarding);
    expect(hopAuth, JSON.stringify(binds)).toBeDefined();
    expect(hopAuth!.index).toBeGreaterThan(firstFwd);
    const signAt = types.indexOf(13, hopAuth!.index);
    expect(signAt, `request types ${JSON.stringify(types)}`).toBeGreaterThan(hopAuth!.index);
    expect(fwdConv.responses[signAt]?.[0]).toBe(14);
  });
});
