// The agent backend for one scope: the vault's key cache, re-checked on every request. While the
// vault is locked there is no cache: no identities, and every signature is refused.
import { signatureAlgorithmFor, signSsh } from '../agent-protocol/signature.js';
import type { AgentBackend, SignResult } from '../signer/backend.js';
import type { KeyCache } from '../vault/key-cache.js';

export interface ScopeBackendOptions {
  /** SHA-1 `ssh-rsa` signatures; refused unless explicitly allowed. */
  allowSha1: boolean;
}

export function scopeBackend(keys: () => KeyCache | null, scope: string, options: ScopeBackendOptions): AgentBackend {
  return {
    identities() {
      return keys()?.scope(scope).identities ?? [];
    },
    sign(keyBlob, data, flags): SignResult {
      const cache = keys();
      if (!cache) return { ok: false, reason: 'locked' };
      const entry = cache.scope(scope).byBlob.get(keyBlob.toString('latin1'));
      if (!entry) return { ok: false, reason: 'unknown-key' };
      const algorithm = signatureAlgorithmFor(entry.type, flags);
      if (algorithm === 'ssh-rsa' && !options.allowSha1) {
        return { ok: false, reason: 'sha1-refused', fingerprint: entry.fingerprint };
      }
      return { ok: true, signature: signSsh(entry.key, algorithm, data), fingerprint: entry.fingerprint, algorithm };
    },
  };
}
