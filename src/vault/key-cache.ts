// Parsed keys per scope, rebuilt only when the vault's version counter moves. Signing reads
// nothing from the database and parses no key: it looks the blob up and calls node:crypto.
import type { KeyObject } from 'node:crypto';
import type { Identity } from '../agent-protocol/messages.js';
import type { SshKeyType } from '../agent-protocol/public-key.js';
import { compileConstraints, type CompiledConstraints } from '../policy/ssh-add-constraints.js';
import { fromPkcs8 } from './key-material.js';
import { certificateFactsOf, type Vault } from './vault.js';

export interface CachedKey {
  /** The key's fingerprint (for a certificate, the certified key's: policy `keys` match both). */
  fingerprint: string;
  /** The plain key type: a certificate signs as its key does. */
  type: SshKeyType;
  key: KeyObject;
  /** Set when the identity is a certificate of the key (for the audit line). */
  certificate?: { key_id: string; serial: string };
}

export interface ScopeKeys {
  identities: Identity[];
  /** Keyed by the public blob as a latin1 string: cheap to build from a request, exact to compare. */
  byBlob: Map<string, CachedKey>;
  /**
   * ssh-add's constraints (-c, -t, -h) of the keys that have some, by public blob as `byBlob`
   * (a certificate identity gets its own entry). Empty for most scopes: their requests skip it.
   */
  constraints: Map<string, CompiledConstraints>;
  /** The earliest expiry among `constraints` (epoch ms), or null: one compare hides expired keys. */
  nextExpiry: number | null;
}

const EMPTY_SCOPE: ScopeKeys = { identities: [], byBlob: new Map(), constraints: new Map(), nextExpiry: null };

export class KeyCache {
  private builtFrom = -1;
  private scopes = new Map<string, ScopeKeys>();
  private parsed = new Map<string, CachedKey>();
  private certificates = new Map<string, CachedKey>();

  /** `observe` reads the vault's version counter (the daemon passes a cheaper, per-turn one). */
  constructor(
    private readonly vault: Vault,
    private readonly observe: () => number = () => vault.observedVersion(),
  ) {}

  /** Rebuilds when the vault changed; returns true if it did. */
  refresh(): boolean {
    const version = this.observe();
    if (version === this.builtFrom) return false;
    const rows = this.vault.scopeKeys();
    const scopes = new Map<string, ScopeKeys>();
    const parsed = new Map<string, CachedKey>();
    const certificates = new Map<string, CachedKey>();
    for (const row of rows) {
      // A key unchanged across versions keeps its KeyObject: parse each key once, not per change.
      let cached = parsed.get(row.fingerprint) ?? this.parsed.get(row.fingerprint);
      if (!cached) {
        cached = { fingerprint: row.fingerprint, type: row.type as SshKeyType, key: fromPkcs8(row.privatePkcs8) };
      }
      row.privatePkcs8.fill(0);
      parsed.set(row.fingerprint, cached);
      const blobId = row.publicBlob.toString('latin1');
      let entry = cached;
      if (row.certificate) {
        // The certificate maps to the same KeyObject; what the audit says of it is read once.
        const known = certificates.get(blobId) ?? this.certificates.get(blobId);
        entry = known?.key === cached.key ? known : { ...cached, certificate: certificateFactsOf(row.publicBlob) };
        certificates.set(blobId, entry);
      }
      let scope = scopes.get(row.scope);
      if (!scope) scopes.set(row.scope, (scope = { identities: [], byBlob: new Map(), constraints: new Map(), nextExpiry: null }));
      // Each identity once, as OpenSSH lists them.
      if (scope.byBlob.has(blobId)) continue;
      scope.identities.push({ keyBlob: row.publicBlob, comment: row.comment });
      scope.byBlob.set(blobId, entry);
      const constraints = compileConstraints(row);
      if (constraints) {
        scope.constraints.set(blobId, constraints);
        if (constraints.expiresAt !== null && (scope.nextExpiry === null || constraints.expiresAt < scope.nextExpiry)) scope.nextExpiry = constraints.expiresAt;
      }
    }
    this.scopes = scopes;
    this.parsed = parsed;
    this.certificates = certificates;
    this.builtFrom = version;
    return true;
  }

  /** The vault version the cache was built from; -1 before the first build. */
  get version(): number {
    return this.builtFrom;
  }

  scope(name: string): ScopeKeys {
    return this.scopes.get(name) ?? EMPTY_SCOPE;
  }

  /** The earliest ssh-add expiry of any scope's key (epoch ms), or null. */
  nextExpiry(): number | null {
    let next: number | null = null;
    for (const scope of this.scopes.values()) {
      if (scope.nextExpiry !== null && (next === null || scope.nextExpiry < next)) next = scope.nextExpiry;
    }
    return next;
  }

  scopeNames(): string[] {
    return [...this.scopes.keys()];
  }

  clear(): void {
    this.scopes = new Map();
    this.parsed = new Map();
    this.certificates = new Map();
    this.builtFrom = -1;
  }
}
