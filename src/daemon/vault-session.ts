// The daemon's vault, locked or unlocked. Unlocked, it holds the open database, the master key and
// the parsed keys; locking drops all of them (the master key and KEKs are zeroed), like
// `ssh-add -x`: sockets stay, identities answer empty, signatures are refused.
import type { Logger } from 'pino';
import { EXIT, KeyholdError } from '../errors.js';
import type { DaemonStatus, LockTimers } from '../control/protocol.js';
import { TokenCache } from '../tokens/token-cache.js';
import { localVaultApi, thisProcess, type DaemonVaultApi } from '../vault/api.js';
import { MAX_PENDING_EVENTS, auditUnavailable, type AuditEvent, type AuditFailure, type AuditPeer } from '../audit/audit-log.js';
import { KeyCache } from '../vault/key-cache.js';
import type { CompiledPolicy } from '../policy/compile.js';
import { NO_POLICY_COMPILED, PolicyCache } from '../policy/policy-cache.js';
import { readKeyring, type FactorKeks, type Keyring } from '../vault/keyring.js';
import { VaultKeyMismatchError } from '../vault/database.js';
import type { VaultPaths } from '../vault/paths.js';
import { Vault } from '../vault/vault.js';
import { encodeRemembered, type RememberedKey } from './remembered-unlock.js';
import { secretMemory } from '../platform/secret-memory.js';

interface Unlocked {
  vault: Vault;
  keys: KeyCache;
  policies: PolicyCache;
  tokens: TokenCache;
  unlockedAt: number;
  lockAt: number | null;
  idleMs: number | null;
  /** Until when a restarted daemon comes back unlocked (`unlock --remember`); null: it does not. */
  rememberedUntil: number | null;
}

/** An unlock's timers; `rememberMs`: keep it in the kernel keyring for a restarted daemon. */
export interface UnlockTimers extends Partial<LockTimers> {
  rememberMs?: number | null;
}

/** The factor name an unlock from the kernel keyring is audited with. */
export const REMEMBERED_FACTOR = 'remembered';

