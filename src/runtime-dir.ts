// The per-user runtime directory: control socket, scope sockets, daemon.pid.
import { closeSync, fstatSync, ftruncateSync, lstatSync, mkdirSync, openSync, statSync, unlinkSync, writeSync, constants } from 'node:fs';
import { readCapped } from './read-capped.js';
import { join } from 'node:path';
import { KeyholdError } from './errors.js';
import { tryLockFile } from './libc.js';

export function runtimeDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.KEYHOLD_RUNTIME_DIR) return env.KEYHOLD_RUNTIME_DIR;
  if (env.XDG_RUNTIME_DIR) return join(env.XDG_RUNTIME_DIR, 'keyhold');
  return `/tmp/keyhold-${process.getuid!()}`;
}

export const scopesDir = (runtime: string) => join(runtime, 'scopes');
export const pidFilePath = (runtime: string) => join(runtime, 'daemon.pid');

/**
 * Creates `dir` (0700) if missing; refuses one that is a symlink, not a directory, owned by
 * someone else, or open to group/others, since anyone who can write there can swap our sockets.
 */
export function ensurePrivateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const stat = lstatSync(dir);
  const hint = `use a directory of your own with mode 0700 (chmod 700 ${dir}), or set KEYHOLD_RUNTIME_DIR`;
  if (!stat.isDirectory()) throw new KeyholdError(`${dir} is not a directory`, hint);
  if (stat.uid !== process.getuid!()) throw new KeyholdError(`${dir} is owned by uid ${stat.uid}`, hint);
  if ((stat.mode & 0o077) !== 0) {
    throw new KeyholdError(`${dir} is accessible to other users (mode ${(stat.mode & 0o777).toString(8)})`, hint);
  }
}

export interface PidLock {
  release(): void;
  /** Lets go of the lock without removing the file (it may be another daemon's by now). */
  abandon(): void;
  /** Whether the locked file is still the one at its path (not removed or replaced). */
  inPlace(): boolean;
}

/** The pid the lock holder wrote (a pid is a few bytes; anything else is not worth showing). */
function lockHolder(path: string): string {
  try {
    const text = readCapped(path, 32, 'daemon pid file', { regularFile: true }).toString('utf8').trim();
    return /^\d+$/.test(text) ? text : 'unknown';
  } catch {
    return 'unknown';
  }
}

/**
 * One daemon per runtime dir: an flock on daemon.pid, held for the daemon's life, released by
 * the kernel if it dies, so a stale file never blocks a restart.
 */
export function acquirePidLock(path: string): PidLock {
  const fd = openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
  if (!tryLockFile(fd)) {
    closeSync(fd);
    const pid = lockHolder(path);
    throw new KeyholdError(`a keyhold daemon is already running (pid ${pid})`, 'stop it first, or use its sockets');
  }
  ftruncateSync(fd, 0);
  writeSync(fd, `${process.pid}\n`, 0);
  return {
    release() {
      try {
        unlinkSync(path);
      } catch {
        /* already gone */
      }
      closeSync(fd);
    },
    abandon() {
      closeSync(fd);
    },
    inPlace() {
      try {
        return statSync(path).ino === fstatSync(fd).ino;
      } catch {
        return false;
      }
    },
  };
}
