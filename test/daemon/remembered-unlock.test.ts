// The remembered unlock's kernel-keyring calls (koffi's syscall, the real kernel) and its payload:
// what is stored reads back exactly, with the permissions and timeout set; what is not ours (too
// long, another format, a past deadline) is refused, never thrown; forget leaves nothing in @u.
import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { addUserKey, describeKey, readKey, removeKey, searchUserKey } from '../../src/platform/kernel-keyring.js';
import { decodeRemembered, encodeRemembered, REMEMBERED_KEY_PERMISSIONS, RememberedKey } from '../../src/daemon/remembered-unlock.js';

const ids: string[] = [];
const newVaultId = () => {
  const id = `test-${randomBytes(8).toString('hex')}`;
  ids.push(id);
  return id;
};

afterEach(() => {
  for (const id of ids.splice(0)) new RememberedKey(id).forget();
});

describe('kernel keyring calls', () => {
  it('add, search, describe, read and remove a user key; a missing one is ENOKEY, not a throw', () => {
    const description = `keyhold:${newVaultId()}`;
    const added = addUserKey(description, Buffer.from('payload'));
    expect(added.ok).toBe(true);
    const serial = (added as { value: number }).value;
    expect(searchUserKey(description)).toEqual({ ok: true, value: serial });
    expect(describeKey(serial)).toMatchObject({ ok: true, value: { type: 'user', uid: process.getuid!(), description } });
    expect(readKey(serial, 64)).toEqual({ ok: true, value: Buffer.from('payload') });
    // Longer than asked for: not ours.
    expect(readKey(serial, 3)).toMatchObject({ ok: false, code: 'EINVAL' });
    expect(removeKey(serial).ok).toBe(true);
    expect(searchUserKey(description)).toMatchObject({ ok: false, code: 'ENOKEY' });
    expect(readKey(serial, 64).ok).toBe(false);
  });
});

describe('RememberedKey', () => {
  const session = () => ({ rememberedUntil: Date.now() + 60_000, lockAt: Date.now() + 120_000, idleMs: 30_000 });

  it('stores the master key and the deadlines, possessor/user only, and reads them back; forget removes it', () => {
    const remembered = new RememberedKey(newVaultId());
    const masterKey = randomBytes(32);
    const stored = session();
    const payload = encodeRemembered(stored, masterKey);
    remembered.store(payload, 60);
    expect(payload.equals(Buffer.alloc(payload.length))).toBe(true); // zeroed once stored
    const found = searchUserKey(remembered.description);
    expect(found.ok && describeKey(found.value)).toMatchObject({ ok: true, value: { permissions: REMEMBERED_KEY_PERMISSIONS } });
    expect(REMEMBERED_KEY_PERMISSIONS & 0xffff).toBe(0);
    const lookup = remembered.lookup();
    expect(lookup).toEqual({ kind: 'found', session: stored, masterKey });
    expect(remembered.present()).toBe(true);
    expect(remembered.forget()).toBe(true);
    expect(remembered.lookup()).toEqual({ kind: 'none' });
    expect(remembered.forget()).toBe(false);
  });

  it('another format, or a deadline past, is not used', () => {
    const remembered = new RememberedKey(newVaultId());
    expect(addUserKey(remembered.description, Buffer.from('garbage')).ok).toBe(true);
    expect(remembered.lookup()).toEqual({ kind: 'unusable', reason: 'not a keyhold remembered unlock' });
    remembered.store(encodeRemembered({ ...session(), rememberedUntil: Date.now() - 1 }, randomBytes(32)), 60);
    expect(remembered.lookup()).toEqual({ kind: 'expired' });
  });

  it('the payload round-trips; anything else decodes to null', () => {
    const masterKey = randomBytes(32);
    const stored = { rememberedUntil: 1_800_000_000_000, lockAt: null, idleMs: null };
    expect(decodeRemembered(encodeRemembered(stored, masterKey))).toEqual({ session: stored, masterKey });
    const other = encodeRemembered(stored, masterKey);
    other.write('xxxx', 0);
    expect(decodeRemembered(other)).toBeNull();
    expect(decodeRemembered(Buffer.alloc(10))).toBeNull();
  });
});
