// The agent backend for one scope: the vault's key cache, re-checked on every request. While the
// vault is locked there is no cache: no identities, and every signature is refused. Every
// signature and refusal is recorded for the audit log.
import { createHash } from 'node:crypto';
import { fingerprint } from '../agent-protocol/public-key.js';
import { signatureAlgorithmFor, signSsh, type SignatureAlgorithm } from '../agent-protocol/signature.js';
import { parseUserauthRequest } from '../agent-protocol/userauth.js';
import type { AuditEvent } from '../audit/audit-log.js';
import type { AgentBackend, RequestContext, SignResult } from '../signer/backend.js';
import type { CachedKey, KeyCache } from '../vault/key-cache.js';
import type { SignPool } from './sign-pool.js';

export interface ScopeBackendOptions {
  /** SHA-1 `ssh-rsa` signatures; refused unless explicitly allowed. */
  allowSha1: boolean;
  record: (event: AuditEvent) => void;
  /** Signing threads for RSA (see sign-pool.ts); without one, everything signs inline. */
  pool?: SignPool | null;
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
  type Planned = SignResult | { ok: 'pooled'; entry: CachedKey; algorithm: SignatureAlgorithm };
  const plan = (keyBlob: Buffer, flags: number): Planned => {
    const cache = keys();
    if (!cache) return { ok: false, reason: 'locked' };
    const entry = cache.scope(scope).byBlob.get(keyBlob.toString('latin1'));
    if (!entry) return { ok: false, reason: 'unknown-key' };
    const algorithm = signatureAlgorithmFor(entry.type, flags);
    if (algorithm === 'ssh-rsa' && !options.allowSha1) {
      return { ok: false, reason: 'sha1-refused', fingerprint: entry.fingerprint };
    }
    return { ok: 'pooled', entry, algorithm };
  };
  const audit = (result: SignResult, data: Buffer, context: RequestContext): SignResult => {
    const event = signDetails(scope, data, context);
    if (result.ok) {
      options.record({ ...event, fingerprint: result.fingerprint, algorithm: result.algorithm });
    } else {
      options.record({ ...event, event: 'sign-refused', reason: result.reason, ...(result.fingerprint ? { fingerprint: result.fingerprint } : {}) });
    }
    return result;
  };
  return {
    identities() {
      return keys()?.scope(scope).identities ?? [];
    },
    sign(keyBlob, data, flags, context): SignResult | Promise<SignResult> {
      const planned = plan(keyBlob, flags);
      if (planned.ok !== 'pooled') return audit(planned, data, context);
      const { entry, algorithm } = planned;
      const signed = (signature: Buffer): SignResult => ({ ok: true, signature, fingerprint: entry.fingerprint, algorithm });
      if (options.pool && entry.type === 'ssh-rsa' && options.pool.offload()) {
        // The data is a view into a socket chunk: the audit digest is taken now, not later.
        const event = signDetails(scope, data, context);
        return options.pool.sign(entry.fingerprint, entry.key, algorithm, data).then(
          (signature) => {
            options.record({ ...event, fingerprint: entry.fingerprint, algorithm });
            return signed(signature);
          },
          () => {
            options.record({ ...event, event: 'sign-refused', reason: 'error', fingerprint: entry.fingerprint });
            return { ok: false, reason: 'error', fingerprint: entry.fingerprint } as SignResult;
          },
        );
      }
      return audit(signed(signSsh(entry.key, algorithm, data)), data, context);
    },
  };
}
