// The kernel's key retention service (keyrings(7)): add_key(2) and keyctl(2) called through libc's
// syscall(2) with koffi. Not Debian's `keyctl` tool: a payload given to add_key from here never
// crosses a pipe, an argv or another process, and reading it back needs no child either.
// Every call answers with a result, never a throw: a kernel without keyrings (ENOSYS), a seccomp
// filter (EPERM, Docker's default profile), a key gone, expired or revoked are outcomes to handle.
import { koffi, libcSyscall } from '../libc.js';

/** add_key and keyctl by architecture (the generic table is aarch64's; x86_64 has its own). */
const SYSCALLS: Partial<Record<NodeJS.Architecture, { addKey: number; keyctl: number }>> = {
  x64: { addKey: 248, keyctl: 250 },
  arm64: { addKey: 217, keyctl: 219 },
};

/** The special keyring ids of keyctl(2). */
export const KEY_SPEC_PROCESS_KEYRING = -2;
export const KEY_SPEC_USER_KEYRING = -4;

const KEYCTL_REVOKE = 3;
const KEYCTL_SETPERM = 5;
const KEYCTL_DESCRIBE = 6;
const KEYCTL_LINK = 8;
const KEYCTL_UNLINK = 9;
const KEYCTL_SEARCH = 10;
const KEYCTL_READ = 11;
const KEYCTL_SET_TIMEOUT = 15;
const KEYCTL_INVALIDATE = 21;

/** Permission bits (keyctl_setperm(3)): one byte each for possessor, user, group, other. */
export const KEY_PERM = { view: 0x01, read: 0x02, write: 0x04, search: 0x08, link: 0x10, setattr: 0x20, all: 0x3f } as const;
export const possessorPerm = (bits: number) => (bits & 0xff) << 24;
export const userPerm = (bits: number) => (bits & 0xff) << 16;

/** The errno values keyrings answer with (the same numbers on x86_64 and aarch64). */
const ERRNO_NAMES: Record<number, KeyErrorCode> = {
  1: 'EPERM',
  12: 'ENOMEM',
  13: 'EACCES',
  22: 'EINVAL',
  38: 'ENOSYS',
  122: 'EDQUOT',
  126: 'ENOKEY',
  127: 'EKEYEXPIRED',
  128: 'EKEYREVOKED',
  129: 'EKEYREJECTED',
};

export type KeyErrorCode =
  | 'EPERM'
  | 'ENOMEM'
  | 'EACCES'
  | 'EINVAL'
  | 'ENOSYS'
  | 'EDQUOT'
  | 'ENOKEY'
  | 'EKEYEXPIRED'
  | 'EKEYREVOKED'
  | 'EKEYREJECTED'
  | 'UNSUPPORTED_ARCH'
  | 'NO_LIBC'
  | 'OTHER';

export type KeyResult<T> = { ok: true; value: T } | { ok: false; code: KeyErrorCode; errno: number };

/** What an error code means, for a log line or a message (no key material is ever in one). */
export function describeKeyError(code: KeyErrorCode): string {
  switch (code) {
    case 'ENOSYS':
      return 'this kernel has no keyrings (ENOSYS)';
    case 'EPERM':
      return 'keyrings are not allowed here (EPERM: a seccomp filter, as in a container)';
    case 'EACCES':
      return 'the key does not grant this (EACCES)';
    case 'ENOKEY':
      return 'no such key (ENOKEY)';
    case 'EKEYEXPIRED':
      return 'the key has expired (EKEYEXPIRED)';
    case 'EKEYREVOKED':
      return 'the key was revoked (EKEYREVOKED)';
    case 'EKEYREJECTED':
      return 'the key was rejected (EKEYREJECTED)';
    case 'EDQUOT':
      return "the user's key quota is full (EDQUOT)";
    case 'ENOMEM':
      return 'the kernel is out of memory for keys (ENOMEM)';
    case 'EINVAL':
      return 'the kernel refused the call (EINVAL)';
    case 'UNSUPPORTED_ARCH':
      return `keyrings are only called on x86_64 and aarch64, not ${process.arch}`;
    case 'NO_LIBC':
      return 'libc.so.6 could not be loaded';
    default:
      return 'the keyring call failed';
  }
}

type Syscall = (number: number, ...typedArgs: unknown[]) => number | bigint;

let loaded: { call: Syscall; numbers: { addKey: number; keyctl: number } } | 'UNSUPPORTED_ARCH' | 'NO_LIBC' | null = null;

function load() {
  if (loaded) return loaded;
  const numbers = SYSCALLS[process.arch];
  if (!numbers) return (loaded = 'UNSUPPORTED_ARCH');
  try {
    loaded = { call: libcSyscall(), numbers };
  } catch {
    loaded = 'NO_LIBC';
  }
  return loaded;
}

function failure(code: KeyErrorCode, errno = 0): { ok: false; code: KeyErrorCode; errno: number } {
  return { ok: false, code, errno };
}

