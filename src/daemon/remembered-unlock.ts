// Remembered unlock (`keyhold unlock --remember D`): what a restarted daemon needs to come back
// unlocked, kept in the kernel's user keyring as the `user` key `keyhold:<vault id>`, expiring
// after D. A daemon killed or restarted by systemd within D opens the vault with it, asking no
// factor; every lock and `keyhold stop` take it out.
//
// The payload is the master key itself, with the session's deadlines. Not a wrap of it: a
// restarted daemon has nothing but the disk and this key to unwrap with, and a wrapping key kept
// on disk for the same user guards against no one who can read the kernel key. The kernel keeps
// the payload in its own memory, never swapped to a file, and destroys it at expiry or revocation.
import { KeyholdError } from '../errors.js';
import { MASTER_KEY_BYTES } from '../vault/keyring.js';
import {
  addUserKey,
  describeKeyError,
  KEY_PERM,
  KEY_SPEC_PROCESS_KEYRING,
  KEY_SPEC_USER_KEYRING,
  linkKey,
  unlinkKey,
  possessorPerm,
  readKey,
  removeKey,
  searchUserKey,
  setKeyPermissions,
  setKeyTimeout,
  userPerm,
  type KeyErrorCode,
} from '../platform/kernel-keyring.js';

const MAGIC = Buffer.from('khr1');
/** magic, remembered until (ms), lock deadline (ms, 0: none), idle limit (ms, 0: none), master key. */
const PAYLOAD_BYTES = MAGIC.length + 3 * 8 + MASTER_KEY_BYTES;
/** KEYCTL_SET_TIMEOUT takes seconds in an unsigned int. */
const MAX_TIMEOUT_SECONDS = 0xffff_ffff;

/**
 * Possessor: everything. The user (same uid): view, read, search, setattr; no write or link.
 * Group and other: nothing. The user gets read because a daemon restarted in a session keyring
 * of its own (systemd's KeyringMode=private, `keyctl session`, a login without pam_keyinit) does
 * not possess the user keyring; without user read it would find the key and not read it. Denying
 * user read would not keep out a same-uid process anyway: any can link @u into its own session
 * keyring and possess the key.
 */
export const REMEMBERED_KEY_PERMISSIONS =
  possessorPerm(KEY_PERM.all) | userPerm(KEY_PERM.view | KEY_PERM.read | KEY_PERM.search | KEY_PERM.setattr);

export const rememberedKeyDescription = (vaultId: string) => `keyhold:${vaultId}`;

export interface RememberedSession {
  /** When the kernel drops the key (ms since the epoch). */
  rememberedUntil: number;
  /** The unlocked session's own deadline (--ttl), which a restarted daemon keeps. */
  lockAt: number | null;
  /** The session's idle limit, which a restarted daemon keeps. */
  idleMs: number | null;
}

export type RememberedLookup =
  | { kind: 'none' }
  | { kind: 'expired' }
  | { kind: 'found'; session: RememberedSession; masterKey: Buffer }
  | { kind: 'unusable'; reason: string }
  | { kind: 'unavailable'; reason: string };

const unavailable = (code: KeyErrorCode) => code === 'ENOSYS' || code === 'EPERM' || code === 'UNSUPPORTED_ARCH' || code === 'NO_LIBC';

export function encodeRemembered(session: RememberedSession, masterKey: Buffer): Buffer {
  if (masterKey.length !== MASTER_KEY_BYTES) throw new Error('master key of the wrong length');
  const payload = Buffer.alloc(PAYLOAD_BYTES);
  MAGIC.copy(payload, 0);
  payload.writeBigUInt64BE(BigInt(session.rememberedUntil), 4);
  payload.writeBigUInt64BE(BigInt(session.lockAt ?? 0), 12);
  payload.writeBigUInt64BE(BigInt(session.idleMs ?? 0), 20);
  masterKey.copy(payload, 28);
  return payload;
}

/** The session and a copy of the master key (the caller zeroes it); null for anything else. */
export function decodeRemembered(payload: Buffer): { session: RememberedSession; masterKey: Buffer } | null {
  if (payload.length !== PAYLOAD_BYTES || !payload.subarray(0, 4).equals(MAGIC)) return null;
  const field = (offset: number) => Number(payload.readBigUInt64BE(offset));
  const rememberedUntil = field(4);
  const lockAt = field(12);
  const idleMs = field(20);
  if (!Number.isSafeInteger(rememberedUntil) || !Number.isSafeInteger(lockAt) || !Number.isSafeInteger(idleMs)) return null;
  const masterKey = Buffer.alloc(MASTER_KEY_BYTES);
  payload.copy(masterKey, 0, 28);
  return { session: { rememberedUntil, lockAt: lockAt || null, idleMs: idleMs || null }, masterKey };
}

