// Parsed keys per scope, rebuilt only when the vault's version counter moves. Signing reads
// nothing from the database and parses no key: it looks the blob up and calls node:crypto.
import type { KeyObject } from 'node:crypto';
import type { Identity } from '../agent-protocol/messages.js';
import type { SshKeyType } from '../agent-protocol/public-key.js';
import { fromPkcs8 } from './key-material.js';
import type { Vault } from './vault.js';

export interface CachedKey {
  fingerprint: string;
  type: SshKeyType;
  key: KeyObject;
}

export interface ScopeKeys {
  identities: Identity[];
  /** Keyed by the public blob as a latin1 string: cheap to build from a request, exact to compare. */
  byBlob: Map<string, CachedKey>;
}

const EMPTY_SCOPE: ScopeKeys = { identities: [], byBlob: new Map() };

export class KeyCache {
  private builtFrom = -1;
  private scopes = new Map<string, ScopeKeys>();
  private parsed = new Map<string, CachedKey>();

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
    for (const row of rows) {
      // A key unchanged across versions keeps its KeyObject: parse each key once, not per change.
      let cached = parsed.get(row.fingerprint) ?? this.parsed.get(row.fingerprint);
      if (!cached) {
        cached = { fingerprint: row.fingerprint, type: row.type as SshKeyType, key: fromPkcs8(row.privatePkcs8) };
      }
      row.privatePkcs8.fill(0);
      parsed.set(row.fingerprint, cached);
      let scope = scopes.get(row.scope);
      if (!scope) scopes.set(row.scope, (scope = { identities: [], byBlob: new Map() }));
      scope.identities.push({ keyBlob: row.publicBlob, comment: row.comment });
      scope.byBlob.set(row.publicBlob.toString('latin1'), cached);
    }
    this.scopes = scopes;
    this.parsed = parsed;
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

  scopeNames(): string[] {
    return [...this.scopes.keys()];
  }

  clear(): void {
    this.scopes = new Map();
    this.parsed = new Map();
    this.builtFrom = -1;
  }
}
