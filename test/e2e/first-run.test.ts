// `npm start` on a fresh clone: it says what it does on each slow step, in order, on stderr, and ends
// with the export line (stdout) and how to use it from another shell; run again, it skips what is
// done. Runs in a copy of the checkout (its own dist/ and node_modules: start.sh builds and may
// reinstall) with a temp HOME and XDG dirs.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { daemonPid, processAlive, REPO, waitFor } from '../helpers/keyhold.js';

let root: string;
let checkout: string;
let env: NodeJS.ProcessEnv;
const started = new Set<ChildProcess>();

interface StartRun {
  proc: ChildProcess;
  stdout(): string;
  stderr(): string;
  exit: Promise<number | null>;
}

/** `npm start` in its own process group, as from a terminal, so that a Ctrl-C can reach all of it. */
function npmStart(): StartRun {
  const proc = spawn('npm', ['start'], { cwd: checkout, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  started.add(proc);
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  proc.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exit = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  return { proc, stdout: () => stdout, stderr: () => stderr, exit };
}

async function untilReady(run: StartRun, timeoutMs: number): Promise<void> {
  await waitFor(() => run.stderr().includes('Ctrl-C here stops the daemon') || run.proc.exitCode !== null, timeoutMs, 'npm start to be ready').catch(
    (err: Error) => {
      throw new Error(`${err.message}\n${run.stdout()}\n${run.stderr()}`);
    },
  );
  expect(run.proc.exitCode, run.stderr()).toBeNull();
}

/** The keyhold lines of start.sh's stderr (the daemon's own log lines are JSON). */
function startMessages(stderr: string): string[] {
  return stderr.split('\n').filter((line) => line.startsWith('keyhold: '));
}

function keyhold(args: string[], extraEnv: NodeJS.ProcessEnv = {}) {
  return spawnSync(process.execPath, [join(checkout, 'bin', 'keyhold'), ...args], { env: { ...env, ...extraEnv }, encoding: 'utf8', timeout: 30_000 });
}

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'keyhold-first-run-'));
  checkout = join(root, 'checkout');
  mkdirSync(checkout);
  for (const entry of ['package.json', 'package-lock.json', 'tsconfig.json', 'src', 'bin', 'scripts', 'node_modules']) {
    cpSync(join(REPO, entry), join(checkout, entry), { recursive: true, preserveTimestamps: true, verbatimSymlinks: true });
  }
  // node_modules as npm ci leaves it: newer than the lockfile, so start.sh does not reinstall.
  const now = new Date();
  utimesSync(join(checkout, 'node_modules', '.package-lock.json'), now, now);
  const home = join(root, 'home');
  mkdirSync(join(root, 'run'), { mode: 0o700 });
  env = {
    PATH: [dirname(process.execPath), '/usr/local/bin', '/usr/bin', '/bin'].join(':'),
    HOME: home,
    XDG_CONFIG_HOME: join(home, '.config'),
    XDG_DATA_HOME: join(home, '.local', 'share'),
    XDG_RUNTIME_DIR: join(root, 'run'),
    LANG: 'C.UTF-8',
    // The vault's scrypt cost at the test suites' level: this test is about start.sh, not the KDF.
    KEYHOLD_KDF_LOG2N: '14',
  };
});

afterAll(async () => {
  for (const proc of started) {
    if (proc.exitCode === null && proc.signalCode === null) {
      try {
        process.kill(-proc.pid!, 'SIGTERM');
      } catch {
        // already gone
      }
    }
  }
  const pid = daemonPid(join(root, 'run', 'keyhold'));
  if (pid !== null) await waitFor(() => !processAlive(pid), 5000, 'the daemon to stop').catch(() => process.kill(pid, 'SIGKILL'));
  rmSync(root, { recursive: true, force: true });
});

describe('npm start', () => {
  const socket = () => join(env.XDG_RUNTIME_DIR!, 'keyhold', 'scopes', 'default.sock');

  it('the first time: builds, creates the vault and a key, starts the daemon, then prints the export line and how to use it', async () => {
    const run = npmStart();
    await untilReady(run, 150_000);
    const messages = startMessages(run.stderr());
    const order = [
      'keyhold: building…',
      'keyhold: creating the vault…',
      'keyhold: created ',
      'keyhold: generating an ed25519 key in scope "default"…',
      'keyhold: starting the daemon…',
      'keyhold: ready. In another shell:',
      'keyhold: then ssh-add -l lists the key',
    ];
    const positions = order.map((start) => messages.findIndex((line) => line.startsWith(start)));
    expect(positions, messages.join('\n')).not.toContain(-1);
    expect([...positions].sort((a, b) => a - b)).toEqual(positions);
    expect(messages.at(-1)).toContain('Ctrl-C here stops the daemon');
    expect(messages.some((line) => line.includes('installing npm dependencies'))).toBe(false);
    // The last line on stdout is the one to paste, and it works as soon as it is printed.
    expect(run.stdout().trim().split('\n').at(-1)).toBe(`export SSH_AUTH_SOCK=${socket()}`);
    const listed = spawnSync('ssh-add', ['-l'], { env: { ...env, SSH_AUTH_SOCK: socket() }, encoding: 'utf8', timeout: 10_000 });
    expect(listed.status, listed.stderr).toBe(0);
    expect(listed.stdout).toContain('keyhold-default (ED25519)');

    const stop = keyhold(['stop']);
    expect(stop.status, stop.stderr).toBe(0);
    expect(await run.exit).toBe(0);
  }, 200_000);

  it('again: none of the slow steps, and Ctrl-C stops the daemon and the script', async () => {
    const run = npmStart();
    await untilReady(run, 60_000);
    expect(startMessages(run.stderr())).toEqual([
      'keyhold: starting the daemon…',
      'keyhold: ready. In another shell:',
      expect.stringContaining('keyhold: then ssh-add -l lists the key'),
    ]);
    expect(run.stdout().trim().split('\n').at(-1)).toBe(`export SSH_AUTH_SOCK=${socket()}`);
    const pid = daemonPid(join(env.XDG_RUNTIME_DIR!, 'keyhold'));
    expect(pid).not.toBeNull();

    process.kill(-run.proc.pid!, 'SIGINT');
    await Promise.race([run.exit, new Promise((_, reject) => setTimeout(() => reject(new Error('npm start did not end on SIGINT')), 15_000))]);
    await waitFor(() => !processAlive(pid!), 5000, 'the daemon to stop');
    expect(existsSync(socket())).toBe(false);
  }, 90_000);
});

describe('scripts/lib.sh', () => {
  it('names the packages a native build needs when it cannot install them (not root)', () => {
    // A PATH with `id` and nothing of a toolchain, and a user who may not run apt-get.
    const bin = mkdtempSync(join(tmpdir(), 'keyhold-bare-bin-'));
    chmodSync(bin, 0o755);
    symlinkSync('/usr/bin/id', join(bin, 'id'));
    const script = `. scripts/lib.sh && PATH=${bin} ensure_os_packages "\${NATIVE_BUILD_PACKAGES[@]}"`;
    let result;
    try {
      result = spawnSync('runuser', ['-u', 'nobody', '--', '/bin/bash', '-c', script], { cwd: REPO, encoding: 'utf8', timeout: 10_000 });
    } finally {
      rmSync(bin, { recursive: true, force: true });
    }
    expect(result.status).toBe(1);
    expect(result.stderr).toBe(
      'keyhold: missing build-essential make python3 (install them: sudo apt-get install build-essential make python3)\n',
    );
  });
});
