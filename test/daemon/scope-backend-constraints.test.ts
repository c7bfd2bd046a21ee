// ssh-add's constraints in the scope backend, in process: a filter in front of the policy. An
// expired key is neither offered nor used before the sweep, a destination-constrained key is
// refused (rule ssh-add) off its hosts without asking anyone, -c turns the policy's allow into a
// confirmation even in a scope without a policy, and an unconstrained key keeps the fast path.
import { generateKeyPairSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { describeKey } from '../../src/agent-protocol/public-key.js';
import type { AuditEvent } from '../../src/audit/audit-log.js';
import { scopeBackend } from '../../src/daemon/scope-backend.js';
import { Approvals } from '../../src/policy/approvals.js';
import { NO_POLICY_COMPILED } from '../../src/policy/policy-cache.js';
import { compileConstraints, storedConstraints } from '../../src/policy/ssh-add-constraints.js';
import type { KeyConstraints } from '../../src/agent-protocol/key-constraints.js';
import type { RequestContext, SessionBinding } from '../../src/signer/backend.js';
import { ed25519Key, fixedKeyCache, recordingLogger, sshsigData, userauthData, type TestKey } from '../helpers/policy-daemon.js';

const hostA = describeKey(generateKeyPairSync('ed25519').privateKey).blob;
const hostB = describeKey(generateKeyPairSync('ed25519').privateKey).blob;
const SESSION = Buffer.alloc(32, 7);
const control = { channel: 'control', pid: 1, uid: 1000 } as const;

function context(bindings: SessionBinding[] = []): RequestContext {
  return { peer: { kind: 'unix', pid: 4242, uid: 1000, gid: 1000, exe: '/usr/bin/ssh' }, bindings, processStart: '1', hangup: new AbortController().signal };
}
const boundTo = (host: Buffer) => context([{ hostKey: host, sessionId: SESSION, isForwarding: false }]);

function setup(constrained: TestKey, constraints: Partial<KeyConstraints>, plain: TestKey = ed25519Key('plain')) {
  const events: AuditEvent[] = [];
  const approvals = new Approvals({ timeoutMs: 30_000, log: recordingLogger().log });
  const cache = fixedKeyCache({ web: [constrained, plain] });
  const stored = storedConstraints({ lifetimeSeconds: null, confirm: false, destinations: [], ...constraints }, Date.now());
  cache.scope('web').constraints.set(
    constrained.blob.toString('latin1'),
    compileConstraints({ expires_at: stored.expiresAt, confirm: stored.confirm ? 1 : 0, destinations: stored.destinations && JSON.stringify(stored.destinations) })!,
  );
  const backend = scopeBackend(() => cache, 'web', {
    allowSha1: false,
    record: async (event) => void events.push(event),
    auditFailure: () => null,
    countAuditRefusal: () => {},
    pool: null,
    policy: () => NO_POLICY_COMPILED,
    approvals,
  });
  const listed = (c: RequestContext) => backend.identities(c).map((i) => i.keyBlob.toString('latin1'));
  return { backend, events, approvals, listed, plain };
}

const toA = { from: { user: null, hostname: null, hostKeys: [] }, to: { user: null, hostname: 'host_a', hostKeys: [{ keyBlob: hostA, isCa: false }] } };

describe('ssh-add constraints in front of the policy', () => {
  it('-c in a scope without a policy: the key waits for an approval (rule ssh-add); the other key signs at once as it always did', async () => {
    const key = ed25519Key('confirm');
    const t = setup(key, { confirm: true });
    const plainData = sshsigData('file');
    expect((await t.backend.sign(t.plain.blob, plainData, 0, context())).ok).toBe(true);
    expect(Object.keys(t.events[0]!).sort()).toEqual(['algorithm', 'data_sha256', 'event', 'fingerprint', 'peer', 'scope']);

    const waiting = Promise.resolve(t.backend.sign(key.blob, sshsigData('file'), 0, context()));
    const pending = t.approvals.list().approvals;
    expect(pending).toHaveLength(1);
    expect(pending[0]).toMatchObject({ rule: 'ssh-add', key: { fingerprint: key.fingerprint } });
    t.approvals.approve(pending[0]!.id, control, 600_000);
    expect((await waiting).ok).toBe(true);
    expect(t.events.at(-1)).toMatchObject({ event: 'sign', decision: 'confirm', rule: 'ssh-add' });
    // Even an approval given with --remember does not cover the next use: -c asks every time.
    void t.backend.sign(key.blob, sshsigData('file'), 0, context());
    expect(t.approvals.list().approvals).toHaveLength(1);
    t.approvals.refuseAll('withdrawn');
  });

  it('expired (before the sweep): neither listed nor used', async () => {
    const key = ed25519Key('expired');
    const t = setup(key, { lifetimeSeconds: 0 });
    expect(t.listed(context())).not.toContain(key.blob.toString('latin1'));
    expect(t.listed(context())).toContain(t.plain.blob.toString('latin1'));
    expect(await t.backend.sign(key.blob, sshsigData('file'), 0, context())).toMatchObject({ ok: false, reason: 'unknown-key' });
  });

  it('-h: listed and used on a connection bound to its host; hidden and refused (rule ssh-add, nobody asked) elsewhere', async () => {
    const key = ed25519Key('hosts');
    const t = setup(key, { destinations: [toA], confirm: true });
    const id = key.blob.toString('latin1');
    expect(t.listed(boundTo(hostA))).toContain(id);
    expect(t.listed(boundTo(hostB))).not.toContain(id);
    expect(t.listed(boundTo(hostB))).toContain(t.plain.blob.toString('latin1'));

    const refused = await t.backend.sign(key.blob, userauthData('me', key, hostB, SESSION), 0, boundTo(hostB));
    expect(refused).toMatchObject({ ok: false, reason: 'policy' });
    expect(t.approvals.list().approvals).toHaveLength(0);
    expect(t.events.at(-1)).toMatchObject({ event: 'sign-refused', reason: 'policy', decision: 'deny', rule: 'ssh-add', user: 'me' });
    // Not a login, or not bound: refused too.
    expect(await t.backend.sign(key.blob, sshsigData('file'), 0, boundTo(hostA))).toMatchObject({ ok: false, reason: 'policy' });
    expect(await t.backend.sign(key.blob, userauthData('me', key, hostA, SESSION), 0, context())).toMatchObject({ ok: false, reason: 'policy' });

    // To host A: permitted, then -c asks.
    const waiting = Promise.resolve(t.backend.sign(key.blob, userauthData('me', key, hostA, SESSION), 0, boundTo(hostA)));
    const pending = t.approvals.list().approvals;
    expect(pending).toHaveLength(1);
    t.approvals.approve(pending[0]!.id, control);
    expect((await waiting).ok).toBe(true);
  });
});