/** Runs one syscall; a negative answer becomes its errno's code. */
function invoke(which: 'addKey' | 'keyctl', args: unknown[]): KeyResult<number> {
  const libc = load();
  if (typeof libc === 'string') return failure(libc);
  let answer: number;
  try {
    answer = Number(libc.call(libc.numbers[which], ...args));
  } catch {
    return failure('OTHER');
  }
  if (answer < 0) {
    const errno = koffi().errno();
    return failure(ERRNO_NAMES[errno] ?? 'OTHER', errno);
  }
  return { ok: true, value: answer };
}

const keyctl = (operation: number, ...typedArgs: unknown[]) => invoke('keyctl', ['int', operation, ...typedArgs]);

/**
 * add_key(2) of a `user` key: creates it in `keyring`, or replaces the payload of the key of that
 * description already there (which needs write permission on it). Answers the key's serial.
 */
export function addUserKey(description: string, payload: Buffer, keyring = KEY_SPEC_USER_KEYRING): KeyResult<number> {
  return invoke('addKey', ['const char *', 'user', 'const char *', description, 'const uint8_t *', payload, 'size_t', payload.length, 'int', keyring]);
}

/** KEYCTL_LINK: `keyring` also holds the key (needs link on the key and write on the keyring). */
export function linkKey(serial: number, keyring: number): KeyResult<void> {
  const result = keyctl(KEYCTL_LINK, 'int', serial, 'int', keyring);
  return result.ok ? { ok: true, value: undefined } : result;
}

/** KEYCTL_UNLINK: `keyring` no longer holds the key. */
export function unlinkKey(serial: number, keyring: number): KeyResult<void> {
  const result = keyctl(KEYCTL_UNLINK, 'int', serial, 'int', keyring);
  return result.ok ? { ok: true, value: undefined } : result;
}

/** KEYCTL_SEARCH: the serial of the `user` key of that description reachable from `keyring`. */
export function searchUserKey(description: string, keyring = KEY_SPEC_USER_KEYRING): KeyResult<number> {
  return keyctl(KEYCTL_SEARCH, 'int', keyring, 'const char *', 'user', 'const char *', description, 'int', 0);
}

export function setKeyPermissions(serial: number, permissions: number): KeyResult<void> {
  const result = keyctl(KEYCTL_SETPERM, 'int', serial, 'uint32_t', permissions >>> 0);
  return result.ok ? { ok: true, value: undefined } : result;
}

/** KEYCTL_SET_TIMEOUT: the kernel expires the key this many seconds from now (0: never). */
export function setKeyTimeout(serial: number, seconds: number): KeyResult<void> {
  const result = keyctl(KEYCTL_SET_TIMEOUT, 'int', serial, 'uint32_t', seconds >>> 0);
  return result.ok ? { ok: true, value: undefined } : result;
}

/**
 * KEYCTL_READ: the payload, when it is at most `maxBytes` long (a longer one is not ours: answered
 * as EINVAL). The caller zeroes the returned buffer; the scratch buffer is zeroed here.
 */
export function readKey(serial: number, maxBytes: number): KeyResult<Buffer> {
  const scratch = Buffer.alloc(maxBytes + 1);
  try {
    const result = keyctl(KEYCTL_READ, 'int', serial, 'uint8_t *', scratch, 'size_t', scratch.length);
    if (!result.ok) return result;
    if (result.value > maxBytes) return failure('EINVAL');
    const payload = Buffer.alloc(result.value);
    scratch.copy(payload, 0, 0, result.value);
    return { ok: true, value: payload };
  } finally {
    scratch.fill(0);
  }
}

/** KEYCTL_DESCRIBE: `type;uid;gid;perm;description`, as `keyctl rdescribe` prints it. */
export function describeKey(serial: number): KeyResult<{ type: string; uid: number; gid: number; permissions: number; description: string }> {
  const buffer = Buffer.alloc(4096);
  const result = keyctl(KEYCTL_DESCRIBE, 'int', serial, 'uint8_t *', buffer, 'size_t', buffer.length);
  if (!result.ok) return result;
  const text = buffer.subarray(0, Math.max(0, Math.min(result.value, buffer.length) - 1)).toString('utf8');
  const [type = '', uid = '', gid = '', perm = '', ...rest] = text.split(';');
  return { ok: true, value: { type, uid: Number(uid), gid: Number(gid), permissions: parseInt(perm, 16), description: rest.join(';') } };
}

/**
 * Takes a key out of use at once and out of `keyring`'s listing: KEYCTL_INVALIDATE (every link
 * goes, the payload is destroyed by the key garbage collector), else KEYCTL_REVOKE; then
 * KEYCTL_UNLINK, so `keyctl show @u` no longer lists it even before the collector runs. Answers
 * ok when the key is gone from use, whichever step did it.
 */
export function removeKey(serial: number, keyring = KEY_SPEC_USER_KEYRING): KeyResult<void> {
  const invalidated = keyctl(KEYCTL_INVALIDATE, 'int', serial);
  const revoked = invalidated.ok ? invalidated : keyctl(KEYCTL_REVOKE, 'int', serial);
  const unlinked = keyctl(KEYCTL_UNLINK, 'int', serial, 'int', keyring);
  if (revoked.ok || unlinked.ok) return { ok: true, value: undefined };
  return revoked;
}
