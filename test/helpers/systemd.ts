// The contrib/systemd units as an install would have them, and a throwaway systemd user manager to
// run them in: real systemd-analyze, real systemd, no PID 1 systemd needed.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO, waitFor } from './keyhold.js';

export const UNITS_DIR = join(REPO, 'contrib', 'systemd');
/** The program the shipped units name; `keyhold doctor --unit` swaps it for this install's. */
export const SHIPPED_PROGRAM = '/usr/bin/keyhold';

export function unitText(file: string): string {
  return readFileSync(join(UNITS_DIR, file), 'utf8');
}

/** `file`'s text with ExecStart's program replaced by `program`, as an install writes it. */
export function installedUnitText(file: string, program: string): string {
  const text = unitText(file);
  const replaced = text.replace(/^ExecStart=\S+/m, `ExecStart=${program}`);
  if (replaced === text) throw new Error(`${file} has no ExecStart=`);
  return replaced;
}

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env, timeout = 30_000): Run {
  const result = spawnSync(cmd, args, { env, encoding: 'utf8', timeout });
  return { status: result.status, stdout: result.stdout ?? '', stderr: (result.stderr ?? '') + (result.error ? String(result.error) : '') };
}

/** The score `systemd-analyze security` prints last: "→ Overall exposure level for X: 0.8 SAFE". */
export function exposure(output: string): number {
  const match = /Overall exposure level for \S+: (\d+(?:\.\d+)?)/.exec(output);
  if (!match) throw new Error(`no exposure level in:\n${output}`);
  return Number(match[1]);
}

const CGROUP_ROOT = '/sys/fs/cgroup';

export interface UserManager {
  /** $XDG_RUNTIME_DIR of the manager (and of its services: %t). */
  runtimeDir: string;
  env: NodeJS.ProcessEnv;
  systemctl(args: string[]): Run;
  /** Stops the manager and everything it started, and removes its cgroups and runtime dir. */
  stop(): Promise<void>;
}

/**
 * Starts `systemd --user` for root with `home` as its $HOME (%h) and a fresh $XDG_RUNTIME_DIR
 * under /run (%t; not under /tmp, which PrivateTmp= hides from the services).
 *
 * What it takes without systemd as PID 1, all of it inside a mount namespace of its own so the
 * host is untouched:
 *  - systemd --user refuses to start unless /run/systemd/system exists ("Trying to run as user
 *    instance, but the system has not been booted with systemd."): a tmpfs over /run/systemd
 *    holds that directory, in this namespace only;
 *  - a cgroup of its own in each hierarchy: a manager left in the root cgroup would move every
 *    process of the machine into its init.scope;
 *  - $XDG_RUNTIME_DIR a shared mount, so the credentials directory systemd mounts for a service
 *    (in a child namespace) propagates back to the manager;
 *  - /dev/console bound to a file: the manager's own log (there is no journal).
 */
export async function startUserManager(home: string): Promise<UserManager> {
  if (process.getuid!() !== 0) throw new Error('a systemd user manager without PID 1 systemd needs root here (mount namespace, cgroups)');
  const runtimeDir = mkdtempSync('/run/keyhold-systemd-test-');
  const cgroup = `keyhold-systemd-test-${process.pid}-${Date.now()}`;
  const managerLog = join(runtimeDir, 'manager.log');
  writeFileSync(managerLog, '');
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: home, XDG_RUNTIME_DIR: runtimeDir, LANG: 'C.UTF-8' };
  const script = [
    'set -e',
    // Every hierarchy that takes the process; cpuset (no cpus/mems set) refuses it, and stays as is.
    `for h in ${CGROUP_ROOT}/*/; do mkdir "$h$CG" && { echo $$ > "$h$CG/cgroup.procs" 2>/dev/null || rmdir "$h$CG"; }; done`,
    'grep -q "name=systemd:/$CG$" /proc/self/cgroup',
    'grep -q "^0::/$CG$" /proc/self/cgroup',
    'mount --bind "$LOG" /dev/console',
    'mount -t tmpfs -o mode=0755 keyhold-test /run/systemd',
    'mkdir /run/systemd/system',
    'mount --bind "$XDG_RUNTIME_DIR" "$XDG_RUNTIME_DIR"',
    'mount --make-shared "$XDG_RUNTIME_DIR"',
    'exec /usr/lib/systemd/systemd --user --log-level=info --log-target=console',
  ].join('\n');
  let output = '';
  const manager: ChildProcess = spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], {
    env: { ...env, CG: cgroup, LOG: managerLog },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  manager.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  manager.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const exited = new Promise<void>((resolve) => manager.once('exit', () => resolve()));

  const removeCgroups = () => {
    for (const hierarchy of readdirSync(CGROUP_ROOT)) {
      const dir = join(CGROUP_ROOT, hierarchy, cgroup);
      if (!existsSync(dir)) continue;
      // Whatever the manager left running (it was killed, say) goes first.
      for (const pid of run('find', [dir, '-name', 'cgroup.procs', '-exec', 'cat', '{}', '+']).stdout.split('\n').filter(Boolean)) {
        try {
          process.kill(Number(pid), 'SIGKILL');
        } catch {
          /* gone */
        }
      }
      run('find', [dir, '-depth', '-type', 'd', '-exec', 'rmdir', '{}', ';']);
    }
  };
  const stop = async () => {
    if (manager.exitCode === null && manager.signalCode === null) {
      manager.kill('SIGTERM');
      const killed = setTimeout(() => manager.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(killed);
    }
    // The cgroups empty a moment after their last process exits.
    for (let attempt = 0; attempt < 20; attempt++) {
      removeCgroups();
      if (!readdirSync(CGROUP_ROOT).some((h) => existsSync(join(CGROUP_ROOT, h, cgroup)))) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    rmSync(runtimeDir, { recursive: true, force: true });
  };

  try {
    await waitFor(() => existsSync(join(runtimeDir, 'systemd', 'private')) || manager.exitCode !== null, 15_000, 'the systemd user manager');
  } catch (err) {
    await stop();
    throw err;
  }
  if (manager.exitCode !== null) {
    const log = readFileSync(managerLog, 'utf8');
    await stop();
    throw new Error(`systemd --user exited ${manager.exitCode}: ${output}${log}`);
  }
  return {
    runtimeDir,
    env,
    systemctl: (args) => run('systemctl', ['--user', '--no-pager', ...args], env),
    stop,
  };
}

/** A home directory under /home (PrivateTmp= hides /tmp from the service; ProtectHome= applies here). */
export function makeHome(): string {
  mkdirSync('/home', { recursive: true });
  return mkdtempSync('/home/keyhold-systemd-test-');
}

/**
 * This checkout's keyhold copied into `home` (bin, dist, node_modules, package.json), and the path
 * of its entry: where a real install would be for the service, whatever the checkout's place (a
 * clone under /tmp is hidden from the service by PrivateTmp=).
 */
export function installForService(home: string): string {
  const target = join(home, '.local', 'lib', 'keyhold');
  mkdirSync(target, { recursive: true });
  for (const part of ['bin', 'dist', 'node_modules', 'package.json']) {
    cpSync(join(REPO, part), join(target, part), { recursive: true, verbatimSymlinks: true });
  }
  return join(target, 'bin', 'keyhold');
}

