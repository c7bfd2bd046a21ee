// The ssh-add -h matcher against OpenSSH's semantics (ssh-agent.c identity_permitted,
// permitted_by_dest_constraints, match_key_hop, process_sign_request), over binding chains as a
// connection records them, with real ed25519 host key blobs.
import { describe, expect, it } from 'vitest';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { describeKey } from '../../src/agent-protocol/public-key.js';
import type { DestinationConstraint, DestinationHop } from '../../src/agent-protocol/key-constraints.js';
import type { UserauthRequest } from '../../src/agent-protocol/userauth.js';
import { WireWriter } from '../../src/agent-protocol/wire.js';
import type { SessionBinding } from '../../src/signer/backend.js';
import {
  checkStoredConstraints,
  compileConstraints,
  expired,
  hostCertificateMatchesCa,
  identityPermitted,
  signRefusalByDestinations,
  storedConstraints,
  type CompiledConstraints,
} from '../../src/policy/ssh-add-constraints.js';
import { fingerprint } from '../../src/agent-protocol/public-key.js';

const hostKey = () => describeKey(generateKeyPairSync('ed25519').publicKey).blob;
const A = hostKey();
const B = hostKey();
const C = hostKey();
const CA = hostKey();
const USER_KEY = hostKey();

const origin: DestinationHop = { user: null, hostname: null, hostKeys: [] };
const hop = (hostname: string, key: Buffer, user: string | null = null, isCa = false): DestinationHop => ({ user, hostname, hostKeys: [{ keyBlob: key, isCa }] });

/** As the vault stores and the key cache compiles them. */
function compiled(destinations: DestinationConstraint[], extra: { lifetimeSeconds?: number; confirm?: boolean } = {}, now = Date.now()): CompiledConstraints {
  const stored = storedConstraints({ lifetimeSeconds: extra.lifetimeSeconds ?? null, confirm: extra.confirm ?? false, destinations }, now);
  return compileConstraints({
    expires_at: stored.expiresAt,
    confirm: stored.confirm ? 1 : 0,
    destinations: stored.destinations === null ? null : JSON.stringify(stored.destinations),
  })!;
}

const bind = (key: Buffer, isForwarding: boolean): SessionBinding => ({ hostKey: key, sessionId: randomBytes(32), isForwarding });
const chain = (...bindings: SessionBinding[]) => ({ bindings, bindAttempted: bindings.length > 0 });

function login(bindings: SessionBinding[], user: string, options: { hostKey?: Buffer | null; sessionId?: Buffer; key?: Buffer; service?: string } = {}): UserauthRequest {
  const last = bindings[bindings.length - 1];
  const hostKey = options.hostKey === undefined ? (last?.hostKey ?? null) : options.hostKey;
  return {
    sessionId: options.sessionId ?? last?.sessionId ?? randomBytes(32),
    user,
    service: options.service ?? 'ssh-connection',
    method: hostKey ? 'publickey-hostbound-v00@openssh.com' : 'publickey',
    algorithm: 'ssh-ed25519',
    publicKey: options.key ?? USER_KEY,
    hostKey,
  };
}

