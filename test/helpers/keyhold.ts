// Runs the real keyhold CLI and daemon (bin/keyhold, built dist/) in throwaway directories.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const REPO = resolve(import.meta.dirname, '..', '..');
export const KEYHOLD_BIN = join(REPO, 'bin', 'keyhold');

export interface KeyholdEnv {
  dir: string;
  vault: string;
  runtime: string;
  passFile: string;
  passphrase: string;
  env: NodeJS.ProcessEnv;
  cleanup(): void;
}

/** A fresh vault location, runtime dir and passphrase file; nothing created yet. */
export function makeKeyholdEnv(prefix = 'keyhold-test-'): KeyholdEnv {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const passphrase = `test-pass-${Math.random().toString(36).slice(2)}`;
  const passFile = join(dir, 'pass');
  writeFileSync(passFile, passphrase + '\n', { mode: 0o600 });
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(env)) if (name.startsWith('KEYHOLD_') || name === 'SSH_AUTH_SOCK') delete env[name];
  Object.assign(env, {
    KEYHOLD_VAULT: join(dir, 'data', 'vault.db'),
    KEYHOLD_RUNTIME_DIR: join(dir, 'run'),
    KEYHOLD_PASSPHRASE_FILE: passFile,
    // The user's own config file must not reach a test's daemon.
    XDG_CONFIG_HOME: join(dir, 'config'),
    // Tests open the vault hundreds of times; the production scrypt cost would dominate the run.
    KEYHOLD_KDF_LOG2N: '14',
  });
  return {
    dir,
    vault: env.KEYHOLD_VAULT!,
    runtime: env.KEYHOLD_RUNTIME_DIR!,
    passFile,
    passphrase,
    env,
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

export interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function keyhold(k: KeyholdEnv, args: string[], options: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}): RunResult {
  const result = spawnSync(process.execPath, [KEYHOLD_BIN, ...args], {
    env: { ...k.env, ...options.env },
    input: options.input ?? '',
    encoding: 'utf8',
    timeout: 30_000,
  });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Runs keyhold and fails the test with its stderr unless it exits 0. */
export function keyholdOk(k: KeyholdEnv, args: string[], options?: { input?: string | Buffer }): string {
  const result = keyhold(k, args, options);
  if (result.status !== 0) throw new Error(`keyhold ${args.join(' ')} exited ${result.status}: ${result.stderr}`);
  return result.stdout;
}

export async function waitFor(check: () => boolean, timeoutMs = 10_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export interface ServeHandle {
  proc: ChildProcess;
  stderr(): string;
  socket(scope: string): string;
  stop(): Promise<number | null>;
}

const running = new Set<ServeHandle>();

/** Starts `keyhold serve` and waits until it reports ready; `as`: another user runs it (the test runs as root). */
export async function startServe(k: KeyholdEnv, args: string[] = [], env: NodeJS.ProcessEnv = {}, as?: { uid: number; gid: number }): Promise<ServeHandle> {
  const proc = spawn(process.execPath, [KEYHOLD_BIN, 'serve', ...args], {
    env: { ...k.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    ...as,
  });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  proc.stdout!.resume();
  const exited = new Promise<number | null>((res) => proc.once('exit', (code) => res(code)));
  const handle: ServeHandle = {
    proc,
    stderr: () => stderr,
    socket: (scope) => join(k.runtime, 'scopes', `${scope}.sock`),
    async stop() {
      running.delete(handle);
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM');
        // A stop closes the vault (audit fsync, WAL checkpoint): on a CI machine busy with two test
        // files' daemons and builds that once took over 5 s. A daemon that needs the SIGKILL says
        // where it stood, for the test that then fails on its exit code.
        const timer = setTimeout(() => {
          console.error(`keyhold serve (pid ${proc.pid}) did not stop within 15 s of SIGTERM; its log ends:\n${stderr.split('\n').slice(-8).join('\n')}`);
          proc.kill('SIGKILL');
        }, 15_000);
        const code = await exited;
        clearTimeout(timer);
        return code;
      }
      return proc.exitCode;
    },
  };
  running.add(handle);
  try {
    await waitFor(() => stderr.includes('keyhold daemon ready') || proc.exitCode !== null, 15_000, 'keyhold serve');
  } catch (err) {
    await handle.stop();
    throw new Error(`${(err as Error).message}\n${stderr}`);
  }
  if (proc.exitCode !== null) throw new Error(`keyhold serve exited ${proc.exitCode}: ${stderr}`);
  return handle;
}

export async function stopAllServes(): Promise<void> {
  await Promise.all([...running].map((h) => h.stop()));
}

/** A vault with an initialised passphrase factor. */
export function initVault(k: KeyholdEnv): void {
  keyholdOk(k, ['init']);
}

export function fileContains(path: string, needle: Buffer | string): boolean {
  return existsSync(path) && readFileSync(path).includes(needle);
}

// The raw agent client and the frame encoder live in raw-wire.ts; re-exported for existing imports.
export { RawConn as RawAgentClient, frame as frameBytes } from './raw-wire.js';

/** Whether `pid` runs (a zombie or dead process has exited). */
export function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2)[0];
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/** The pid in `<runtime>/daemon.pid`, or null. */
export function daemonPid(runtime: string): number | null {
  try {
    const pid = Number(readFileSync(join(runtime, 'daemon.pid'), 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

export function isKeyholdServe(pid: number): boolean {
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.includes(KEYHOLD_BIN) && argv.includes('serve');
  } catch {
    return false;
  }
}

/**
 * Stops the daemon named by `<runtime>/daemon.pid` (one `keyhold unlock` started in the
 * background, say) if it is a live `keyhold serve`, and waits for it: SIGTERM, then SIGKILL.
 */
export async function stopBackgroundDaemon(runtime: string): Promise<void> {
  const pid = daemonPid(runtime);
  if (pid === null || pid === process.pid || !processAlive(pid) || !isKeyholdServe(pid)) return;
  try {
    process.kill(pid, 'SIGTERM');
    await waitFor(() => !processAlive(pid), 5000, `daemon ${pid} to exit`);
  } catch {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      return;
    }
    await waitFor(() => !processAlive(pid), 3000, `daemon ${pid} to die`);
  }
}

/** Runs `keyhold serve ARGS` expecting it to exit by itself (kills it and fails if it does not). */
export function serveExpectingExit(
  k: KeyholdEnv,
  args: string[] = [],
  timeoutMs = 15_000,
  env: NodeJS.ProcessEnv = k.env,
): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [KEYHOLD_BIN, 'serve', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    proc.stdout!.resume();
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`keyhold serve did not exit within ${timeoutMs} ms: ${stderr}`));
    }, timeoutMs);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}
