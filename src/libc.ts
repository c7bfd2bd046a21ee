// The few libc calls node does not expose: SO_PEERCRED, prctl and setrlimit (Linux).
import koffi from 'koffi';

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
const PR_SET_DUMPABLE = 4;
const RLIMIT_CORE = 4;

interface Libc {
  getsockopt: (fd: number, level: number, name: number, value: Buffer, length: number[]) => number;
  prctl: (option: number, arg2: number, arg3: number, arg4: number, arg5: number) => number;
  setrlimit: (resource: number, limit: Buffer) => number;
  flock: (fd: number, operation: number) => number;
}

let libc: Libc | null = null;

function load(): Libc {
  if (libc) return libc;
  const lib = koffi.load('libc.so.6');
  libc = {
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

/** Takes an exclusive advisory lock on an open file without waiting; false if another holds it. */
export function tryLockFile(fd: number): boolean {
  return load().flock(fd, LOCK_EX | LOCK_NB) === 0;
}
