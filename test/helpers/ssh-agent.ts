/**
 * Test harness: a real OpenSSH `ssh-agent -D -a <sock>` in a throwaway directory, keys made with
 * `ssh-keygen` and loaded with `ssh-add`. Every agent started here is stopped by stop() /
 * stopAllSshAgents(), and killed synchronously if the test process exits first.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const START_TIMEOUT_MS = 10_000;
const STOP_GRACE_MS = 3_000;

export interface KeyPair {
  /** Private key file (no passphrase). */
  path: string;
  /** `<path>.pub` */
  pubPath: string;
  /** `type base64 comment` */
  pubLine: string;
  /** `SHA256:…`, as `ssh-keygen -lf` prints it. */
  fingerprint: string;
}

/** `ssh-keygen -t type [-b bits]` into `dir/name` (no passphrase). */
export function generateKeyPair(dir: string, name: string, type: 'ed25519' | 'rsa' | 'ecdsa', bits?: number): KeyPair {
  const path = join(dir, name);
  const args = ['-q', '-t', type, '-N', '', '-C', `keyhold-test-${name}`, '-f', path];
  if (bits !== undefined) args.splice(1, 0, '-b', String(bits));
  execFileSync('ssh-keygen', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 30_000 });
  const pubPath = `${path}.pub`;
  return { path, pubPath, pubLine: readFileSync(pubPath, 'utf8').trim(), fingerprint: keyFingerprint(pubPath) };
}

/** The `SHA256:…` fingerprint `ssh-keygen -lf` prints for a key file. */
export function keyFingerprint(file: string): string {
  const out = execFileSync('ssh-keygen', ['-lf', file], { encoding: 'utf8', timeout: 10_000 });
  const fp = out.split(/\s+/)[1];
  if (!fp?.startsWith('SHA256:')) throw new Error(`unexpected ssh-keygen -lf output: ${out}`);
  return fp;
}

/**
 * `ssh-add -l` against `sock`: the listed fingerprints, [] when the agent has no identities.
 * Throws when ssh-add cannot talk to the agent (exit 2).
 */
export function agentFingerprints(sock: string): string[] {
  const r = spawnSync('ssh-add', ['-l'], { env: { PATH: process.env.PATH, SSH_AUTH_SOCK: sock }, encoding: 'utf8', timeout: 10_000 });
  if (r.status === 1 && /no identities/i.test(r.stdout + r.stderr)) return [];
  if (r.status !== 0) throw new Error(`ssh-add -l on ${sock} exited ${r.status}: ${r.stdout}${r.stderr}`);
  return r.stdout
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
    .map((l) => l.split(/\s+/)[1]!);
}

export interface SshAgentHandle {
  /** The agent socket (SSH_AUTH_SOCK). */
  sock: string;
  pid: number;
  /** Temp dir holding the socket; removed by stop(). */
  dir: string;
  /** `ssh-add FILE...` */
  add(...keyFiles: string[]): void;
  /** `ssh-add -D` */
  removeAll(): void;
  /** Fingerprints the agent holds (`ssh-add -l`). */
  fingerprints(): string[];
  stop(): Promise<void>;
}

const running = new Set<RunningAgent>();

process.once('exit', () => {
  for (const a of running) a.killNow();
});

class RunningAgent {
  private exitedFlag = false;
  readonly exited: Promise<void>;
  private stopping: Promise<void> | undefined;
  stderr = '';

  constructor(
    readonly child: ChildProcess,
    readonly dir: string,
  ) {
    child.stderr?.on('data', (d: Buffer) => (this.stderr += d.toString()));
    child.stdout?.resume();
    this.exited = new Promise<void>((resolve) => {
      child.once('exit', () => resolve());
      child.once('error', () => resolve());
    }).then(() => {
      this.exitedFlag = true;
    });
  }

  get hasExited(): boolean {
    return this.exitedFlag;
  }

  killNow(): void {
    if (!this.exitedFlag) this.child.kill('SIGKILL');
    rmSync(this.dir, { recursive: true, force: true });
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (!this.exitedFlag) {
        this.child.kill('SIGTERM');
        const timer = setTimeout(() => this.child.kill('SIGKILL'), STOP_GRACE_MS);
        await this.exited;
        clearTimeout(timer);
      }
      running.delete(this);
      rmSync(this.dir, { recursive: true, force: true });
    })();
    return this.stopping;
  }
}

function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** Starts `ssh-agent -D -a <dir>/agent.sock` and waits until its socket accepts connections. */
export async function startSshAgent(): Promise<SshAgentHandle> {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-agent-'));
  const sock = join(dir, 'agent.sock');
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH };
  const child = spawn('ssh-agent', ['-D', '-a', sock], { stdio: ['ignore', 'pipe', 'pipe'], env });
  const agent = new RunningAgent(child, dir);
  running.add(agent);
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    if (agent.hasExited) {
      await agent.stop();
      throw new Error(`ssh-agent exited at start (code ${child.exitCode}): ${agent.stderr}`);
    }
    if (existsSync(sock) && (await canConnect(sock))) break;
    if (Date.now() > deadline) {
      await agent.stop();
      throw new Error(`ssh-agent did not open ${sock} within ${START_TIMEOUT_MS} ms: ${agent.stderr}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  const sshAdd = (args: string[]) => {
    const r = spawnSync('ssh-add', args, { env: { PATH: process.env.PATH, SSH_AUTH_SOCK: sock }, encoding: 'utf8', timeout: 10_000 });
    if (r.status !== 0) throw new Error(`ssh-add ${args.join(' ')} exited ${r.status}: ${r.stdout}${r.stderr}`);
  };
  return {
    sock,
    pid: child.pid!,
    dir,
    add: (...files) => sshAdd(['-q', ...files]),
    removeAll: () => sshAdd(['-q', '-D']),
    fingerprints: () => agentFingerprints(sock),
    stop: () => agent.stop(),
  };
}

export async function stopAllSshAgents(): Promise<void> {
  await Promise.all([...running].map((a) => a.stop()));
}
