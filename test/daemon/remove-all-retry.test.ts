// ssh-add -D through a vault that was busy part way: the retried change finds the keys it already
// unassigned gone, which is what was asked, so the answer is SUCCESS, not FAILURE.
import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { keyOperations, UnlockAttempts } from '../../src/daemon/key-operations.js';
import { notFound } from '../../src/errors.js';
import type { RequestContext } from '../../src/signer/backend.js';
import type { DaemonVaultApi } from '../../src/vault/api.js';
import type { VaultSession } from '../../src/daemon/vault-session.js';
import { ed25519Key, fixedKeyCache } from '../helpers/policy-daemon.js';

describe('ssh-add -D', () => {
  it('succeeds when a retry finds keys its first attempt already unassigned', async () => {
    const keys = [ed25519Key('a'), ed25519Key('b')];
    const cache = fixedKeyCache({ web: keys });
    const assigned = new Set(keys.map((k) => k.fingerprint));
    const api = {
      async unassign(_scope: string, fp: string) {
        if (!assigned.delete(fp)) throw notFound(`key ${fp} is not assigned to scope web`);
      },
    } as unknown as DaemonVaultApi;
    let attempts = 0;
    const operations = keyOperations('web', {
      session: { unlocked: true, keys: () => cache } as unknown as VaultSession,
      log: pino({ level: 'silent' }),
      record: async () => {},
      unlockAttempts: new UnlockAttempts(),
      unlock: async () => {},
      // As retryWhileBusy after SQLITE_BUSY: the first attempt got part way, the change runs again.
      changeVault: async (_actor, change) => {
        attempts++;
        await api.unassign('web', keys[0]!.fingerprint);
        return change(api);
      },
    });
    const context: RequestContext = { peer: { kind: 'unix', pid: 1, uid: 0, gid: 0, exe: '/usr/bin/ssh-add' }, bindings: [] };
    expect(await operations.removeAllIdentities(context)).toBe(true);
    expect(attempts).toBe(1);
    expect(assigned.size).toBe(0);
  });
});