/** setTimeout's limit; longer waits are re-armed. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export class VaultSession {
  private current: Unlocked | null = null;
  private lastActivity = Date.now();
  private timer: NodeJS.Timeout | null = null;
  private readonly listeners: ((unlocked: boolean) => void)[] = [];
  private pending: { event: AuditEvent; time: Date }[] = [];
  private droppedWhileLocked = 0;
  private unreadableLoggedAt = 0;

  constructor(
    readonly paths: VaultPaths,
    readonly vaultId: string,
    private readonly log: Logger,
    private readonly defaults: LockTimers,
    /** The kernel keyring's remembered unlock of this vault; null: none (no `--remember`). */
    private readonly remembered: RememberedKey | null = null,
  ) {}

  get unlocked(): boolean {
    return this.current !== null;
  }

  /** Called after every unlock and lock. */
  onChange(listener: (unlocked: boolean) => void): void {
    this.listeners.push(listener);
  }

  /**
   * The key cache, refreshed, for a request; null while locked. A client's request counts as
   * activity for the idle lock; the daemon's own housekeeping passes `activity = false`.
   */
  keys(activity = true): KeyCache | null {
    const current = this.current;
    if (!current) return null;
    if (activity) this.lastActivity = Date.now();
    try {
      current.keys.refresh();
    } catch (err) {
      // The database cannot be read right now (busy, I/O error): sign from the keys we hold, and
      // say so once a minute, not once a request.
      if (Date.now() - this.unreadableLoggedAt >= 60_000) {
        this.unreadableLoggedAt = Date.now();
        this.log.warn({ code: (err as { code?: string }).code }, 'cannot read the vault; serving the cached keys');
      }
    }
    return current.keys;
  }

  /**
   * The vault's version, read once per turn of the event loop: every request handled in a turn
   * arrived before the read, so each still sees every change committed before it arrived, and
   * pipelined requests share one `PRAGMA data_version`.
   */
  private turnVersion: number | null = null;
  private observeVersion(vault: Vault): number {
    if (this.turnVersion === null) {
      try {
        this.turnVersion = vault.observedVersion();
      } catch {
        // Unreadable for now: the caches stay as they are until a later turn can read it.
        this.turnVersion = this.current?.keys.version ?? -1;
      }
      setImmediate(this.endTurn);
    }
    return this.turnVersion;
  }
  private readonly endTurn = () => {
    this.turnVersion = null;
  };

  /** After a change made through this daemon: the next request reads the version afresh. */
  changed(): void {
    this.turnVersion = null;
  }

  /**
   * A scope's compiled policy as of this turn's vault version (the same observation the key cache
   * uses, so a request sees keys and policy of one version); no policy while locked.
   */
  policy(scope: string): CompiledPolicy {
    const current = this.current;
    if (!current) return NO_POLICY_COMPILED;
    if (current.policies.refresh()) {
      // A damaged stored policy refuses its scope's requests; say why each time the vault changes.
      for (const problem of current.policies.problems()) this.log.error(problem);
    } else if (!current.policies.loaded && Date.now() - this.unreadableLoggedAt >= 60_000) {
      this.unreadableLoggedAt = Date.now();
      this.log.warn('cannot read the policies from the vault yet; refusing every sign request until it can');
    }
    return current.policies.forScope(scope);
  }

  tokens(): TokenCache | null {
    return this.current?.tokens ?? null;
  }

  /** The vault operations, for a CLI request through the control socket; exit 3 while locked. */
  api(actor: AuditPeer): DaemonVaultApi {
    if (!this.current) throw new KeyholdError('the vault is locked', 'unlock it with `keyhold unlock`', EXIT.LOCKED);
    this.lastActivity = Date.now();
    return localVaultApi(this.current.vault, actor);
  }

  /**
   * Records an audit event: written within the batch window while unlocked; kept in memory while
   * locked (nothing can be authenticated without the master key) and written at the next unlock.
   */
  record(event: AuditEvent, options?: { signature?: boolean }): Promise<void> {
    if (this.current) return this.current.vault.record(event, undefined, options);
    if (options?.signature) {
      // Made before a lock (on a signing thread) and finished after it: the vault is locked, so
      // the signature is withheld, and recorded as the refusal it becomes.
      this.keepWhileLocked({ ...event, event: 'sign-refused', reason: 'locked' }, new Date());
      return auditUnavailable('locked');
    }
    this.keepWhileLocked(event, new Date());
    return Promise.resolve();
  }

  private keepWhileLocked(event: AuditEvent, time: Date): void {
    if (this.pending.length >= MAX_PENDING_EVENTS) {
      this.pending.shift();
      this.droppedWhileLocked++;
    }
    this.pending.push({ event, time });
  }

  /** Everything recorded so far is in the log file (rejects if it cannot be written). */
  auditWritten(): Promise<void> {
    return this.current?.vault.auditWritten() ?? Promise.resolve();
  }

  /** Null while the audit log can be written (or while locked, when nothing is written). */
  get auditFailure(): AuditFailure | null {
    return this.current?.vault.auditFailure ?? null;
  }

  countAuditRefusal(): void {
    this.current?.vault.countAuditRefusal();
  }

  /**
   * Unlocks with the KEKs a client proved; exit 4 if they do not open the vault. With
   * `rememberMs`, the unlock is also kept in the kernel keyring, or, if it cannot be, the vault
   * stays locked (exit 1).
   */
  async unlock(keks: FactorKeks, timers: UnlockTimers = {}, actor?: AuditPeer): Promise<void> {
    if (this.current) return;
    const factors = [...keks.keys()];
    const failed = (err: unknown) => void this.record({ event: 'unlock-failed', reason: (err as Error).message, names: factors, ...(actor ? { peer: actor } : {}) });
    let vault: Vault;
    try {
      vault = await Vault.openWithKeks(this.paths, async (keyring) => {
        if (keyring.vault_id !== this.vaultId) {
          throw new KeyholdError(`${this.paths.keys} now belongs to another vault`, 'restart the daemon');
        }
        return keks;
      });
    } catch (err) {
      failed(err);
      throw err;
    }
    if (this.current) {
      vault.close();
      return;
    }
    const now = Date.now();
    const ttlMs = timers.ttlMs !== undefined && timers.ttlMs !== null ? timers.ttlMs : this.defaults.ttlMs;
    const idleMs = timers.idleMs !== undefined && timers.idleMs !== null ? timers.idleMs : this.defaults.idleMs;
    const lockAt = ttlMs === null ? null : now + ttlMs;
    let rememberedUntil: number | null = null;
    if (timers.rememberMs) {
      try {
        rememberedUntil = this.remember(vault, { rememberedUntil: Math.min(now + timers.rememberMs, lockAt ?? Infinity), lockAt, idleMs });
      } catch (err) {
        vault.close({ flushAudit: false });
        failed(err);
        throw err;
      }
    }
    this.begin(vault, { names: factors, unlockedAt: now, lockAt, idleMs, rememberedUntil }, actor);
  }

  /** Keeps the unlock in the kernel keyring until `rememberedUntil` (never past the session's own deadline). */
  private remember(vault: Vault, session: { rememberedUntil: number; lockAt: number | null; idleMs: number | null }): number {
    if (!this.remembered) throw new KeyholdError('this daemon cannot remember an unlock', 'unlock without --remember');
    const payload = vault.withMasterKey((key) => encodeRemembered(session, key));
    this.remembered.store(payload, Math.ceil((session.rememberedUntil - Date.now()) / 1000));
    this.log.info({ rememberedUntil: new Date(session.rememberedUntil).toISOString() }, 'unlock remembered in the kernel keyring');
    return session.rememberedUntil;
  }

  /**
   * At start: unlocks with the kernel keyring's remembered unlock of this vault, if one is there
   * and still valid, keeping the deadlines of the session that stored it. One that does not open
   * this vault (another master key, garbage) is removed and the daemon stays locked.
   */
  unlockRemembered(): boolean {
    if (this.current || !this.remembered) return false;
    const found = this.remembered.lookup();
    switch (found.kind) {
      case 'none':
        return false;
      case 'expired':
        this.log.info('the remembered unlock has expired: starting locked');
        return false;
      case 'unavailable':
        this.log.debug({ reason: found.reason }, 'no kernel keyring: no remembered unlock');
        return false;
      case 'unusable':
        this.remembered.forget();
        this.log.warn({ reason: found.reason, key: this.remembered.description }, 'the remembered unlock in the kernel keyring cannot be used: removed; starting locked');
        return false;
    }
    const { session, masterKey } = found;
    let vault: Vault;
    let keyring: Keyring | undefined;
    try {
      keyring = readKeyring(this.paths.keys);
      if (keyring.vault_id !== this.vaultId) throw new KeyholdError(`${this.paths.keys} now belongs to another vault`);
      vault = Vault.openWithMasterKey(this.paths, keyring, masterKey);
    } catch (err) {
      // A fault that says nothing about the key (a busy disk, no file descriptors, an unreadable
      // key file) keeps it: the next start can still come back unlocked. Only a key that does not
      // open this vault, or a vault that is another one now, is taken out.
      const wrongKey = err instanceof VaultKeyMismatchError || (keyring !== undefined && keyring.vault_id !== this.vaultId);
      if (!wrongKey) {
        this.log.warn({ err: (err as Error).message, key: this.remembered.description }, 'cannot open the vault with the remembered unlock now: starting locked; the remembered unlock is kept');
        return false;
      }
      this.remembered.forget();
      this.log.warn({ err: (err as Error).message, key: this.remembered.description }, 'the remembered unlock in the kernel keyring does not open this vault: removed; starting locked');
      void this.record({ event: 'unlock-failed', reason: 'the remembered unlock does not open this vault', names: [REMEMBERED_FACTOR], peer: thisProcess() });
      return false;
    } finally {
      masterKey.fill(0);
    }
    if (session.lockAt !== null && session.lockAt <= Date.now()) {
      vault.close();
      this.remembered.forget();
      this.log.info('the remembered session has passed its lock deadline: starting locked');
      return false;
    }
    this.begin(vault, { names: [REMEMBERED_FACTOR], ...session }, thisProcess());
    this.log.info({ rememberedUntil: new Date(session.rememberedUntil).toISOString() }, 'unlocked from the remembered unlock in the kernel keyring; no factor asked');
    return true;
  }

  /** Serves `vault`, just opened: the audit events kept while locked are written, the caches filled, the timers armed. */
  private begin(
    vault: Vault,
    session: { names: string[]; unlockedAt?: number; lockAt: number | null; idleMs: number | null; rememberedUntil: number | null },
    actor?: AuditPeer,
  ): void {
    vault.serveAudit(this.log);
    if (this.droppedWhileLocked > 0) void vault.record({ event: 'events-dropped', count: this.droppedWhileLocked });
    for (const { event, time } of this.pending) void vault.record(event, time);
    this.pending = [];
    this.droppedWhileLocked = 0;
    this.turnVersion = null;
    const observe = () => this.observeVersion(vault);
    const keys = new KeyCache(vault, observe);
    const policies = new PolicyCache(vault, observe);
    try {
      keys.refresh();
      // Read with the keys: until the policies are read, every scope refuses (fail closed).
      policies.refresh();
    } catch (err) {
      vault.close({ flushAudit: false });
      throw err;
    }
    const { lockAt, idleMs, rememberedUntil } = session;
    // The clock the deadlines were set from, so lock_at - unlocked_at is exactly the --ttl.
    const now = session.unlockedAt ?? Date.now();
    this.current = {
      vault,
      keys,
      policies,
      tokens: new TokenCache(vault, observe),
      unlockedAt: now,
      lockAt,
      idleMs,
      rememberedUntil,
    };
    this.lastActivity = now;
    const remembered = rememberedUntil === null ? {} : { remembered_until: new Date(rememberedUntil).toISOString() };
    void vault.record({ event: 'unlock', names: session.names, ...remembered, ...(actor ? { peer: actor } : {}) });
    this.armTimer();
    this.log.info({ lockAt: lockAt && new Date(lockAt).toISOString(), idleMs }, 'vault unlocked');
    for (const listener of this.listeners) listener(true);
  }

  /** Takes the remembered unlock out of the kernel keyring (`keyhold stop`; every lock does it too). */
  forgetRemembered(): void {
    if (!this.remembered) return;
    if (this.current) this.current.rememberedUntil = null;
    if (this.remembered.forget()) this.log.info({ key: this.remembered.description }, 'remembered unlock revoked from the kernel keyring');
  }

  /**
   * Locks (`keyhold lock`, ssh-add -x, the idle and ttl limits): the remembered unlock goes too,
   * or a restart would undo the lock.
   */
  lock(reason: string, actor?: AuditPeer): void {
    this.forgetRemembered();
    this.drop(reason, actor);
  }

  private drop(reason: string, actor?: AuditPeer): void {
    const current = this.current;
    if (!current) return;
    void current.vault.record({ event: 'lock', reason, ...(actor ? { peer: actor } : {}) });
    this.current = null;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    current.keys.clear();
    current.policies.clear();
    try {
      current.vault.flushAudit();
    } catch (err) {
      // The log cannot be written now (disk full, say): keep the events for the next unlock.
      this.log.error({ code: (err as { code?: string }).code ?? (err as Error).name }, 'audit log not written at lock; kept in memory');
      for (const { event, time } of current.vault.takeUnwrittenAudit()) this.keepWhileLocked(event, time);
    }
    try {
      current.vault.close({ flushAudit: false });
    } catch (err) {
      this.log.error({ code: (err as { code?: string }).code ?? (err as Error).name }, 'error while closing the vault');
    }
    this.log.info({ reason }, 'vault locked');
    for (const listener of this.listeners) listener(false);
  }

  status(sockets: string[]): DaemonStatus {
    const current = this.current;
    // The kernel key may be gone without this daemon knowing: expired, or taken out by a `lock`
    // or `stop` of another daemon of the same vault (it is named by the vault). Asked, not assumed.
    if (current?.rememberedUntil != null && (current.rememberedUntil <= Date.now() || !this.remembered?.present())) {
      current.rememberedUntil = null;
    }
    const idleLockAt = current?.idleMs != null ? this.lastActivity + current.idleMs : null;
    return {
      pid: process.pid,
      vault: this.paths.db,
      vault_id: this.vaultId,
      locked: !current,
      unlocked_at: current ? new Date(current.unlockedAt).toISOString() : null,
      lock_at: current?.lockAt != null ? new Date(current.lockAt).toISOString() : null,
      idle_ms: current?.idleMs ?? null,
      idle_lock_at: idleLockAt === null ? null : new Date(idleLockAt).toISOString(),
      sockets,
      remembered_until: current?.rememberedUntil != null ? new Date(current.rememberedUntil).toISOString() : null,
      memory: secretMemory().kind,
    };
  }

  /**
   * One timer for both limits, armed for the earlier one. Activity only moves a timestamp; when
   * the timer fires early because of activity it re-arms for the rest.
   */
  private armTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const current = this.current;
    if (!current) return;
    const due = this.nextDeadline(current);
    if (due === null) return;
    this.timer = setTimeout(() => this.checkTimers(), Math.min(MAX_TIMER_MS, Math.max(0, due - Date.now())));
    this.timer.unref();
  }

  private nextDeadline(current: Unlocked): number | null {
    const candidates: number[] = [];
    if (current.lockAt !== null) candidates.push(current.lockAt);
    if (current.idleMs !== null) candidates.push(this.lastActivity + current.idleMs);
    return candidates.length === 0 ? null : Math.min(...candidates);
  }

  private checkTimers(): void {
    const current = this.current;
    if (!current) return;
    const now = Date.now();
    if (current.lockAt !== null && now >= current.lockAt) return this.lock('lock deadline reached');
    if (current.idleMs !== null && now >= this.lastActivity + current.idleMs) return this.lock('idle');
    this.armTimer();
  }

  /**
   * The daemon stopping (SIGTERM, a failed start): locked, but the remembered unlock stays, so
   * that systemd's restart or the next start comes back unlocked. `keyhold stop` forgets it first.
   */
  close(reason = 'daemon stopping', actor?: AuditPeer): void {
    this.drop(reason, actor);
  }
}
