// The scope backend's decisions, in process: the audit fields it writes with and without a policy,
// deny / allow / confirm, rates, remember grants keyed by pid and start time, withdrawal, routing.
import { generateKeyPairSync } from 'node:crypto';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { describeKey, fingerprint as fingerprintOf } from '../../src/agent-protocol/public-key.js';
import { verifySsh } from '../../src/agent-protocol/signature.js';
import type { AuditEvent } from '../../src/audit/audit-log.js';
import { scopeBackend } from '../../src/daemon/scope-backend.js';
import { WireWriter } from '../../src/agent-protocol/wire.js';
import { Approvals } from '../../src/policy/approvals.js';
import { compilePolicy, type CompiledPolicy } from '../../src/policy/compile.js';
import { NO_POLICY_COMPILED } from '../../src/policy/policy-cache.js';
import type { PolicyDocument } from '../../src/policy/policy.js';
import type { RequestContext, SessionBinding, SignResult } from '../../src/signer/backend.js';
import { ed25519Key, fixedKeyCache, recordingLogger, sshsigData, userauthData, type TestKey } from '../helpers/policy-daemon.js';

const key = ed25519Key('deploy');
const other = ed25519Key('other');
const hostA = describeKey(generateKeyPairSync('ed25519').privateKey).blob;
const hostB = describeKey(generateKeyPairSync('ed25519').privateKey).blob;
const control = { channel: 'control', pid: 1, uid: 1000 } as const;

function unixContext(pid = 4242, processStart: string | null = '777', exe = '/usr/bin/ssh-keygen', bindings: SessionBinding[] = []): RequestContext {
  return { peer: { kind: 'unix', pid, uid: 1000, gid: 1000, exe }, bindings, processStart, hangup: new AbortController().signal };
}

function setup(document: PolicyDocument | null, keys: TestKey[] = [key, other]) {
  const events: AuditEvent[] = [];
  const { log } = recordingLogger();
  const approvals = new Approvals({ timeoutMs: 30_000, log });
  let policy: CompiledPolicy = document ? compilePolicy(document) : NO_POLICY_COMPILED;
  const backend = scopeBackend(() => fixedKeyCache({ web: keys }), 'web', {
    allowSha1: false,
    record: async (event) => void events.push(event),
    auditFailure: () => null,
    countAuditRefusal: () => {},
    pool: null,
    policy: () => policy,
    approvals,
  });
  const sign = (data: Buffer, context: RequestContext = unixContext(), k: TestKey = key) =>
    Promise.resolve(backend.sign(k.blob, data, 0, context));
  return {
    backend,
    sign,
    events,
    approvals,
    setPolicy: (next: PolicyDocument) => (policy = compilePolicy(next)),
    pendingId: () => approvals.list().approvals[0]!.id,
  };
}

const signed = (r: SignResult, data: Buffer) => r.ok && verifySsh(key.blob, r.signature, data, false);

afterEach(() => {
  vi.useRealTimers();
});

describe('scope without a policy', () => {
  it('signs and writes exactly the fields it always did (no decision, rule or purpose)', async () => {
    for (const t of [setup(null), setup({ default: 'allow', rules: [] })]) {
      const data = sshsigData('git');
      expect(signed(await t.sign(data), data)).toBe(true);
      const login = userauthData('git', key, hostA);
      expect((await t.sign(login)).ok).toBe(true);
      expect(Object.keys(t.events[0]!).sort()).toEqual(['algorithm', 'data_sha256', 'event', 'fingerprint', 'peer', 'scope']);
      expect(Object.keys(t.events[1]!).sort()).toEqual(['algorithm', 'data_sha256', 'event', 'fingerprint', 'host_key', 'peer', 'scope', 'user']);
    }
  });
});

