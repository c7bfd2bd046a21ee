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
import type { SignPool } from './sign-pool.js';

export interface ScopeBackendOptions {
  /** SHA-1 `ssh-rsa` signatures; refused unless explicitly allowed. */
  allowSha1: boolean;
  /** Resolves once the event's line is in the audit log; rejects if it cannot be written. */
  record: (event: AuditEvent, options?: { signature?: boolean }) => Promise<void>;
  /** Why the audit log cannot be written now, or null when it can. */
  auditFailure: () => { code: string } | null;
  /** A sign request refused because the audit log cannot be written (counted, not logged one by one). */
  countAuditRefusal: () => void;
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

/**
 * Every answer waits for its audit line: a signature leaves only once the line that records it is
 * in the log file (the writer batches a whole turn of the event loop into one write), and when the
 * log cannot be written nothing is signed at all.
 */
export function scopeBackend(keys: () => KeyCache | null, scope: string, options: ScopeBackendOptions): AgentBackend {
  const AUDIT_UNAVAILABLE: SignResult = { ok: false, reason: 'audit-unavailable' };
  const refusal = (reason: Exclude<SignResult, { ok: true }>['reason'], fp?: string): SignResult => ({ ok: false, reason, ...(fp ? { fingerprint: fp } : {}) });
  /** The result, once its audit line is written; a signature whose line cannot be written is withheld. */
  const audited = (result: SignResult, event: AuditEvent): Promise<SignResult> => {
    const recorded = result.ok
      ? options.record({ ...event, fingerprint: result.fingerprint, algorithm: result.algorithm }, { signature: true })
      : options.record({ ...event, event: 'sign-refused', reason: result.reason, ...(result.fingerprint ? { fingerprint: result.fingerprint } : {}) });
    return recorded.then(
      () => result,
      () => (result.ok ? AUDIT_UNAVAILABLE : result),
    );
  };
  return {
    identities() {
      return keys()?.scope(scope).identities ?? [];
    },
    sign(keyBlob, data, flags, context): SignResult | Promise<SignResult> {
      const cache = keys();
      // Locked: refused at once (the refusal is kept in memory until an unlock can write it).
      if (!cache) return audited(refusal('locked'), signDetails(scope, data, context));
      if (options.auditFailure()) {
        options.countAuditRefusal();
        return AUDIT_UNAVAILABLE;
      }
      // The data is a view into a socket chunk: the audit digest is taken now, not later.
      const event = signDetails(scope, data, context);
      const entry = cache.scope(scope).byBlob.get(keyBlob.toString('latin1'));
      if (!entry) return audited(refusal('unknown-key'), event);
      const algorithm = signatureAlgorithmFor(entry.type, flags);
      if (algorithm === 'ssh-rsa' && !options.allowSha1) return audited(refusal('sha1-refused', entry.fingerprint), event);
      const signed = (signature: Buffer): SignResult => ({ ok: true, signature, fingerprint: entry.fingerprint, algorithm });
      if (options.pool && entry.type === 'ssh-rsa' && options.pool.offload()) {
        return options.pool.sign(entry.fingerprint, entry.key, algorithm, data).then(
          (signature) => audited(signed(signature), event),
          () => audited(refusal('error', entry.fingerprint), event),
        );
      }
      return audited(signed(signSsh(entry.key, algorithm, data)), event);
    },
  };
}
