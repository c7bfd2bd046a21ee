// What an SSH client asks an agent to sign when it logs in: SSH_MSG_USERAUTH_REQUEST (RFC 4252
// §7), or OpenSSH's publickey-hostbound-v00 variant that also names the server's host key. Parsed
// only to say, in the audit log, which user logged in where; never to decide whether to sign.
import { WireReader } from './wire.js';

const SSH_MSG_USERAUTH_REQUEST = 50;

export interface UserauthRequest {
  sessionId: Buffer;
  user: string;
  service: string;
  method: string;
  algorithm: string;
  publicKey: Buffer;
  /** The server's host key blob (publickey-hostbound-v00@openssh.com only). */
  hostKey: Buffer | null;
}

/** The userauth request in `data`, or null when `data` is something else (a git commit, a file…). */
export function parseUserauthRequest(data: Buffer): UserauthRequest | null {
  // Most signed data is something else: rule it out without building an exception (which costs
  // more than the signature on the hot path).
  if (data.length < 5) return null;
  const idLength = data.readUInt32BE(0);
  if (idLength === 0 || idLength > 128 || data.length <= 4 + idLength || data[4 + idLength] !== SSH_MSG_USERAUTH_REQUEST) return null;
  try {
    const r = new WireReader(data);
    const sessionId = r.string();
    if (sessionId.length === 0 || sessionId.length > 128 || r.byte() !== SSH_MSG_USERAUTH_REQUEST) return null;
    const user = r.utf8();
    const service = r.utf8();
    const method = r.utf8();
    if (method !== 'publickey' && method !== 'publickey-hostbound-v00@openssh.com') return null;
    if (r.byte() !== 1) return null;
    const algorithm = r.utf8();
    const publicKey = r.string();
    const hostKey = method === 'publickey' ? null : r.string();
    r.end();
    return { sessionId, user, service, method, algorithm, publicKey, hostKey };
  } catch {
    return null;
  }
}