describe('decisions', () => {
  it('a namespace rule: git allowed by rule 1, file refused by the default', async () => {
    const t = setup({ default: 'deny', rules: [{ action: 'allow', purpose: 'sshsig', namespaces: ['git'] }] });
    const data = sshsigData('git');
    expect(signed(await t.sign(data), data)).toBe(true);
    expect(await t.sign(sshsigData('file'))).toEqual({ ok: false, reason: 'policy', fingerprint: key.fingerprint });
    expect(t.events[0]).toMatchObject({ event: 'sign', decision: 'allow', rule: 1, purpose: 'sshsig', namespace: 'git' });
    expect(t.events[1]).toMatchObject({ event: 'sign-refused', reason: 'policy', decision: 'deny', rule: 'default', purpose: 'sshsig', namespace: 'file', fingerprint: key.fingerprint });
  });

  it('an exe rule and a hosts rule (host from the hostbound request)', async () => {
    const t = setup({
      default: 'deny',
      rules: [{ action: 'allow', purpose: 'ssh-login', hosts: [{ name: 'a', fingerprints: [fingerprintOf(hostA)] }], exe: ['/usr/bin/ssh'] }],
    });
    expect((await t.sign(userauthData('git', key, hostA), unixContext(1, '1', '/usr/bin/ssh'))).ok).toBe(true);
    expect((await t.sign(userauthData('git', key, hostB), unixContext(1, '1', '/usr/bin/ssh'))).ok).toBe(false);
    expect((await t.sign(userauthData('git', key, hostA), unixContext(1, '1', '/usr/bin/node'))).ok).toBe(false);
    expect(t.events.map((e) => [e.decision, e.rule, e.purpose])).toEqual([
      ['allow', 1, 'ssh-login'],
      ['deny', 'default', 'ssh-login'],
      ['deny', 'default', 'ssh-login'],
    ]);
  });

  it('a subjects rule for token connections', async () => {
    const t = setup({ default: 'deny', rules: [{ action: 'allow', subjects: ['ci-*'] }] });
    const token = (subject: string): RequestContext => ({ peer: { kind: 'tcp', address: '127.0.0.1', port: 1 }, bindings: [], tokenId: 'tok', tokenSubject: subject });
    expect((await t.sign(sshsigData('x'), token('ci-42'))).ok).toBe(true);
    expect((await t.sign(sshsigData('x'), token('laptop'))).ok).toBe(false);
  });

  it('a rate of 3/m: the 4th within the minute is refused (rate), per process; the allowance refills', async () => {
    vi.useFakeTimers();
    const t = setup({ default: 'deny', rules: [{ action: 'allow', rate: '3/m' }] });
    const results = [];
    for (let i = 0; i < 4; i++) results.push((await t.sign(sshsigData('git'))).ok);
    expect(results).toEqual([true, true, true, false]);
    expect(t.events[3]).toMatchObject({ event: 'sign-refused', reason: 'rate', decision: 'allow', rule: 1 });
    expect((await t.sign(sshsigData('git'), unixContext(5000))).ok).toBe(true); // another process
    vi.advanceTimersByTime(20_000);
    expect((await t.sign(sshsigData('git'))).ok).toBe(true);
    expect((await t.sign(sshsigData('git'))).ok).toBe(false);
  });
});

