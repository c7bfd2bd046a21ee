/**
 * Test harness: runs a real OpenSSH sshd on 127.0.0.1 with a throwaway host key
 * and authorized_keys file, so tests can drive `ssh`/`git` through an agent.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { accessSync, constants as fsConstants, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export const SSHD_PATH = '/usr/sbin/sshd';

/** What a finished command printed, and how it exited. */
export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command (ssh, ssh-add, git, …) to completion, capturing its output; SIGKILL after `timeoutMs`. */
export function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: opts.timeoutMs ?? 20_000,
      killSignal: 'SIGKILL',
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const STARTUP_TIMEOUT_MS = 10_000;
const STOP_GRACE_MS = 2_000;
const MAX_PORT_ATTEMPTS = 5;
const STDERR_LIMIT = 64 * 1024;

export interface SshdHandle {
  port: number;
  /** Temp dir holding config, host key, authorized_keys and known_hosts; removed by stop(). */
  dir: string;
  /** Host public key line, e.g. "ssh-ed25519 AAAA... comment". */
  hostKeyPub: string;
  knownHostsFile: string;
  user: string;
  /** `user@127.0.0.1`, the destination sshArgs() ends with. */
  destination: string;
  /** Path of the authorized_keys file sshd reads (re-read on every connection, so tests may rewrite it). */
  authorizedKeysFile: string;
  /** Args for `ssh`: options, then `extra` (more options), then the destination. Append the remote command. */
  sshArgs(extra?: string[]): string[];
  /**
   * Shell string for GIT_SSH_COMMAND: `ssh` plus the same options but WITHOUT the destination,
   * because git appends its own host and command (use `user@127.0.0.1:path` as the git URL).
   */
  sshCommand(): string;
  /** sshd's stderr captured so far (bounded). */
  stderr(): string;
  stop(): Promise<void>;
}

export interface StartSshdOptions {
  /** authorized_keys lines. */
  authorizedKeys: string[];
  /**
   * Extra sshd_config lines. Lines before the first `Match` are placed ahead of the harness
   * defaults (sshd keeps the first value it sees, so they override); a `Match` block goes last.
   */
  extraConfig?: string[];
}

const running = new Set<RunningSshd>();

