// The few libc calls node does not expose: SO_PEERCRED, prctl and setrlimit (Linux).
import type * as Koffi from 'koffi';
import { loadOnFirstUse } from './load-on-first-use.js';

/** koffi for every libc binding (this file, kernel keyring, secret memory): most commands make no libc call. */
export const koffi = loadOnFirstUse<typeof Koffi>('koffi');

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
const PR_SET_DUMPABLE = 4;
const RLIMIT_CORE = 4;

interface Libc {
  execve: (path: Buffer, argv: (Buffer | null)[], envp: (Buffer | null)[]) => number;
  fcntl: (fd: number, command: number, arg: number) => number;
  signal: (signal: number, handler: null) => unknown;
  sigprocmask: (how: number, set: Buffer, old: null) => number;
  getsockopt: (fd: number, level: number, name: number, value: Buffer, length: number[]) => number;
  prctl: (option: number, arg2: number, arg3: number, arg4: number, arg5: number) => number;
  setrlimit: (resource: number, limit: Buffer) => number;
  flock: (fd: number, operation: number) => number;
}

let library: ReturnType<typeof Koffi.load> | null = null;
let variadicSyscall: ((number: number, ...typedArgs: unknown[]) => number | bigint) | null = null;

/** libc, loaded once for every module that binds its own calls (this one, kernel keyring, secret memory). Throws when it cannot be loaded. */
export function libcLibrary(): ReturnType<typeof Koffi.load> {
  library ??= koffi().load('libc.so.6');
  return library;
}

/** syscall(2), variadic: each argument is given as a koffi type name and a value. */
export function libcSyscall(): (number: number, ...typedArgs: unknown[]) => number | bigint {
  variadicSyscall ??= libcLibrary().func('long syscall(long number, ...)') as (number: number, ...typedArgs: unknown[]) => number | bigint;
  return variadicSyscall;
}

let libc: Libc | null = null;

function load(): Libc {
  if (libc) return libc;
  const lib = libcLibrary();
  libc = {
    execve: lib.func('int execve(const uint8_t *path, void **argv, void **envp)'),
    fcntl: lib.func('int fcntl(int, int, int)'),
    signal: lib.func('void *signal(int, void *)'),
    sigprocmask: lib.func('int sigprocmask(int, const uint8_t *set, void *old)'),
    getsockopt: lib.func('int getsockopt(int, int, int, _Out_ uint8_t *value, _Inout_ uint32_t *length)'),
    prctl: lib.func('int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long)'),
    setrlimit: lib.func('int setrlimit(int, const uint8_t *limit)'),
    flock: lib.func('int flock(int, int)'),
  } as Libc;
  return libc;
}

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

/** The credentials of the process at the other end of a connected Unix socket, or null. */
export function peerCredentials(fd: number): PeerCredentials | null {
  const value = Buffer.alloc(12);
  const length = [12];
  if (load().getsockopt(fd, SOL_SOCKET, SO_PEERCRED, value, length) !== 0 || length[0] !== 12) return null;
  return { pid: value.readInt32LE(0), uid: value.readUInt32LE(4), gid: value.readUInt32LE(8) };
}

/** Makes this process non-dumpable (no ptrace by same-uid processes, no core) and caps cores at 0. */
export function hardenProcess(): { dumpable: boolean; coreLimit: boolean } {
  const calls = load();
  const dumpable = calls.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) === 0;
  const zero = Buffer.alloc(16); // struct rlimit { rlim_t cur, max } with 64-bit rlim_t
  const coreLimit = calls.setrlimit(RLIMIT_CORE, zero) === 0;
  return { dumpable, coreLimit };
}

const LOCK_EX = 2;
const LOCK_NB = 4;
const LOCK_UN = 8;

/** Takes an exclusive advisory lock on an open file without waiting; false if another holds it. */
export function tryLockFile(fd: number): boolean {
  return load().flock(fd, LOCK_EX | LOCK_NB) === 0;
}

export function unlockFile(fd: number): void {
  load().flock(fd, LOCK_UN);
}

const F_SETFD = 2;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0o4000;
const SIG_SETMASK = 2;
const SIGPIPE = 13;
const SIGXFSZ = 25;

const cString = (bytes: Buffer | string) => Buffer.concat([Buffer.from(bytes), Buffer.of(0)]);

/**
 * Replaces this process with `path` (execve), passing argv and the environment as exact bytes
 * (node's own spawn can only pass UTF-8 strings). Undoes what node changed that a child would
 * inherit: close-on-exec and O_NONBLOCK on stdio, SIGPIPE and SIGXFSZ ignored, blocked signals.
 * Returns only on failure, with the errno name.
 */
export function execReplacing(path: string, argv: Buffer[], env: Buffer[]): string {
  const calls = load();
  for (const fd of [0, 1, 2]) {
    calls.fcntl(fd, F_SETFD, 0);
    const flags = calls.fcntl(fd, F_GETFL, 0);
    if (flags >= 0 && flags & O_NONBLOCK) calls.fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  }
  calls.signal(SIGPIPE, null);
  calls.signal(SIGXFSZ, null);
  calls.sigprocmask(SIG_SETMASK, Buffer.alloc(128), null);
  calls.execve(cString(path), [...argv.map(cString), null], [...env.map(cString), null]);
  const errno = koffi().errno();
  return ({ 2: 'ENOENT', 13: 'EACCES', 8: 'ENOEXEC', 20: 'ENOTDIR', 7: 'E2BIG', 26: 'ETXTBSY' } as Record<number, string>)[errno] ?? `errno ${errno}`;
}