describe('confirm', () => {
  const confirmGit: PolicyDocument = { default: 'deny', rules: [{ action: 'confirm', purpose: 'sshsig', namespaces: ['git'] }] };

  it('waits; approved over the control channel it signs, with approved_by', async () => {
    const t = setup(confirmGit);
    const data = sshsigData('git');
    const result = t.sign(data);
    await Promise.resolve();
    const [pending] = t.approvals.list().approvals;
    expect(pending).toMatchObject({ scope: 'web', key: { fingerprint: key.fingerprint, comment: 'deploy' }, purpose: 'sshsig', namespace: 'git', rule: 1, caller: { pid: 4242, exe: '/usr/bin/ssh-keygen' } });
    expect(t.approvals.approve(pending!.id, control)).toBe(true);
    expect(signed(await result, data)).toBe(true);
    expect(t.events[0]).toMatchObject({ event: 'sign', decision: 'confirm', rule: 1, approved_by: control });
  });

  it('denied → refused (denied, denied_by); timed out → refused (confirm-timeout); hung up → withdrawn, nothing listed', async () => {
    const t = setup(confirmGit);
    const denied = t.sign(sshsigData('git'));
    t.approvals.deny(t.pendingId(), control);
    expect(await denied).toMatchObject({ ok: false, reason: 'denied' });
    expect(t.events[0]).toMatchObject({ event: 'sign-refused', reason: 'denied', decision: 'confirm', denied_by: control });

    const hangup = new AbortController();
    const withdrawn = t.sign(sshsigData('git'), { ...unixContext(), hangup: hangup.signal });
    expect(t.approvals.size).toBe(1);
    hangup.abort();
    expect(await withdrawn).toMatchObject({ ok: false, reason: 'withdrawn' });
    expect(t.approvals.size).toBe(0);

    vi.useFakeTimers();
    const late = t.sign(sshsigData('git'));
    await vi.advanceTimersByTimeAsync(30_000);
    expect(await late).toMatchObject({ ok: false, reason: 'confirm-timeout' });
    expect(t.events.map((e) => e.reason)).toEqual(['denied', 'withdrawn', 'confirm-timeout']);
  });

  it('remember: an approval covers the same process (pid and start time), key and rule; not a reused pid, another pid, another key', async () => {
    const t = setup({ default: 'deny', rules: [{ action: 'confirm', remember: '10m' }] });
    const first = t.sign(sshsigData('git'));
    t.approvals.approve(t.pendingId(), control);
    expect((await first).ok).toBe(true);
    expect((await t.sign(sshsigData('git'))).ok).toBe(true);
    expect(t.events[1]).toMatchObject({ decision: 'confirm', approved_by: { channel: 'remembered' } });
    expect(t.approvals.size).toBe(0);

    const asks = async (context: RequestContext, k: TestKey = key) => {
      const pending = t.sign(sshsigData('git'), context, k);
      await Promise.resolve();
      const asked = t.approvals.size === 1;
      if (asked) t.approvals.deny(t.pendingId(), control);
      await pending;
      return asked;
    };
    expect(await asks(unixContext(4242, '778'))).toBe(true); // the same pid, a later process
    expect(await asks(unixContext(4243, '777'))).toBe(true);
    expect(await asks(unixContext(4242, null))).toBe(true); // start unknown: no grant applies
    expect(await asks(unixContext(), other)).toBe(true);
    expect(await asks(unixContext())).toBe(false);
  });

  it('approve --remember grants even without remember in the rule; grants end after their time and when the policy changes, not with other vault changes', async () => {
    vi.useFakeTimers();
    const t = setup(confirmGit);
    const first = t.sign(sshsigData('git'));
    t.approvals.approve(t.pendingId(), control, 60_000);
    expect((await first).ok).toBe(true);
    expect((await t.sign(sshsigData('git'))).ok).toBe(true);
    vi.advanceTimersByTime(60_001);
    void t.sign(sshsigData('git'));
    expect(t.approvals.size).toBe(1);
    t.approvals.refuseAll('withdrawn');

    const again = t.sign(sshsigData('git'));
    t.approvals.approve(t.pendingId(), control, 60_000);
    await again;
    t.setPolicy({ ...confirmGit }); // another vault change: the same document compiled again
    expect((await t.sign(sshsigData('git'))).ok).toBe(true);
    t.setPolicy({ ...confirmGit, rules: [...confirmGit.rules, { action: 'deny' }] }); // a changed policy
    void t.sign(sshsigData('git'));
    expect(t.approvals.size).toBe(1);
    t.approvals.refuseAll('withdrawn');
  });

  it('more than 4 waiting from one process: refused too-many-pending', async () => {
    const t = setup(confirmGit);
    const results = Array.from({ length: 5 }, () => t.sign(sshsigData('git')));
    expect(await results[4]).toMatchObject({ ok: false, reason: 'too-many-pending' });
    expect(t.approvals.size).toBe(4);
    t.approvals.refuseAll('withdrawn');
    await Promise.all(results);
  });

  it('a key removed from the scope while its request waited is not signed with', async () => {
    let keys = [key];
    const { log } = recordingLogger();
    const approvals = new Approvals({ timeoutMs: 30_000, log });
    const policy = compilePolicy(confirmGit);
    const backend = scopeBackend(() => fixedKeyCache({ web: keys }), 'web', {
      allowSha1: false, record: async () => {}, auditFailure: () => null, countAuditRefusal: () => {}, policy: () => policy, approvals,
    });
    const result = Promise.resolve(backend.sign(key.blob, sshsigData('git'), 0, unixContext()));
    keys = [other];
    approvals.approve(approvals.list().approvals[0]!.id, control);
    expect(await result).toMatchObject({ ok: false, reason: 'unknown-key' });
  });
});

