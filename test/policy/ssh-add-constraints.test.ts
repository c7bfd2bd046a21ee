// The ssh-add -h matcher against OpenSSH's semantics (ssh-agent.c identity_permitted,
// permitted_by_dest_constraints, match_key_hop, process_sign_request), over binding chains as a
// connection records them, with real ed25519 host key blobs.
import { afterAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
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
import { lineBlob, signCertificate, type CertificateOptions } from '../helpers/certificates.js';
import { generateKeyPair, type KeyPair } from '../helpers/ssh-agent.js';

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

describe('ssh-add -h with a CA hop (@cert-authority in known_hosts): host certificates made by ssh-keygen -s', () => {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-ca-hop-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const ca = generateKeyPair(dir, 'host_ca', 'ed25519');
  const otherCa = generateKeyPair(dir, 'other_ca', 'ed25519');
  const rsaCa = generateKeyPair(dir, 'rsa_ca', 'rsa', 2048);
  const caBlob = lineBlob(ca.pubLine);
  const rsaCaBlob = lineBlob(rsaCa.pubLine);
  let serial = 0;
  /** A host key of its own, certified as the options say (each certificate in its own file). */
  const certify = (signer: KeyPair, options: Omit<CertificateOptions, 'keyId'> & { keyId?: string }): { cert: Buffer; plain: Buffer } => {
    const host = generateKeyPair(dir, `host_${++serial}`, 'ed25519');
    const made = signCertificate(signer.path, host.pubPath, { keyId: options.keyId ?? `host-${serial}`, host: true, ...options });
    return { cert: made.blob, plain: lineBlob(host.pubLine) };
  };
  const forHostA = certify(ca, { principals: ['host_a'] });
  const toHostAByCa = compiled([{ from: origin, to: hop('host_a', caBlob, null, true) }]);

  it('a host certificate signed by the hop CA with the hop name among its principals lists and signs there', () => {
    expect(hostCertificateMatchesCa(forHostA.cert, caBlob, 'host_a')).toBe(true);
    const bindings = [bind(forHostA.cert, false)];
    expect(identityPermitted(toHostAByCa.destinations, chain(...bindings), null)).toBe(true);
    expect(signRefusalByDestinations(toHostAByCa.destinations, chain(...bindings), login(bindings, 'alice'), USER_KEY)).toBeNull();
  });

  it('refused: another host name, another CA, a plain key (even the certified one), a user certificate, an expired or not yet valid one', () => {
    expect(hostCertificateMatchesCa(forHostA.cert, caBlob, 'host_b')).toBe(false);
    expect(hostCertificateMatchesCa(certify(otherCa, { principals: ['host_a'] }).cert, caBlob, 'host_a')).toBe(false);
    expect(hostCertificateMatchesCa(forHostA.plain, caBlob, 'host_a')).toBe(false);
    expect(hostCertificateMatchesCa(certify(ca, { principals: ['host_a'], host: false }).cert, caBlob, 'host_a')).toBe(false);
    expect(hostCertificateMatchesCa(certify(ca, { principals: ['host_a'], validity: '20200101:20200102' }).cert, caBlob, 'host_a')).toBe(false);
    expect(hostCertificateMatchesCa(certify(ca, { principals: ['host_a'], validity: '+1d:+2d' }).cert, caBlob, 'host_a')).toBe(false);
    // Through the matcher: bound to host_b's certificate, or to host_a's plain key, a CA-only hop permits nothing.
    const forHostB = certify(ca, { principals: ['host_b'] });
    expect(identityPermitted(toHostAByCa.destinations, chain(bind(forHostB.cert, false)), null)).toBe(false);
    expect(identityPermitted(toHostAByCa.destinations, chain(bind(forHostA.plain, false)), null)).toBe(false);
    // A plain hop key never matches a certificate, even of that very key (OpenSSH's sshkey_equal compares types).
    const plainHop = compiled([{ from: origin, to: hop('host_a', forHostA.plain) }]);
    expect(identityPermitted(plainHop.destinations, chain(bind(forHostA.cert, false)), null)).toBe(false);
    // A certificate whose CA signature was tampered with verifies under no CA.
    const forged = Buffer.from(forHostA.cert);
    const at = forged.indexOf(Buffer.from('host_a'));
    forged[at] = forged[at]! ^ 0x01;
    expect(hostCertificateMatchesCa(forged, caBlob, 'host_a')).toBe(false);
  });

  it('principals as wildcard patterns; none listed matches no name (fail closed); a hop without hostname is matched as "(ORIGIN)"', () => {
    const wildcard = certify(ca, { principals: ['*.example.org', 'db?'] }).cert;
    expect(hostCertificateMatchesCa(wildcard, caBlob, 'web.example.org')).toBe(true);
    expect(hostCertificateMatchesCa(wildcard, caBlob, 'db1')).toBe(true);
    expect(hostCertificateMatchesCa(wildcard, caBlob, 'example.org')).toBe(false);
    expect(hostCertificateMatchesCa(certify(ca, {}).cert, caBlob, 'anything')).toBe(false);
    expect(hostCertificateMatchesCa(certify(ca, { principals: ['(ORIGIN)'] }).cert, caBlob, null)).toBe(true);
    expect(hostCertificateMatchesCa(forHostA.cert, caBlob, null)).toBe(false);
  });

  it('a forwarding chain host_a>host_b through CA hops; an RSA CA signing with SHA-1 (ssh-rsa) is not taken, rsa-sha2-512 is', () => {
    const forHostB = certify(ca, { principals: ['host_b'] });
    const onwards = compiled([
      { from: origin, to: hop('host_a', caBlob, null, true) },
      { from: hop('host_a', caBlob, null, true), to: hop('host_b', caBlob, 'bob', true) },
    ]);
    const bindings = [bind(forHostA.cert, true), bind(forHostB.cert, false)];
    expect(signRefusalByDestinations(onwards.destinations, chain(...bindings), login(bindings, 'bob'), USER_KEY)).toBeNull();
    expect(signRefusalByDestinations(onwards.destinations, chain(...bindings), login(bindings, 'mallory'), USER_KEY)).toMatch(/not permitted/);
    expect(hostCertificateMatchesCa(certify(rsaCa, { principals: ['host_a'], rsaSignatureAlgorithm: 'rsa-sha2-512' }).cert, rsaCaBlob, 'host_a')).toBe(true);
    expect(hostCertificateMatchesCa(certify(rsaCa, { principals: ['host_a'], rsaSignatureAlgorithm: 'ssh-rsa' }).cert, rsaCaBlob, 'host_a')).toBe(false);
  });
});
