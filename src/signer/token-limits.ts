// Limits for the token listeners, apart from the owner's control and scope sockets (which keep
// their own ConnectionLimit, so container traffic cannot use up what the owner needs):
// sockets in total (handshakes included), sessions in total, per token and per source (a TCP
// address or a Unix uid), and the bytes of partially received frames per token, per source and
// in total. Sessions are registered by token, so a revoked or expired token's connections are
// closed, and their memory released, at once.
import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import type { MemoryBudget } from './backend.js';

export interface TokenLimitOptions {
  /** Every token-listener socket: pending handshakes, failed ones held before closing, sessions. */
  maxSockets: number;
  maxSessions: number;
  maxSessionsPerToken: number;
  maxSessionsPerSource: number;
  /** Bytes of partially received agent frames. */
  memoryTotal: number;
  memoryPerToken: number;
  memoryPerSource: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_TOKEN_LIMITS: TokenLimitOptions = {
  maxSockets: 4096,
  maxSessions: 3072,
  maxSessionsPerToken: 256,
  maxSessionsPerSource: 1024,
  memoryTotal: 64 * MiB,
  memoryPerToken: 16 * MiB,
  memoryPerSource: 32 * MiB,
};

/**
 * The defaults, scaled down when the open-file limit is low: token listeners get at most about a
 * third of it, so the owner's sockets, the vault and the audit log always find a descriptor.
 */
export function tokenLimitsFor(openFileLimit: number | null): TokenLimitOptions {
  const d = DEFAULT_TOKEN_LIMITS;
  if (openFileLimit === null) return d;
  const maxSockets = Math.max(16, Math.min(d.maxSockets, Math.floor(openFileLimit / 3)));
  const maxSessions = Math.max(8, Math.min(d.maxSessions, Math.floor((maxSockets * 3) / 4)));
  return {
    ...d,
    maxSockets,
    maxSessions,
    maxSessionsPerToken: Math.min(d.maxSessionsPerToken, maxSessions),
    maxSessionsPerSource: Math.min(d.maxSessionsPerSource, maxSessions),
  };
}

/** This process's soft limit on open files (Linux), or null when it cannot be read. */
export function openFileLimit(): number | null {
  try {
    const line = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (!line) return null;
    return line[1] === 'unlimited' ? null : Number(line[1]);
  } catch {
    return null;
  }
}

/** A count of bytes that may not pass `limit`. */
export class ByteBudget implements MemoryBudget {
  private inUse = 0;

  constructor(readonly limit: number) {}

  reserve(bytes: number): boolean {
    if (bytes < 0 || this.inUse + bytes > this.limit) return false;
    this.inUse += bytes;
    return true;
  }

  release(bytes: number): void {
    this.inUse = Math.max(0, this.inUse - bytes);
  }

  get used(): number {
    return this.inUse;
  }
}

/**
 * One connection's share of several budgets: a reservation succeeds only if every budget has
 * room (all or nothing). Releases never exceed what this connection holds, so a release after
 * `releaseAll` (the connection was closed from outside) cannot free another connection's bytes.
 */
export class ConnectionMemory implements MemoryBudget {
  private held = 0;

  constructor(private readonly budgets: readonly ByteBudget[]) {}

  reserve(bytes: number): boolean {
    if (!Number.isSafeInteger(bytes) || bytes < 0) return false;
    const taken: ByteBudget[] = [];
    for (const budget of this.budgets) {
      if (!budget.reserve(bytes)) {
        for (const b of taken) b.release(bytes);
        return false;
      }
      taken.push(budget);
    }
    this.held += bytes;
    return true;
  }

  release(bytes: number): void {
    const n = Math.min(Math.max(0, bytes), this.held);
    this.held -= n;
    for (const budget of this.budgets) budget.release(n);
  }

  releaseAll(): void {
    this.release(this.held);
  }

