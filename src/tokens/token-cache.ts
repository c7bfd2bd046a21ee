// The daemon's view of live tokens, keyed by SHA-256 and rebuilt only when the vault version moves:
// a handshake or a per-request validity check reads no database.
import type { Vault } from '../vault/vault.js';
import { tokenHash, type TokenRecord } from './tokens.js';

interface LiveToken {
  record: TokenRecord;
  expiresAt: number;
}

export class TokenCache {
  private builtFrom = -1;
  private byHash = new Map<string, LiveToken>();
  private byId = new Map<string, LiveToken>();

  /** `observe` reads the vault's version counter (the daemon passes a cheaper, per-turn one). */
  constructor(
    private readonly vault: Vault,
    private readonly observe: () => number = () => vault.observedVersion(),
  ) {}

  refresh(): void {
    const version = this.observe();
    if (version === this.builtFrom) return;
    let rows;
    try {
      rows = this.vault.activeTokens();
    } catch {
      // The vault cannot be read right now (busy, an I/O error): keep what we have, try again at
      // the next request. A handshake must never throw out of the listener.
      return;
    }
    const byHash = new Map<string, LiveToken>();
    const byId = new Map<string, LiveToken>();
    for (const { hash, ...record } of rows) {
      const live = { record, expiresAt: record.expires === null ? Infinity : Date.parse(record.expires) };
      byHash.set(hash.toString('latin1'), live);
      byId.set(record.id, live);
    }
    this.byHash = byHash;
    this.byId = byId;
    this.builtFrom = version;
  }

  /** The record of a presented token if it is live now, else null. */
  lookup(token: Buffer, now = Date.now()): TokenRecord | null {
    this.refresh();
    const live = this.byHash.get(tokenHash(token).toString('latin1'));
    return live && live.expiresAt > now ? live.record : null;
  }

  usable(id: string, now = Date.now()): boolean {
    this.refresh();
    const live = this.byId.get(id);
    return live !== undefined && live.expiresAt > now;
  }
}