describe('what the review of issue 12 found', () => {
  it('a remembered approval of a local login does not cover what a forwarded connection of the same ssh process asks, nor another purpose', async () => {
    const t = setup({ default: 'confirm', rules: [] });
    const local = unixContext(4242, '777', '/usr/bin/ssh', [{ hostKey: hostA, sessionId: Buffer.alloc(32, 7), isForwarding: false }]);
    const first = t.sign(userauthData('git', key, hostA), local);
    t.approvals.approve(t.pendingId(), control, 3_600_000);
    expect((await first).ok).toBe(true);
    expect((await t.sign(userauthData('git', key, hostA), local)).ok).toBe(true); // covered
    // The same process, a connection bound for forwarding (ssh -A's channel): asked again.
    const forwarded = unixContext(4242, '777', '/usr/bin/ssh', [{ hostKey: hostA, sessionId: Buffer.alloc(32, 8), isForwarding: true }]);
    const viaForward = t.sign(Buffer.from('anything the far side asks'), forwarded);
    await Promise.resolve();
    expect(t.approvals.size).toBe(1);
    t.approvals.deny(t.pendingId(), control);
    expect(await viaForward).toMatchObject({ ok: false, reason: 'denied' });
    // The same process and route, another purpose: asked again.
    const other = t.sign(sshsigData('file'), local);
    await Promise.resolve();
    expect(t.approvals.size).toBe(1);
    t.approvals.refuseAll('withdrawn');
    await other;
  });

  it('a login whose host is unknown (plain publickey, no session-bind) is caught by a deny rule on hosts, and never let in by an allow rule on hosts', async () => {
    const plain = new WireWriter().string(Buffer.alloc(32, 9)).byte(50).string('git').string('ssh-connection').string('publickey').boolean(true).string('ssh-ed25519').string(key.blob).toBuffer();
    const prod = fingerprintOf(hostA);
    const denyProd = setup({ default: 'allow', rules: [{ action: 'deny', purpose: 'ssh-login', hosts: [{ name: 'prod', fingerprints: [prod] }] }] });
    expect(await denyProd.sign(plain)).toMatchObject({ ok: false, reason: 'policy' });
    expect((await denyProd.sign(userauthData('git', key, hostB))).ok).toBe(true); // a known other host
    const allowProd = setup({ default: 'deny', rules: [{ action: 'allow', hosts: [{ name: 'prod', fingerprints: [prod] }] }] });
    expect(await allowProd.sign(plain)).toMatchObject({ ok: false, reason: 'policy' });
    expect((await allowProd.sign(userauthData('git', key, hostA))).ok).toBe(true);
  });

  it('a process whose exe could not be read is caught by a deny rule on exe, and never let in by an allow rule on exe', async () => {
    const unreadable = { ...unixContext(), peer: { kind: 'unix' as const, pid: 4242, uid: 1000, gid: 1000, exe: null } };
    const deny = setup({ default: 'allow', rules: [{ action: 'deny', exe: ['/usr/bin/node'] }] });
    expect(await deny.sign(sshsigData('git'), unreadable)).toMatchObject({ ok: false, reason: 'policy' });
    const allow = setup({ default: 'deny', rules: [{ action: 'allow', exe: ['*'] }] });
    expect(await allow.sign(sshsigData('git'), unreadable)).toMatchObject({ ok: false, reason: 'policy' });
    expect((await allow.sign(sshsigData('git'))).ok).toBe(true);
  });

  it('a request approved after the policy changed to deny it is not signed', async () => {
    const t = setup({ default: 'deny', rules: [{ action: 'confirm', purpose: 'sshsig', namespaces: ['git'] }] });
    const waiting = t.sign(sshsigData('git'));
    await Promise.resolve();
    t.setPolicy({ default: 'deny', rules: [] });
    t.approvals.approve(t.pendingId(), control);
    expect(await waiting).toMatchObject({ ok: false, reason: 'policy' });
  });
});

describe('routing', () => {
  const bound = (host: Buffer, isForwarding = false): SessionBinding[] => [{ hostKey: host, sessionId: Buffer.alloc(32, 1), isForwarding }];

  it('a connection bound to a host lists only the keys a rule may allow or confirm there', () => {
    const t = setup({
      default: 'deny',
      rules: [
        { action: 'allow', purpose: 'ssh-login', hosts: [{ name: 'a', fingerprints: [fingerprintOf(hostA)] }], keys: [key.fingerprint] },
        { action: 'confirm', purpose: 'ssh-login', hosts: [{ name: 'b', fingerprints: [fingerprintOf(hostB)] }], keys: [other.fingerprint] },
      ],
    });
    const listed = (bindings: SessionBinding[]) => t.backend.identities(unixContext(1, '1', '/usr/bin/ssh', bindings)).map((i) => i.comment);
    expect(listed(bound(hostA))).toEqual(['deploy']);
    expect(listed(bound(hostB))).toEqual(['other']);
    expect(listed([])).toEqual(['deploy', 'other']); // not bound: nothing to route by
    expect(listed(bound(hostA, true))).toEqual(['deploy', 'other']); // forwarding hop: not the last
  });

  it('no policy: every key, bound or not', () => {
    const t = setup(null);
    expect(t.backend.identities(unixContext(1, '1', '/usr/bin/ssh', bound(hostB)))).toHaveLength(2);
  });
});