/** The remembered unlock of one vault: store, look up, forget. */
export class RememberedKey {
  readonly description: string;

  constructor(vaultId: string) {
    this.description = rememberedKeyDescription(vaultId);
  }

  /**
   * Stores the payload, permissions set and timeout started; the payload is zeroed here. Any
   * failure removes what was added and throws (exit 1) with the kernel's reason.
   */
  store(payload: Buffer, seconds: number): void {
    try {
      // A key of this name left behind (another permission set, a planted one) is not updated in
      // place: it goes, and ours is made afresh with the permissions below.
      this.forget();
      // Made in this process's own keyring, which it always possesses, and only then linked into
      // the user keyring: a daemon whose session keyring does not link @u (systemd's
      // KeyringMode=private, as the shipped units have) does not possess a key it adds to @u
      // directly, and could then neither set its permissions nor its timeout (EACCES).
      const added = addUserKey(this.description, payload, KEY_SPEC_PROCESS_KEYRING);
      if (!added.ok) throw cannotRemember(added.code);
      const serial = added.value;
      try {
        const permitted = setKeyPermissions(serial, REMEMBERED_KEY_PERMISSIONS);
        const timed = permitted.ok ? setKeyTimeout(serial, Math.min(MAX_TIMEOUT_SECONDS, Math.max(1, seconds))) : permitted;
        const linked = timed.ok ? linkKey(serial, KEY_SPEC_USER_KEYRING) : timed;
        if (!linked.ok) {
          removeKey(serial, KEY_SPEC_PROCESS_KEYRING);
          throw cannotRemember(linked.code);
        }
      } finally {
        unlinkKey(serial, KEY_SPEC_PROCESS_KEYRING);
      }
    } finally {
      payload.fill(0);
    }
  }

  /** Whether a key of this vault is in the user keyring (no read: the CLI only asks whether to wait for it). */
  present(): boolean {
    return searchUserKey(this.description).ok;
  }

  lookup(): RememberedLookup {
    const found = searchUserKey(this.description);
    if (!found.ok) {
      if (found.code === 'ENOKEY') return { kind: 'none' };
      if (found.code === 'EKEYEXPIRED' || found.code === 'EKEYREVOKED') return { kind: 'expired' };
      if (unavailable(found.code)) return { kind: 'unavailable', reason: describeKeyError(found.code) };
      return { kind: 'unusable', reason: describeKeyError(found.code) };
    }
    const read = readKey(found.value, PAYLOAD_BYTES);
    if (!read.ok) {
      if (read.code === 'EKEYEXPIRED' || read.code === 'EKEYREVOKED') return { kind: 'expired' };
      return { kind: 'unusable', reason: read.code === 'EINVAL' ? 'not a keyhold remembered unlock' : describeKeyError(read.code) };
    }
    try {
      const decoded = decodeRemembered(read.value);
      if (!decoded) return { kind: 'unusable', reason: 'not a keyhold remembered unlock' };
      // The kernel's timeout is the limit; the deadline inside is a second one, should the
      // timeout have been lost (a crash between add_key and KEYCTL_SET_TIMEOUT).
      if (decoded.session.rememberedUntil <= Date.now()) {
        decoded.masterKey.fill(0);
        return { kind: 'expired' };
      }
      return { kind: 'found', ...decoded };
    } finally {
      read.value.fill(0);
    }
  }

  /** Takes the key out of the keyring, if one is there; answers whether one was removed. */
  forget(): boolean {
    let removed = false;
    // Bounded: a key linked more than once answers each search until every link is gone.
    for (let i = 0; i < 8; i++) {
      const found = searchUserKey(this.description);
      if (!found.ok || !removeKey(found.value).ok) break;
      removed = true;
    }
    return removed;
  }
}

function cannotRemember(code: KeyErrorCode): KeyholdError {
  return new KeyholdError(
    `cannot remember the unlock in the kernel keyring: ${describeKeyError(code)}; the vault stays locked`,
    'unlock without --remember',
  );
}