  get bytes(): number {
    return this.held;
  }
}

interface Group {
  /** Each session's socket and the function that gives back its slots and memory (runs once). */
  sessions: Map<Socket, () => void>;
  memory: ByteBudget;
}

export type SessionAdmission =
  | { ok: true; memory: ConnectionMemory }
  | { ok: false; reason: 'too many sessions' | 'too many sessions for this token' | 'too many sessions from this source' };

export class TokenConnections {
  private socketCount = 0;
  private sessionCount = 0;
  private readonly byToken = new Map<string, Group>();
  private readonly bySource = new Map<string, Group>();
  readonly memory: ByteBudget;

  constructor(readonly limits: TokenLimitOptions = DEFAULT_TOKEN_LIMITS) {
    this.memory = new ByteBudget(limits.memoryTotal);
  }

  /** Counts a newly accepted socket until it closes; false when every socket slot is taken. */
  tryAccept(socket: Socket): boolean {
    if (this.socketCount >= this.limits.maxSockets) return false;
    this.socketCount++;
    socket.once('close', () => this.socketCount--);
    return true;
  }

  /** Counts a socket that takes the slot of one just evicted (whose 'close' has not come yet). */
  acceptInPlaceOfEvicted(socket: Socket): void {
    this.socketCount++;
    socket.once('close', () => this.socketCount--);
  }

  /** Registers an authenticated connection of `tokenId` from `source`, within the caps. */
  openSession(socket: Socket, tokenId: string, source: string): SessionAdmission {
    const { maxSessions, maxSessionsPerToken, maxSessionsPerSource } = this.limits;
    if (this.sessionCount >= maxSessions) return { ok: false, reason: 'too many sessions' };
    if ((this.byToken.get(tokenId)?.sessions.size ?? 0) >= maxSessionsPerToken) return { ok: false, reason: 'too many sessions for this token' };
    if ((this.bySource.get(source)?.sessions.size ?? 0) >= maxSessionsPerSource) return { ok: false, reason: 'too many sessions from this source' };
    const token = this.group(this.byToken, tokenId, this.limits.memoryPerToken);
    const from = this.group(this.bySource, source, this.limits.memoryPerSource);
    const memory = new ConnectionMemory([token.memory, from.memory, this.memory]);
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      memory.releaseAll();
      this.sessionCount--;
      this.leave(this.byToken, tokenId, socket);
      this.leave(this.bySource, source, socket);
    };
    token.sessions.set(socket, release);
    from.sessions.set(socket, release);
    this.sessionCount++;
    socket.once('close', release);
    return { ok: true, memory };
  }

  /** Closes every connection of the tokens `usable` rejects (revoked, expired); how many were closed. */
  closeUnusable(usable: (tokenId: string) => boolean): number {
    let closed = 0;
    for (const [tokenId, group] of [...this.byToken]) {
      if (!usable(tokenId)) closed += this.closeGroup(group);
    }
    return closed;
  }

  /** Closes every session (the vault was locked or the listeners stop). */
  closeAll(): number {
    let closed = 0;
    for (const group of [...this.byToken.values()]) closed += this.closeGroup(group);
    return closed;
  }

  sessions(tokenId?: string): number {
    return tokenId === undefined ? this.sessionCount : (this.byToken.get(tokenId)?.sessions.size ?? 0);
  }

  get sockets(): number {
    return this.socketCount;
  }

  private closeGroup(group: Group): number {
    const sessions = [...group.sessions];
    // Released now rather than on 'close' (which comes a turn later): the slots and memory are
    // free before the next handshake is checked.
    for (const [socket, release] of sessions) {
      release();
      socket.destroy();
    }
    return sessions.length;
  }

  private group(map: Map<string, Group>, key: string, memoryLimit: number): Group {
    let group = map.get(key);
    if (!group) map.set(key, (group = { sessions: new Map(), memory: new ByteBudget(memoryLimit) }));
    return group;
  }

  private leave(map: Map<string, Group>, key: string, socket: Socket): void {
    const group = map.get(key);
    if (!group) return;
    group.sessions.delete(socket);
    if (group.sessions.size === 0) map.delete(key);
  }
}