describe('ssh-add -h: which connections see and use a destination-constrained key', () => {
  const toA = compiled([{ from: origin, to: hop('host_a', A) }]);

  it('an unconstrained key is permitted everywhere, bound or not, and signs anything', () => {
    const none = compiled([], { confirm: true });
    expect(none.destinations).toEqual([]);
    expect(identityPermitted(none.destinations, chain(bind(B, false)), 'anyone')).toBe(true);
    expect(signRefusalByDestinations(none.destinations, chain(), null, USER_KEY)).toBeNull();
  });

  it('unbound (no session-bind): listed (local use) but never used to sign', () => {
    expect(identityPermitted(toA.destinations, chain(), null)).toBe(true);
    expect(signRefusalByDestinations(toA.destinations, chain(), login([], 'alice'), USER_KEY)).toMatch(/unbound/);
  });

  it('a bind that failed: neither listed nor used, as OpenSSH (not treated as local use)', () => {
    const failed = { bindings: [], bindAttempted: true };
    expect(identityPermitted(toA.destinations, failed, null)).toBe(false);
    expect(signRefusalByDestinations(toA.destinations, failed, login([], 'alice'), USER_KEY)).not.toBeNull();
  });

  it('one hop: the named host key lists and signs; another host key neither', () => {
    const toHostA = [bind(A, false)];
    expect(identityPermitted(toA.destinations, chain(...toHostA), null)).toBe(true);
    expect(signRefusalByDestinations(toA.destinations, chain(...toHostA), login(toHostA, 'alice'), USER_KEY)).toBeNull();
    const toHostB = [bind(B, false)];
    expect(identityPermitted(toA.destinations, chain(...toHostB), null)).toBe(false);
    expect(signRefusalByDestinations(toA.destinations, chain(...toHostB), login(toHostB, 'alice'), USER_KEY)).toMatch(/not permitted/);
  });

  it('only logins: an sshsig or other blob is refused even on a permitted connection', () => {
    expect(signRefusalByDestinations(toA.destinations, chain(bind(A, false)), null, USER_KEY)).toMatch(/other than a login/);
  });

  it('the login must name this key, the ssh-connection service, the session bound last and its host key', () => {
    const bindings = [bind(A, false)];
    const c = chain(...bindings);
    expect(signRefusalByDestinations(toA.destinations, c, login(bindings, 'alice', { key: B }), USER_KEY)).not.toBeNull();
    expect(signRefusalByDestinations(toA.destinations, c, login(bindings, 'alice', { service: 'other' }), USER_KEY)).not.toBeNull();
    expect(signRefusalByDestinations(toA.destinations, c, login(bindings, 'alice', { sessionId: randomBytes(32) }), USER_KEY)).toMatch(/session bound last/);
    expect(signRefusalByDestinations(toA.destinations, c, login(bindings, 'alice', { hostKey: B }), USER_KEY)).toMatch(/host key/);
    // The first hop may sign a plain (not hostbound) publickey request: ssh checked the host key itself.
    expect(signRefusalByDestinations(toA.destinations, c, login(bindings, 'alice', { hostKey: null }), USER_KEY)).toBeNull();
  });

  it('users: checked on the last hop with OpenSSH match_pattern (* and ?), case-sensitive; --BADUSER fails', () => {
    const bindings = [bind(A, false)];
    const only = (user: string) => compiled([{ from: origin, to: hop('host_a', A, user) }]).destinations;
    const sign = (pattern: string, user: string) => signRefusalByDestinations(only(pattern), chain(...bindings), login(bindings, user), USER_KEY);
    expect(sign('alice', 'alice')).toBeNull();
    expect(sign('alice', 'bob')).not.toBeNull();
    expect(sign('alice', 'Alice')).not.toBeNull();
    expect(sign('a*', 'alex')).toBeNull();
    expect(sign('?lice', 'alice')).toBeNull();
    expect(sign('?lice', 'aalice')).not.toBeNull();
    expect(sign('--BADUSER', 'alice')).not.toBeNull();
    // Listing names no user: the key is shown on the connection to that host.
    expect(identityPermitted(only('--BADUSER'), chain(...bindings), null)).toBe(true);
  });

  it('forwarding chain: every hop needs a destination from the previous host key', () => {
    const viaA = compiled([
      { from: origin, to: hop('host_a', A) },
      { from: hop('host_a', A), to: hop('host_b', B, 'alice') },
    ]).destinations;
    const toB = [bind(A, true), bind(B, false)];
    expect(identityPermitted(viaA, chain(...toB), null)).toBe(true);
    expect(signRefusalByDestinations(viaA, chain(...toB), login(toB, 'alice'), USER_KEY)).toBeNull();
    expect(signRefusalByDestinations(viaA, chain(...toB), login(toB, 'bob'), USER_KEY)).not.toBeNull();
    // Past the first hop the request must name the host key (publickey-hostbound).
    expect(signRefusalByDestinations(viaA, chain(...toB), login(toB, 'alice', { hostKey: null }), USER_KEY)).toMatch(/names no host key/);
    // host_a -> host_c is not listed.
    const toC = [bind(A, true), bind(C, false)];
    expect(identityPermitted(viaA, chain(...toC), null)).toBe(false);
    // B reached directly: no destination from the origin to B.
    expect(identityPermitted(viaA, chain(bind(B, false)), null)).toBe(false);
    // Through B to A: the first hop (B) is not allowed from here.
    expect(identityPermitted(viaA, chain(bind(B, true), bind(A, false)), null)).toBe(false);
  });

  it('forwarded to a host but not beyond it: hidden on that host (listed only where it leads on)', () => {
    const onlyA = toA.destinations;
    const atA = chain(bind(A, true));
    expect(identityPermitted(onlyA, atA, null)).toBe(false);
    const onward = compiled([
      { from: origin, to: hop('host_a', A) },
      { from: hop('host_a', A), to: hop('host_b', B) },
    ]).destinations;
    expect(identityPermitted(onward, atA, null)).toBe(true);
    // And never signs on the forwarding hop itself.
    expect(signRefusalByDestinations(onward, atA, login(atA.bindings, 'alice'), USER_KEY)).not.toBeNull();
  });

  it('a hop bound for authentication cannot be forwarded through', () => {
    const onward = compiled([
      { from: origin, to: hop('host_a', A) },
      { from: hop('host_a', A), to: hop('host_b', B) },
    ]).destinations;
    expect(identityPermitted(onward, chain(bind(A, false), bind(B, false)), null)).toBe(false);
  });

  it('CA hops never match a plain host key, and a plain hop never matches a certificate', () => {
    const viaCa = compiled([{ from: origin, to: hop('host_a', CA, null, true) }]).destinations;
    expect(identityPermitted(viaCa, chain(bind(CA, false)), null)).toBe(false);
    const fakeCert = new WireWriter().string('ssh-ed25519-cert-v01@openssh.com').string(randomBytes(32)).toBuffer();
    const plainA = compiled([{ from: origin, to: { user: null, hostname: 'host_a', hostKeys: [{ keyBlob: fakeCert, isCa: false }] } }]).destinations;
    expect(identityPermitted(plainA, chain(bind(fakeCert, false)), null)).toBe(false);
  });

  // TODO(lead): once src/agent-protocol/certificate.ts (certificates branch) is merged, wire
  // hostCertificateMatchesCa and turn this into a real test: a host certificate signed by CA with
  // principal host_a matches the hop ('host_a', CA, is_ca), one for host_b or signed by another CA
  // does not, nor an expired one or a user certificate.
  it.todo('TODO(lead): a host certificate signed by a CA hop, with the hop name among its principals, matches');
  it('until then the CA branch fails closed', () => {
    expect(hostCertificateMatchesCa(randomBytes(64), CA, 'host_a')).toBe(false);
  });

  it('a damaged stored destination list makes the key usable nowhere, never unconstrained', () => {
    const damaged = compileConstraints({ expires_at: null, confirm: 0, destinations: '{not json' })!;
    expect(identityPermitted(damaged.destinations, chain(bind(A, false)), null)).toBe(false);
    expect(identityPermitted(damaged.destinations, chain(), null)).toBe(true); // local listing, as any -h key
    expect(signRefusalByDestinations(damaged.destinations, chain(bind(A, false)), login([bind(A, false)], 'a'), USER_KEY)).not.toBeNull();
    const badTime = compileConstraints({ expires_at: 'whenever', confirm: 0, destinations: null })!;
    expect(expired(badTime, Date.now())).toBe(true);
  });

  it('lifetime: expired at its time, not before; no constraints compile to nothing', () => {
    const now = Date.now();
    const twoSeconds = compiled([], { lifetimeSeconds: 2 }, now);
    expect(expired(twoSeconds, now + 1999)).toBe(false);
    expect(expired(twoSeconds, now + 2000)).toBe(true);
    expect(compileConstraints({ expires_at: null, confirm: 0, destinations: null })).toBeNull();
  });

  it('policy check: the same filter from fingerprints (expired, not a login, another host, user, -c)', () => {
    const now = Date.now();
    const stored = storedConstraints({ lifetimeSeconds: 60, confirm: true, destinations: [{ from: origin, to: hop('host_a', A, 'alice') }] }, now);
    const fpA = fingerprint(A);
    expect(checkStoredConstraints(stored, { purpose: 'ssh-login', hostKey: fpA, user: 'alice', forwarded: false }, now)).toEqual({ confirm: true });
    expect(checkStoredConstraints(stored, { purpose: 'ssh-login', hostKey: fpA, user: 'bob', forwarded: false }, now)).toHaveProperty('refused');
    expect(checkStoredConstraints(stored, { purpose: 'ssh-login', hostKey: fingerprint(B), forwarded: false }, now)).toHaveProperty('refused');
    expect(checkStoredConstraints(stored, { purpose: 'sshsig', forwarded: false }, now)).toHaveProperty('refused');
    expect(checkStoredConstraints(stored, { purpose: 'ssh-login', hostKey: fpA, forwarded: false }, now + 60_000)).toHaveProperty('refused');
  });
});
