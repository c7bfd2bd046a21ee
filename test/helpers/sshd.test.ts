import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startSshd, stopAllSshd, type SshdHandle } from './sshd.js';

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env, timeoutMs = 20_000): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs, killSignal: 'SIGKILL' });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe('sshd harness', () => {
  let tmp: string;
  let agent: ChildProcess | undefined;
  let agentEnv: NodeJS.ProcessEnv;
  let authorizedPub: string;
  let otherPub: string;
  let sshd: SshdHandle;

  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'keyhold-sshd-test-'));
    const sock = path.join(tmp, 'agent.sock');
    agent = spawn('ssh-agent', ['-D', '-a', sock], { stdio: 'ignore' });
    await waitFor(() => existsSync(sock), 5_000, 'ssh-agent socket');
    agentEnv = { ...process.env, SSH_AUTH_SOCK: sock };

    for (const name of ['authorized', 'other']) {
      const r = await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', `keyhold-${name}`, '-f', path.join(tmp, name)]);
      expect(r.code, r.stderr).toBe(0);
    }
    authorizedPub = readFileSync(path.join(tmp, 'authorized.pub'), 'utf8').trim();
    otherPub = readFileSync(path.join(tmp, 'other.pub'), 'utf8').trim();
    const added = await run('ssh-add', ['-q', path.join(tmp, 'authorized')], agentEnv);
    expect(added.code, added.stderr).toBe(0);
    // The private key now lives only in the agent.
    await rm(path.join(tmp, 'authorized'));
    await rm(path.join(tmp, 'other'));

    sshd = await startSshd({ authorizedKeys: [authorizedPub] });
  }, 30_000);

  afterAll(async () => {
    await stopAllSshd();
    if (agent && agent.exitCode === null) {
      const exited = new Promise((r) => agent!.once('exit', r));
      agent.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 2_000))]);
      if (agent.exitCode === null && agent.signalCode === null) agent.kill('SIGKILL');
    }
    if (tmp) await rm(tmp, { recursive: true, force: true });
  }, 15_000);

  it('logs in with an agent-held key and runs commands', async () => {
    const t = await run('ssh', [...sshd.sshArgs(), 'true'], agentEnv);
    expect(t.code, t.stderr + sshd.stderr()).toBe(0);

    const hi = await run('ssh', [...sshd.sshArgs(), 'echo', 'hi'], agentEnv);
    expect(hi.code, hi.stderr).toBe(0);
    expect(hi.stdout.trim()).toBe('hi');
  }, 30_000);

  it('sshCommand() works as a shell command (GIT_SSH_COMMAND style)', async () => {
    const r = await run('sh', ['-c', `${sshd.sshCommand()} "$@"`, 'sh', sshd.destination, 'echo', 'via-sh'], agentEnv);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe('via-sh');
  }, 30_000);

  it('rejects the login when the agent key is not authorized', async () => {
    const other = await startSshd({ authorizedKeys: [otherPub] });
    try {
      expect(other.port).not.toBe(sshd.port);
      const r = await run('ssh', [...other.sshArgs(), 'true'], agentEnv);
      expect(r.code).toBe(255);
      expect(r.stderr).toMatch(/Permission denied/);
    } finally {
      await other.stop();
    }
    expect(existsSync(other.dir)).toBe(false);
  }, 30_000);
});
