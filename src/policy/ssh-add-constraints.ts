// ssh-add's per-key constraints (-c, -t, -h) in one scope, as stored with the assignment and as
// compiled once per vault version. They are a filter in front of the scope's policy, never a grant:
// a destination-constrained key is refused where OpenSSH's agent would refuse it, then the policy
// decides, and a key added with -c turns the policy's allow into a confirm.
//
// The destination semantics follow OpenSSH's ssh-agent.c (9.2 and later: identity_permitted,
// permitted_by_dest_constraints, match_key_hop, process_request_identities, process_sign_request).
import { globMatch } from './compile.js';
import type { DestinationConstraint, DestinationHop, KeyConstraints } from '../agent-protocol/key-constraints.js';
import { hostCertificateMatches } from '../agent-protocol/certificate.js';
import { fingerprint } from '../agent-protocol/public-key.js';
import { WireReader } from '../agent-protocol/wire.js';
import type { UserauthRequest } from '../agent-protocol/userauth.js';
import type { SessionBinding } from '../signer/backend.js';

/** A hop as stored in the vault (key_scopes.destinations, JSON): host keys as base64 blobs. */
export interface StoredHop {
  user: string | null;
  hostname: string | null;
  keys: { key: string; ca: boolean }[];
}

export interface StoredDestination {
  from: StoredHop;
  to: StoredHop;
}

/** What the vault keeps of one assignment's constraints. */
export interface StoredConstraints {
  /** ISO time; null: the assignment does not expire. */
  expiresAt: string | null;
  confirm: boolean;
  /** null: no destination constraint. */
  destinations: StoredDestination[] | null;
}

export const NO_CONSTRAINTS: StoredConstraints = { expiresAt: null, confirm: false, destinations: null };

export function hasConstraints(c: StoredConstraints): boolean {
  return c.expiresAt !== null || c.confirm || (c.destinations !== null && c.destinations.length > 0);
}

/** The constraints ssh-add sent, as the vault stores them; `now` dates the lifetime. */
export function storedConstraints(constraints: KeyConstraints, now: number): StoredConstraints {
  const storeHop = (hop: DestinationHop): StoredHop => ({
    user: hop.user,
    hostname: hop.hostname,
    keys: hop.hostKeys.map((k) => ({ key: k.keyBlob.toString('base64'), ca: k.isCa })),
  });
  return {
    expiresAt: constraints.lifetimeSeconds === null ? null : new Date(now + constraints.lifetimeSeconds * 1000).toISOString(),
    confirm: constraints.confirm,
    destinations: constraints.destinations.length === 0 ? null : constraints.destinations.map((d) => ({ from: storeHop(d.from), to: storeHop(d.to) })),
  };
}

/** A hop ready for matching: host key blobs decoded once. */
interface CompiledHop {
  user: string | null;
  hostname: string | null;
  keys: { blob: Buffer; isCa: boolean }[];
}

interface CompiledDestination {
  from: CompiledHop;
  to: CompiledHop;
}

/** One assignment's constraints, compiled: everything a request needs is a compare away. */
export interface CompiledConstraints {
  /** Epoch ms; null: never. */
  readonly expiresAt: number | null;
  readonly confirm: boolean;
  /** Empty: not destination-constrained. */
  readonly destinations: readonly CompiledDestination[];
}

/**
 * Compiles what the vault stored. A row that cannot be read (damaged JSON) becomes a key usable
 * nowhere (one destination no host key matches): fail closed, never unconstrained.
 */
export function compileConstraints(stored: { expires_at: string | null; confirm: number; destinations: string | null }): CompiledConstraints | null {
  // An expiry that cannot be read has passed (fail closed).
  const parsed = stored.expires_at === null ? null : Date.parse(stored.expires_at);
  const expiresAt = parsed !== null && Number.isNaN(parsed) ? 0 : parsed;
  const confirm = stored.confirm !== 0;
  let destinations: CompiledDestination[] = [];
  if (stored.destinations !== null) {
    try {
      destinations = (JSON.parse(stored.destinations) as StoredDestination[]).map((d) => ({ from: compileHop(d.from), to: compileHop(d.to) }));
      if (destinations.length === 0) destinations = [UNUSABLE];
    } catch {
      destinations = [UNUSABLE];
    }
  }
  if (expiresAt === null && !confirm && destinations.length === 0) return null;
  return { expiresAt, confirm, destinations };
}

/** Matches no connection at all: neither the first hop (it names a host) nor any host key. */
const UNUSABLE: CompiledDestination = {
  from: { user: null, hostname: '(damaged)', keys: [] },
  to: { user: null, hostname: '(damaged)', keys: [] },
};

