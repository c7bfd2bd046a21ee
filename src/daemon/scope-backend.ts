// The agent backend for one scope: the vault's key cache, re-checked on every request. While the
// vault is locked there is no cache: no identities, and every signature is refused. Every
// signature and refusal is recorded for the audit log.
import { createHash } from 'node:crypto';
import { fingerprint } from '../agent-protocol/public-key.js';
import { signatureAlgorithmFor, signSsh } from '../agent-protocol/signature.js';
import { parseUserauthRequest } from '../agent-protocol/userauth.js';
import type { AuditEvent } from '../audit/audit-log.js';
import type { AgentBackend, RequestContext, SignResult } from '../signer/backend.js';
import type { KeyCache } from '../vault/key-cache.js';

export interface ScopeBackendOptions {
  /** SHA-1 `ssh-rsa` signatures; refused unless explicitly allowed. */
  allowSha1: boolean;
  record: (event: AuditEvent) => void;
}

/** Who asked, a digest of what was signed and, for an SSH login, as whom and to which host. */
function signDetails(scope: string, data: Buffer, context: RequestContext): AuditEvent {
  const event: AuditEvent = {
    event: 'sign',
    scope,
    peer: context.peer,
    ...(context.tokenId ? { token_id: context.tokenId } : {}),
    data_sha256: createHash('sha256').update(data).digest('hex'),
  };
  const userauth = parseUserauthRequest(data);
  if (userauth) {
    event.user = userauth.user;
    // The host key comes from the request itself (hostbound) or from a verified session-bind.
    const hostKey = userauth.hostKey ?? context.bindings.find((b) => b.sessionId.equals(userauth.sessionId))?.hostKey;
    if (hostKey) event.host_key = fingerprint(hostKey);
  }
  return event;
}

export function scopeBackend(keys: () => KeyCache | null, scope: string, options: ScopeBackendOptions): AgentBackend {
  const sign = (keyBlob: Buffer, data: Buffer, flags: number): SignResult => {
    const cache = keys();
    if (!cache) return { ok: false, reason: 'locked' };
    const entry = cache.scope(scope).byBlob.get(keyBlob.toString('latin1'));
    if (!entry) return { ok: false, reason: 'unknown-key' };
    const algorithm = signatureAlgorithmFor(entry.type, flags);
    if (algorithm === 'ssh-rsa' && !options.allowSha1) {
      return { ok: false, reason: 'sha1-refused', fingerprint: entry.fingerprint };
    }
    return { ok: true, signature: signSsh(entry.key, algorithm, data), fingerprint: entry.fingerprint, algorithm };
  };
  return {
    identities() {
      return keys()?.scope(scope).identities ?? [];
    },
    sign(keyBlob, data, flags, context): SignResult {
      const result = sign(keyBlob, data, flags);
      const event = signDetails(scope, data, context);
      if (result.ok) {
        options.record({ ...event, fingerprint: result.fingerprint, algorithm: result.algorithm });
      } else {
        options.record({ ...event, event: 'sign-refused', reason: result.reason, ...(result.fingerprint ? { fingerprint: result.fingerprint } : {}) });
      }
      return result;
    },
  };
}
