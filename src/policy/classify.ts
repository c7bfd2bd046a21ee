// What a sign request is for, read once from the data it asks to sign: an SSH login (the userauth
// request, with the host from the request or the connection's verified session-bind), an SSHSIG
// blob from `ssh-keygen -Y sign` (its namespace), or anything else.
import { fingerprint } from '../agent-protocol/public-key.js';
import { boundPlainHostKey } from '../agent-protocol/certificate.js';
import { parseUserauthRequest, type UserauthRequest } from '../agent-protocol/userauth.js';
import { WireReader } from '../agent-protocol/wire.js';
import type { SessionBinding } from '../signer/backend.js';
import type { Purpose } from './policy.js';

export interface SignedDataFacts {
  purpose: Purpose;
  user?: string;
  /** The host key's fingerprint, when the request or a binding names it. */
  hostKey?: string;
  namespace?: string;
  /** The connection came through a forwarded agent (a binding with is_forwarding). */
  forwarded: boolean;
}

const SSHSIG_MAGIC = Buffer.from('SSHSIG');

/** The namespace of an SSHSIG "data to be signed" blob (PROTOCOL.sshsig), or null. */
export function sshsigNamespace(data: Buffer): string | null {
  if (data.length < SSHSIG_MAGIC.length + 16 || !data.subarray(0, SSHSIG_MAGIC.length).equals(SSHSIG_MAGIC)) return null;
  try {
    const r = new WireReader(data.subarray(SSHSIG_MAGIC.length));
    const namespace = r.utf8();
    r.string(); // reserved
    r.utf8(); // hash algorithm
    r.string(); // H(message)
    r.end();
    return namespace.length > 0 ? namespace : null;
  } catch {
    return null;
  }
}

/** Host keys seen recently, by blob: a machine logs in to few hosts, and each login asks this twice. */
const hostFingerprints = new Map<string, string>();
const MAX_REMEMBERED_HOSTS = 1_024;

/** A host key's `SHA256:` fingerprint, hashed once per host rather than once per request. */
export function hostKeyFingerprint(blob: Buffer): string {
  const id = blob.toString('latin1');
  let fp = hostFingerprints.get(id);
  if (fp === undefined) {
    if (hostFingerprints.size >= MAX_REMEMBERED_HOSTS) hostFingerprints.clear();
    // A host bound by its certificate is the certified key: `hosts` rules and known_hosts name it.
    hostFingerprints.set(id, (fp = fingerprint(boundPlainHostKey(blob))));
  }
  return fp;
}

/** `userauth`: the data already parsed as a userauth request (the audit details parse it once). */
export function classifySignedData(
  data: Buffer,
  bindings: readonly SessionBinding[],
  userauth: UserauthRequest | null = parseUserauthRequest(data),
): SignedDataFacts {
  const forwarded = bindings.some((b) => b.isForwarding);
  if (userauth) {
    const facts: SignedDataFacts = { purpose: 'ssh-login', user: userauth.user, forwarded };
    // On a bound connection the login must be for the session it was bound to (as OpenSSH's
    // agent checks); a request naming another session or another host key names no host here.
    const bound = bindings.find((b) => b.sessionId.equals(userauth.sessionId));
    if (bindings.length > 0 && !bound) return facts;
    if (userauth.hostKey && bound && !bound.hostKey.equals(userauth.hostKey)) return facts;
    const hostKey = userauth.hostKey ?? bound?.hostKey;
    if (hostKey) facts.hostKey = hostKeyFingerprint(hostKey);
    return facts;
  }
  const namespace = sshsigNamespace(data);
  if (namespace !== null) return { purpose: 'sshsig', namespace, forwarded };
  return { purpose: 'other', forwarded };
}

/** The host a connection was bound to for authentication (the last hop), for routing identities. */
export function authenticationHost(bindings: readonly SessionBinding[]): string | null {
  const last = bindings[bindings.length - 1];
  return last && !last.isForwarding ? hostKeyFingerprint(last.hostKey) : null;
}