function compileHop(hop: StoredHop): CompiledHop {
  if (typeof hop !== 'object' || hop === null || !Array.isArray(hop.keys)) throw new Error('damaged hop');
  return {
    user: typeof hop.user === 'string' && hop.user !== '' ? hop.user : null,
    hostname: typeof hop.hostname === 'string' && hop.hostname !== '' ? hop.hostname : null,
    keys: hop.keys.map((k) => ({ blob: Buffer.from(String(k.key), 'base64'), isCa: k.ca === true })),
  };
}

export function expired(constraints: CompiledConstraints | undefined, now: number): boolean {
  return constraints !== undefined && constraints.expiresAt !== null && now >= constraints.expiresAt;
}

/** The bindings of one connection, as OpenSSH's SocketEntry holds them. */
export interface ConnectionBinds {
  bindings: readonly SessionBinding[];
  /** A session-bind was attempted on this connection (successful or not). */
  bindAttempted: boolean;
}

const CERT_SUFFIX = '-cert-v01@openssh.com';

/** Whether a key blob is an OpenSSH certificate (its type name, the blob's first string). */
export function isCertificateBlob(blob: Buffer): boolean {
  try {
    return new WireReader(blob).utf8().endsWith(CERT_SUFFIX);
  } catch {
    return false;
  }
}

/**
 * Whether `hostKey`, a host certificate, is signed by the CA `caBlob` and valid for `hostname`
 * now: OpenSSH's match_key_hop for a CA key of a hop (sshkey_cert_check_host with wildcard
 * principals), as certificate.ts's hostCertificateMatches implements it: CA key equal, CA
 * signature verified with an allowed algorithm, a host certificate, valid now, no critical
 * options, `hostname` matching a principal (a certificate with no principals matches no name,
 * as OpenSSH since 10.3). A hop without hostname is matched as OpenSSH's literal "(ORIGIN)".
 */
export function hostCertificateMatchesCa(hostKey: Buffer, caBlob: Buffer, hostname: string | null, now: number = Date.now()): boolean {
  return hostCertificateMatches(hostKey, caBlob, hostname ?? '(ORIGIN)', now);
}

/** OpenSSH's match_key_hop: a plain host key equals a non-CA key of the hop; a certificate is signed by a CA of it. */
function matchKeyHop(hostKey: Buffer, hop: CompiledHop): boolean {
  const certificate = isCertificateBlob(hostKey);
  for (const spec of hop.keys) {
    if (!certificate) {
      if (!spec.isCa && spec.blob.equals(hostKey)) return true;
      continue;
    }
    if (spec.isCa && hostCertificateMatchesCa(hostKey, spec.blob, hop.hostname)) return true;
  }
  return false;
}

/**
 * OpenSSH's permitted_by_dest_constraints: some destination takes the connection from `fromKey`
 * (null: the first hop, from this machine) to `toKey` (null: anywhere), for `user` (null: not
 * checked) matched as OpenSSH's match_pattern (`*` and `?`).
 */
export function permittedByDestinations(
  destinations: readonly CompiledDestination[],
  fromKey: Buffer | null,
  toKey: Buffer | null,
  user: string | null,
): boolean {
  return destinations.some((d) => {
    if (fromKey === null) {
      if (d.from.hostname !== null || d.from.keys.length !== 0) return false;
    } else if (!matchKeyHop(fromKey, d.from)) return false;
    if (toKey !== null && !matchKeyHop(toKey, d.to)) return false;
    if (d.to.user !== null && user !== null && !globMatch(d.to.user, user)) return false;
    return true;
  });
}

/**
 * OpenSSH's identity_permitted: every hop of the connection's binding chain is allowed by some
 * destination. `user` is given for a sign request only (checked on the last hop); without it
 * (listing identities) a chain whose last hop is a forwarding needs a destination onwards from
 * that host, so a key usable only *at* a host is not shown *beyond* it.
 */
export function identityPermitted(destinations: readonly CompiledDestination[], connection: ConnectionBinds, user: string | null): boolean {
  if (destinations.length === 0) return true;
  const { bindings } = connection;
  // A bind that failed leaves the connection unbound: OpenSSH refuses rather than treat it as local.
  if (connection.bindAttempted && bindings.length === 0) return false;
  if (bindings.length === 0) return true;
  let fromKey: Buffer | null = null;
  for (let i = 0; i < bindings.length; i++) {
    const hop = bindings[i]!;
    const last = i === bindings.length - 1;
    if (last) {
      // Only a sign request names a user: it must not be signing on a forwarding hop.
      if (hop.isForwarding && user !== null) return false;
    } else if (!hop.isForwarding) {
      // Forwarding through a hop bound for authentication.
      return false;
    }
    if (!permittedByDestinations(destinations, fromKey, hop.hostKey, last ? user : null)) return false;
    fromKey = hop.hostKey;
  }
  const lastHop = bindings[bindings.length - 1]!;
  if (lastHop.isForwarding && user === null && !permittedByDestinations(destinations, lastHop.hostKey, null, null)) return false;
  return true;
}