export function sshdAvailable(): boolean {
  try {
    accessSync(SSHD_PATH, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

export async function stopAllSshd(): Promise<void> {
  await Promise.all([...running].map((s) => s.stop()));
}

// A crashed test run must not leave sshd listening; the kill is synchronous so it works in 'exit'.
process.once('exit', () => {
  for (const s of running) s.killNow();
});

export async function startSshd(opts: StartSshdOptions): Promise<SshdHandle> {
  if (!sshdAvailable()) throw new Error(`${SSHD_PATH} is not executable`);
  const isRoot = process.getuid?.() === 0;
  if (isRoot) {
    // Privilege-separation chroot dir; sshd refuses to start without it when run as root.
    mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
  }
  const user = os.userInfo().username;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'keyhold-sshd-'));
  try {
    const hostKey = path.join(dir, 'ssh_host_ed25519_key');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'keyhold-test-host', '-f', hostKey], {
      stdio: ['ignore', 'ignore', 'pipe'],
      timeout: 10_000,
    });
    const hostKeyPub = readFileSync(`${hostKey}.pub`, 'utf8').trim();
    const authorizedKeysFile = path.join(dir, 'authorized_keys');
    writeFileSync(authorizedKeysFile, opts.authorizedKeys.map((l) => `${l.trim()}\n`).join(''), { mode: 0o600 });

    let lastError: Error | undefined;
    for (let attempt = 0; attempt < MAX_PORT_ATTEMPTS; attempt++) {
      const port = await freePort();
      const configFile = path.join(dir, 'sshd_config');
      writeFileSync(configFile, sshdConfig({ port, hostKey, authorizedKeysFile, extra: opts.extraConfig ?? [] }));
      const proc = new RunningSshd(spawn(SSHD_PATH, ['-D', '-e', '-f', configFile], {
        stdio: ['ignore', 'ignore', 'pipe'],
        // Own process group so stop() also reaches per-connection children.
        detached: true,
      }), dir);
      running.add(proc);
      try {
        await proc.waitForBanner(port, STARTUP_TIMEOUT_MS);
      } catch (err) {
        const bindFailed = /Bind to port|Cannot bind any address|Address already in use/i.test(proc.stderrText());
        await proc.stop({ keepDir: true });
        lastError = err instanceof Error ? err : new Error(String(err));
        if (bindFailed) continue;
        throw lastError;
      }
      const knownHostsFile = path.join(dir, 'known_hosts');
      writeFileSync(knownHostsFile, `[127.0.0.1]:${port} ${hostKeyPub}\n`);
      return makeHandle({ proc, port, dir, hostKeyPub, knownHostsFile, user, authorizedKeysFile });
    }
    throw lastError ?? new Error('sshd failed to start');
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

function makeHandle(h: {
  proc: RunningSshd;
  port: number;
  dir: string;
  hostKeyPub: string;
  knownHostsFile: string;
  user: string;
  authorizedKeysFile: string;
}): SshdHandle {
  const destination = `${h.user}@127.0.0.1`;
  const options = [
    '-F', '/dev/null',
    '-p', String(h.port),
    '-o', `UserKnownHostsFile=${h.knownHostsFile}`,
    '-o', 'GlobalKnownHostsFile=/dev/null',
    '-o', 'StrictHostKeyChecking=yes',
    '-o', 'PasswordAuthentication=no',
    '-o', 'KbdInteractiveAuthentication=no',
    '-o', 'BatchMode=yes',
    '-o', 'IdentityFile=none',
    '-o', 'ConnectTimeout=10',
    '-o', 'LogLevel=ERROR',
  ];
  return {
    port: h.port,
    dir: h.dir,
    hostKeyPub: h.hostKeyPub,
    knownHostsFile: h.knownHostsFile,
    user: h.user,
    destination,
    authorizedKeysFile: h.authorizedKeysFile,
    sshArgs: (extra = []) => [...options, ...extra, destination],
    sshCommand: () => ['ssh', ...options].map(shellQuote).join(' '),
    stderr: () => h.proc.stderrText(),
    stop: () => h.proc.stop(),
  };
}

class RunningSshd {
  private stderrChunks: Buffer[] = [];
  private stderrBytes = 0;
  private readonly exited: Promise<void>;
  private hasExited = false;
  private stopping: Promise<void> | undefined;

  constructor(
    private readonly child: ChildProcess,
    private readonly dir: string,
  ) {
    child.stderr?.on('data', (chunk: Buffer) => {
      this.stderrChunks.push(chunk);
      this.stderrBytes += chunk.length;
      while (this.stderrBytes > STDERR_LIMIT && this.stderrChunks.length > 1) {
        this.stderrBytes -= this.stderrChunks.shift()!.length;
      }
    });
    this.exited = new Promise<void>((resolve) => {
      child.once('exit', () => resolve());
      child.once('error', () => resolve());
    }).then(() => {
      this.hasExited = true;
    });
  }

  stderrText(): string {
    return Buffer.concat(this.stderrChunks).toString('utf8');
  }

  async waitForBanner(port: number, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let lastErr = 'timed out';
    while (Date.now() < deadline) {
      if (this.hasExited) {
        throw new Error(`sshd exited during startup (code ${this.child.exitCode}):\n${this.stderrText()}`);
      }
      try {
        const banner = await readBanner(port, Math.min(2_000, Math.max(100, deadline - Date.now())));
        if (banner.startsWith('SSH-2.0-')) return;
        lastErr = `unexpected banner ${JSON.stringify(banner)}`;
      } catch (err) {
        lastErr = err instanceof Error ? err.message : String(err);
      }
      await sleep(50);
    }
    throw new Error(`sshd did not accept connections on 127.0.0.1:${port} within ${timeoutMs} ms (${lastErr}):\n${this.stderrText()}`);
  }

  killNow(): void {
    if (this.hasExited || this.child.pid === undefined) return;
    try {
      process.kill(-this.child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }

  stop(opts: { keepDir?: boolean } = {}): Promise<void> {
    this.stopping ??= this.doStop(opts.keepDir ?? false);
    return this.stopping;
  }

  private async doStop(keepDir: boolean): Promise<void> {
    const pid = this.child.pid;
    if (!this.hasExited && pid !== undefined) {
      signalGroup(pid, 'SIGTERM');
      const timer = setTimeout(() => signalGroup(pid, 'SIGKILL'), STOP_GRACE_MS);
      await this.exited;
      clearTimeout(timer);
    }
    // Connection children may outlive the listener after SIGTERM.
    if (pid !== undefined) signalGroup(pid, 'SIGKILL');
    running.delete(this);
    if (!keepDir) await rm(this.dir, { recursive: true, force: true });
  }
}

function signalGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // group already gone
  }
}

function sshdConfig(c: { port: number; hostKey: string; authorizedKeysFile: string; extra: string[] }): string {
  const matchAt = c.extra.findIndex((l) => /^\s*Match\s/i.test(l));
  const early = matchAt < 0 ? c.extra : c.extra.slice(0, matchAt);
  const late = matchAt < 0 ? [] : c.extra.slice(matchAt);
  return [
    ...early,
    `ListenAddress 127.0.0.1:${c.port}`,
    `HostKey ${c.hostKey}`,
    `AuthorizedKeysFile ${c.authorizedKeysFile}`,
    'StrictModes no',
    'UsePAM no',
    'PidFile none',
    'PermitRootLogin prohibit-password',
    'PubkeyAuthentication yes',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    'AllowAgentForwarding yes',
    // Agents under test may hold several keys; don't let the default of 6 tries bite.
    'MaxAuthTries 20',
    'UseDNS no',
    'PrintMotd no',
    'PrintLastLog no',
    'LogLevel INFO',
    ...late,
    '',
  ].join('\n');
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error('could not allocate a port'))));
    });
  });
}

function readBanner(port: number, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (err: Error | null, value?: string) => {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(value ?? '');
    };
    const timer = setTimeout(() => done(new Error('banner timeout')), timeoutMs);
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) done(null, buf.slice(0, nl).replace(/\r$/, ''));
      else if (buf.length > 1024) done(new Error('no banner line in first 1 KiB'));
    });
    sock.once('error', (e) => done(e));
    sock.once('close', () => done(new Error('connection closed before banner')));
  });
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
