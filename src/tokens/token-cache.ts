// The daemon's view of live tokens, keyed by SHA-256 and rebuilt only when the vault version moves:
// a handshake or a per-request validity check reads no database.
import type { Vault } from '../vault/vault.js';
import { tokenHash, type TokenRecord } from './tokens.js';

interface LiveToken {
  record: TokenRecord;
  expiresAt: number;
}

/** Why a presented token was refused, for the daemon's log (the id when the vault knows the token). */
export type TokenRefusal = { reason: 'revoked' | 'expired'; tokenId: string } | { reason: 'unknown' };

export class TokenCache {
  private builtFrom = -1;
  private byHash = new Map<string, LiveToken>();
  private byId = new Map<string, LiveToken>();
  private revokedByHash = new Map<string, string>();

  /** `observe` reads the vault's version counter (the daemon passes a cheaper, per-turn one). */
  constructor(
    private readonly vault: Vault,
    private readonly observe: () => number = () => vault.observedVersion(),
  ) {}

  refresh(): void {
    const version = this.observe();
    if (version === this.builtFrom) return;
    let rows, revoked;
    try {
      rows = this.vault.activeTokens();
      revoked = this.vault.revokedTokenHashes();
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
    this.revokedByHash = new Map(revoked.map(({ id, hash }) => [hash.toString('latin1'), id]));
    this.builtFrom = version;
  }

  /** The record of a presented token if it is live now, else null. */
  lookup(token: Buffer, now = Date.now()): TokenRecord | null {
    this.refresh();
    const live = this.byHash.get(tokenHash(token).toString('latin1'));
    return live && live.expiresAt > now ? live.record : null;
  }

  /** Why `lookup` found nothing for this token (call it only then). */
  refusal(token: Buffer, now = Date.now()): TokenRefusal {
    this.refresh();
    const hash = tokenHash(token).toString('latin1');
    const live = this.byHash.get(hash);
    if (live && live.expiresAt <= now) return { reason: 'expired', tokenId: live.record.id };
    const revoked = this.revokedByHash.get(hash);
    if (revoked !== undefined) return { reason: 'revoked', tokenId: revoked };
    return { reason: 'unknown' };
  }

  usable(id: string, now = Date.now()): boolean {
    this.refresh();
    const live = this.byId.get(id);
    return live !== undefined && live.expiresAt > now;
  }
}