/**
 * OpenSSH's process_sign_request for a destination-constrained key: only a userauth request for
 * this key, on a bound connection, permitted along the whole chain, for the session bound last,
 * and (past the first hop, or whenever the request names one) for the host key bound last.
 * Answers why not, or null when it may go on to the policy.
 */
export function signRefusalByDestinations(
  destinations: readonly CompiledDestination[],
  connection: ConnectionBinds,
  userauth: UserauthRequest | null,
  keyBlob: Buffer,
): string | null {
  if (destinations.length === 0) return null;
  const { bindings } = connection;
  if (bindings.length === 0) return 'destination-constrained key on an unbound connection';
  if (userauth === null) return 'destination-constrained key asked to sign something other than a login';
  if (userauth.service !== 'ssh-connection' || !userauth.publicKey.equals(keyBlob)) return 'login request for another service or key';
  if (!identityPermitted(destinations, connection, userauth.user)) return 'destination not permitted';
  const last = bindings[bindings.length - 1]!;
  if (!userauth.sessionId.equals(last.sessionId)) return 'login request is not for the session bound last';
  if (bindings.length > 1 && userauth.hostKey === null) return 'forwarded login request names no host key';
  if (userauth.hostKey !== null && !userauth.hostKey.equals(last.hostKey)) return 'host key in the request differs from the one bound last';
  return null;
}

/** `host_a`, `host_a>alice@host_b`: the destinations as ssh-add -h wrote them, and each name's keys. */
export function describeDestinations(destinations: readonly StoredDestination[]): { hosts: string[]; keys: string[] } {
  const hosts: string[] = [];
  const keys = new Map<string, string>();
  const name = (hop: StoredHop) => `${hop.user ? `${hop.user}@` : ''}${hop.hostname ?? ''}`;
  for (const d of destinations) {
    hosts.push(d.from.hostname === null ? name(d.to) : `${name(d.from)}>${name(d.to)}`);
    for (const hop of [d.from, d.to]) {
      if (hop.hostname === null) continue;
      const fps = hop.keys.map((k) => `${safeFingerprint(k.key)}${k.ca ? ' (CA)' : ''}`).join(', ');
      if (!keys.has(hop.hostname)) keys.set(hop.hostname, fps);
    }
  }
  return { hosts, keys: [...keys].map(([host, fps]) => `${host}: ${fps}`) };
}

function safeFingerprint(base64: string): string {
  try {
    return fingerprint(Buffer.from(base64, 'base64'));
  } catch {
    return '(damaged key)';
  }
}

/** The hop host names of a constrained add, for the audit log (never key material). */
export function destinationHostNames(destinations: readonly DestinationConstraint[]): string[] {
  return destinations.map((d) => {
    const to = `${d.to.user ? `${d.to.user}@` : ''}${d.to.hostname ?? ''}`;
    return d.from.hostname === null ? to : `${d.from.hostname}>${to}`;
  });
}

/** What `policy check` knows of a request: no binding chain, only its last host (a fingerprint). */
export interface CheckedRequest {
  purpose: string;
  hostKey?: string;
  user?: string;
  forwarded: boolean;
}

/**
 * `policy check` with a key's ssh-add constraints: why they refuse the request, or whether its
 * use needs a confirmation. Without a binding chain a forwarded request is let through when some
 * destination leads to that host from anywhere (the daemon checks every hop).
 */
export function checkStoredConstraints(constraints: StoredConstraints, request: CheckedRequest, now: number): { refused: string } | { confirm: boolean } {
  if (constraints.expiresAt !== null && !(Date.parse(constraints.expiresAt) > now)) return { refused: 'its ssh-add lifetime has ended' };
  const destinations = constraints.destinations;
  if (destinations !== null) {
    if (request.purpose !== 'ssh-login') return { refused: 'ssh-add -h: a destination-constrained key signs only logins' };
    if (request.hostKey === undefined) return { refused: 'ssh-add -h: a destination-constrained key signs only for a host it names (pass --host)' };
    const permitted = destinations.some((d) => {
      if (!request.forwarded && (d.from.hostname !== null || d.from.keys.length > 0)) return false;
      if (!d.to.keys.some((k) => !k.ca && safeFingerprint(k.key) === request.hostKey)) return false;
      return d.to.user === null || request.user === undefined || globMatch(d.to.user, request.user);
    });
    if (!permitted) return { refused: 'ssh-add -h: not one of its allowed hosts' };
  }
  return { confirm: constraints.confirm };
}
