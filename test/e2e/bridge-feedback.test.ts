// `keyhold bridge` checks its token before it says ready (a handshake and an identities request
// upstream): a refused token exits 4, an unreachable signer 1; later closes by the signer are
// logged on the bridge. The host's log says why it refused: revoked, expired or unknown.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initVault, KEYHOLD_BIN, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { freePort, identitiesFrame, RawConn } from '../helpers/raw-wire.js';
import { run } from '../helpers/sshd.js';

interface Bridge {
  proc: ChildProcess;
  stdout(): string;
  stderr(): string;
  exited: Promise<number | null>;
  stop(): Promise<void>;
}

const bridges = new Set<Bridge>();

function cleanEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(env)) if (name.startsWith('KEYHOLD_') || name === 'SSH_AUTH_SOCK') delete env[name];
  return { ...env, ...extra };
}

function spawnBridge(connect: string, listen: string, token: string): Bridge {
  const proc = spawn(process.execPath, [KEYHOLD_BIN, 'bridge', '--connect', connect, '--listen', listen], {
    env: cleanEnv({ KEYHOLD_TOKEN: token }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const bridge: Bridge = {
    proc,
    stdout: () => stdout,
    stderr: () => stderr,
    exited,
    async stop() {
      bridges.delete(bridge);
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), 3000);
        await exited;
        clearTimeout(timer);
      }
    },
  };
  bridges.add(bridge);
  return bridge;
}

/** The bridge's exit code, for a bridge expected to end by itself. */
async function exitOf(bridge: Bridge, timeoutMs: number): Promise<number | null> {
  const timeout = new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), timeoutMs));
  const code = await Promise.race([bridge.exited, timeout]);
  if (code === 'timeout') {
    await bridge.stop();
    throw new Error(`keyhold bridge still running after ${timeoutMs} ms; stdout: ${bridge.stdout()} stderr: ${bridge.stderr()}`);
  }
  return code;
}

let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
let port: number;
let counter = 0;
const listenPath = () => join(work, `bridge-${counter++}.sock`);

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-bridge-feedback-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-bf-'));
  initVault(k);
  keyholdOk(k, ['key', 'generate', 'web', '--type', 'ed25519']);
  port = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${port}`]);
}, 60_000);

afterAll(async () => {
  await Promise.all([...bridges].map((b) => b.stop()));
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

function issue(args: string[] = []): { id: string; token: string } {
  return JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--json', ...args])) as { id: string; token: string };
}

/** The daemon's log lines about failed handshakes, parsed. */
function handshakeFailures(): { reason: string; token_id?: string }[] {
  return serve
    .stderr()
    .split('\n')
    .filter((l) => l.includes('token handshake failed'))
    .map((l) => JSON.parse(l) as { reason: string; token_id?: string });
}

async function expectRefused(token: string, hostReason: string, tokenId?: string): Promise<void> {
  const listen = listenPath();
  const before = handshakeFailures().length;
  const bridge = spawnBridge(`tcp:127.0.0.1:${port}`, listen, token);
  const code = await exitOf(bridge, 20_000);
  expect(code, bridge.stderr()).toBe(4);
  expect(bridge.stderr()).toMatch(/^keyhold: token refused \(invalid, expired or revoked\) \(.+\)\n$/);
  expect(bridge.stdout()).not.toContain('SSH_AUTH_SOCK=');
  expect(existsSync(listen)).toBe(false);
  expect(bridge.stderr()).not.toContain(token);
  await waitFor(() => handshakeFailures().length > before, 5000, 'the daemon to log the refusal');
  const logged = handshakeFailures().slice(before);
  expect(logged.map((l) => l.reason)).toContain(hostReason);
  if (tokenId) expect(logged.find((l) => l.reason === hostReason)!.token_id).toBe(tokenId);
  expect(serve.stderr()).not.toContain(token);
}

describe('keyhold bridge checks its token before it says ready', () => {
  it('a valid token: ready, and ssh-add -l lists the key through the bridge', async () => {
    const listen = listenPath();
    const bridge = spawnBridge(`tcp:127.0.0.1:${port}`, listen, issue().token);
    try {
      await waitFor(() => bridge.stdout().includes('SSH_AUTH_SOCK=') || bridge.proc.exitCode !== null, 15_000, 'the bridge');
      expect(bridge.proc.exitCode, bridge.stderr()).toBeNull();
      const r = await run('ssh-add', ['-l'], { env: cleanEnv({ SSH_AUTH_SOCK: listen }), timeoutMs: 15_000 });
      expect(r.code, r.stderr + bridge.stderr()).toBe(0);
      expect(r.stdout).toMatch(/ED25519/);
    } finally {
      await bridge.stop();
    }
  });

  it('a revoked token: exit 4 with the reason; the host log says "token revoked" with its id', async () => {
    const { id, token } = issue();
    keyholdOk(k, ['token', 'revoke', id]);
    await expectRefused(token, 'token revoked', id);
  });

  it('an expired token: exit 4; the host log says "token expired" with its id', async () => {
    const { id, token } = issue(['--ttl', '1s']);
    await new Promise((r) => setTimeout(r, 1500));
    await expectRefused(token, 'token expired', id);
  });

  it('a token the vault never issued: exit 4; the host log says "unknown token"', async () => {
    await expectRefused(`khp_${randomBytes(32).toString('base64url')}`, 'unknown token');
  });

  it('nothing listening at --connect: exit 1 naming the address', async () => {
    const deadPort = await freePort();
    const listen = listenPath();
    const bridge = spawnBridge(`tcp:127.0.0.1:${deadPort}`, listen, issue().token);
    const code = await exitOf(bridge, 25_000);
    expect(code, bridge.stderr()).toBe(1);
    expect(bridge.stderr()).toMatch(new RegExp(`^keyhold: cannot reach the signer at tcp:127\\.0\\.0\\.1:${deadPort}: ECONNREFUSED \\(.+\\)\\n$`));
    expect(existsSync(listen)).toBe(false);
  }, 30_000);

  it('a token revoked after ready: the bridge logs the signer closing the open session, then refusing new ones', async () => {
    const { id, token } = issue();
    const listen = listenPath();
    const bridge = spawnBridge(`tcp:127.0.0.1:${port}`, listen, token);
    try {
      await waitFor(() => bridge.stdout().includes('SSH_AUTH_SOCK=') || bridge.proc.exitCode !== null, 15_000, 'the bridge');
      expect(bridge.proc.exitCode, bridge.stderr()).toBeNull();
      const conn = await RawConn.connect(listen);
      try {
        conn.send(identitiesFrame());
        await conn.reply(10_000);
        keyholdOk(k, ['token', 'revoke', id]);
        await conn.waitClosed(10_000);
      } finally {
        conn.close();
      }
      await waitFor(() => bridge.stderr().includes('the signer closed the session'), 5000, 'the bridge to log the close');
      const r = await run('ssh-add', ['-l'], { env: cleanEnv({ SSH_AUTH_SOCK: listen }), timeoutMs: 15_000 });
      expect(r.code).not.toBe(0);
      await waitFor(() => bridge.stderr().includes('closed the connection without answering: token refused'), 5000, 'the bridge to log the refusal');
      expect(bridge.proc.exitCode, 'the bridge keeps serving').toBeNull();
      expect(bridge.stderr()).not.toContain(token);
    } finally {
      await bridge.stop();
    }
  }, 30_000);
});
