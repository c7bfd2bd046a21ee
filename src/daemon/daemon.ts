// `keyhold serve`: holds the vault (locked or unlocked), serves one agent socket per scope, the
// token-gated listeners for containers, and the control socket for the CLI.
import type { Logger } from 'pino';
import { isIP } from 'node:net';
import { existsSync, unlinkSync } from 'node:fs';
import type { Server } from 'node:net';
import { KeyholdError, notFound } from '../errors.js';
import { Approvals, DEFAULT_CONFIRM_TIMEOUT_MS, type Approver } from '../policy/approvals.js';
import { ConfirmProgram, confirmProgramFor } from '../policy/confirm-program.js';
import { hardenProcess } from '../libc.js';
import { secretMemory } from '../platform/secret-memory.js';
import { acquirePidLock, ensurePrivateDir, pidFilePath, scopesDir, type PidLock } from '../runtime-dir.js';
import { controlSocketPath, type ControlRequest, type LockTimers } from '../control/protocol.js';
import { callVaultMethod } from '../control/requests.js';
import { listenControl } from '../control/server.js';
import { HandshakeGuard } from '../signer/handshake-guard.js';
import { EmptiedScopes, ScopeSockets } from '../signer/scope-sockets.js';
import { listenToken, tcpSource, TOKEN_MAX_PENDING_WRITE, type ListenAddress } from '../signer/token-listener.js';
import { openFileLimit, TokenConnections, tokenLimitsFor } from '../signer/token-limits.js';
import { closeServer, ConnectionLimit } from '../signer/unix-listener.js';
import type { AgentBackend, Peer } from '../signer/backend.js';
import { AuditUnavailableError, type AuditEvent, type AuditPeer } from '../audit/audit-log.js';
import { thisProcess, type DaemonVaultApi } from '../vault/api.js';
import { zeroKeks, type FactorKeks } from '../vault/keyring.js';
import type { VaultPaths } from '../vault/paths.js';
import { isBusyError } from '../vault/database.js';
import { keyOperations, UnlockAttempts } from './key-operations.js';
import { scopeBackend } from './scope-backend.js';
import { SignPool } from './sign-pool.js';
import { RememberedKey } from './remembered-unlock.js';
import { VaultSession, type UnlockTimers } from './vault-session.js';

export interface DaemonOptions {
  paths: VaultPaths;
  vaultId: string;
  /**
   * Asked once the daemon holds its pid lock (so a second daemon fails before any prompt): the
   * KEKs to unlock with at start, or null to start locked. Zeroed once used.
   */
  unlockWith?: () => Promise<FactorKeks | null>;
  /** Defaults for every unlock: --idle-lock and --lock-after. */
  lockTimers?: LockTimers;
  runtimeDir: string;
  log: Logger;
  scopeSockets: boolean;
  /** Token-gated listeners for containers. */
  listen?: ListenAddress[];
  /** Scopes whose sockets exist even while locked or without keys (the config's `scopes`). */
  scopes?: string[];
  /** How often the vault is checked for new or removed scopes. */
  pollIntervalMs?: number;
  idleTimeoutMs?: number;
  maxConnections?: number;
  allowSha1?: boolean;
  /** RSA signing threads (default: one per core; 0 signs everything on the main thread). */
  signThreads?: number;
  /** SSH_ASKPASS-style confirm program; unset: `$SSH_ASKPASS` when a display is set, else none. */
  confirmProgram?: string;
  /** How long a request waits for a confirmation before it is refused (default 30 s). */
  confirmTimeoutMs?: number;
  /** ssh-agent -t: the lifetime (seconds) of a key ssh-add adds without -t; unset: none. */
  addLifetimeSeconds?: number | null;
}

export interface Daemon {
  session: VaultSession;
  socketPaths(): string[];
  /** Resolves when `keyhold stop` asked this daemon to stop (its answer is sent by then): the caller stops it. */
  stopRequested: Promise<AuditPeer>;
  /** Stops serving: sockets closed and removed, the vault locked (`reason` in the audit log), the pid lock released. */
  stop(reason?: string, actor?: AuditPeer): Promise<void>;
}

/** Maps the first page of secret memory now, so that a step down is said at start, before any key arrives. */
function warnUnlessSecretMemory(log: Logger): void {
  const memory = secretMemory();
  if (memory.kind !== 'secret') {
    log.warn({ memory: memory.kind, reason: memory.fallbackReason }, `master key and KEKs in ${memory.kind === 'locked' ? "mlock'ed, non-dumpable" : 'ordinary'} memory, not memfd_secret`);
  }
}

export async function startDaemon(options: DaemonOptions): Promise<Daemon> {
  const { runtimeDir, log } = options;
  const hardening = hardenProcess();
  if (!hardening.dumpable || !hardening.coreLimit) log.warn(hardening, 'could not fully disable core dumps and ptrace');
  warnUnlessSecretMemory(log);
  ensurePrivateDir(runtimeDir);
  let lock: PidLock = acquirePidLock(pidFilePath(runtimeDir));
  const session = new VaultSession(options.paths, options.vaultId, log, options.lockTimers ?? { idleMs: null, ttlMs: null }, new RememberedKey(options.vaultId));
  const servers: { server: Server; unlinkPath?: string }[] = [];
  const closeServers = async () => {
    for (const { server, unlinkPath } of servers.splice(0)) {
      await closeServer(server);
      if (unlinkPath) {
        try {
          unlinkSync(unlinkPath);
        } catch {
          /* already gone */
        }
      }
    }
  };
  try {
    ensurePrivateDir(scopesDir(runtimeDir));
    // A remembered unlock (`unlock --remember`) in the kernel keyring first: no factor asked.
    const initial = session.unlockRemembered() ? null : await options.unlockWith?.();
    if (initial) {
      try {
        await session.unlock(initial, {}, thisProcess());
      } finally {
        zeroKeks(initial);
      }
    }
    const record = (event: AuditEvent, options?: { signature?: boolean }) => session.record(event, options);
    const pool = options.signThreads === 0 ? null : new SignPool(options.signThreads);
    session.onChange((unlocked) => {
      if (!unlocked) pool?.clear();
    });
    const confirmPath = confirmProgramFor(options.confirmProgram);
    const confirmProgram = confirmPath ? new ConfirmProgram(confirmPath, log) : null;
    const approvals = new Approvals({
      timeoutMs: options.confirmTimeoutMs ?? DEFAULT_CONFIRM_TIMEOUT_MS,
      log,
      program: confirmProgram,
    });
    // Locked, nothing can be signed: the requests waiting for a confirmation are refused now.
    session.onChange((unlocked) => {
      if (!unlocked) approvals.refuseAll('locked');
    });
    const policy = (scope: string) => session.policy(scope);
    const backends = new Map<string, AgentBackend>();
    const keys = () => session.keys();
    const unlockAttempts = new UnlockAttempts();
    const backendFor = (scope: string) => {
      let backend = backends.get(scope);
      if (!backend) {
        backend = {
          ...scopeBackend(keys, scope, {
            allowSha1: options.allowSha1 ?? false,
            record,
            auditFailure: () => session.auditFailure,
            countAuditRefusal: () => session.countAuditRefusal(),
            pool,
            policy,
            approvals,
          }),
          // ssh-add's operations, run as the control socket runs the same changes (defined below).
          ...keyOperations(scope, {
            session,
            log,
            record,
            unlockAttempts,
            addLifetimeSeconds: options.addLifetimeSeconds ?? null,
            changeVault: (actor, change) => changeVault(actor, change),
            unlock: (keks, actor) => unlockSession(keks, {}, actor),
          }),
        };
        backends.set(scope, backend);
      }
      return backend;
    };
    // The owner's control and scope sockets and the token listeners have separate caps, so
    // container traffic cannot use up the connections (or descriptors) the owner needs.
    const fileLimit = openFileLimit();
    const tokenLimits = tokenLimitsFor(fileLimit);
    const limit = new ConnectionLimit(options.maxConnections ?? ownerConnectionLimit(fileLimit, tokenLimits.maxSockets));
    const tokenConnections = new TokenConnections(tokenLimits);
    const idleTimeoutMs = options.idleTimeoutMs ?? 10 * 60_000;
    const maxPendingWrite = 1024 * 1024;
    const sockets = new ScopeSockets({ dir: scopesDir(runtimeDir), log, limit, idleTimeoutMs, maxPendingWrite, backendFor });
    const guard = new HandshakeGuard();
    const quietKnocks = new Map<string, number>();
    const guardSweep = setInterval(() => {
      guard.sweep();
      quietKnocks.clear();
    }, 60_000);
    guardSweep.unref();
    // A token revoked or expired (through this daemon or by another process: the vault version
    // moves) has its open connections closed at once, which also frees their memory.
    // Never throws: a vault read that fails here (a busy database) is retried at the next poll,
    // and must not turn the reply to the change that was made into an error.
    const closeRevokedSessions = () => {
      if (tokenConnections.sessions() === 0) return;
      try {
        const tokens = session.tokens();
        const closed = tokens ? tokenConnections.closeUnusable((id) => tokens.usable(id)) : 0;
        if (closed > 0) log.info({ closed }, 'closed the connections of revoked or expired tokens');
      } catch (err) {
        log.warn({ err: (err as Error).name }, 'could not check open token sessions; retrying at the next poll');
      }
    };
    // Locked, no token can be checked: token sessions would be closed at their next request
    // anyway; closing them now frees their slots and memory.
    session.onChange((unlocked) => {
      if (!unlocked) tokenConnections.closeAll();
    });

    for (const address of options.listen ?? []) {
      const where = address.kind === 'unix' ? `unix:${address.path}` : `tcp:${address.host}:${address.port}`;
      const server = await listenToken(address, {
        log: log.child({ listener: address.kind === 'unix' ? address.path : `${address.host}:${address.port}` }),
        connections: tokenConnections,
        guard,
        idleTimeoutMs,
        maxPendingWrite: TOKEN_MAX_PENDING_WRITE,
        authenticate(token) {
          const tokens = session.tokens();
          if (!tokens) return 'locked';
          const record = tokens.lookup(token);
          if (!record) {
            const why = tokens.refusal(token);
            return why.reason === 'unknown' ? { refused: 'unknown token' } : { refused: `token ${why.reason}`, tokenId: why.tokenId };
          }
          return {
            scope: record.scope,
            tokenId: record.id,
            subject: record.subject,
            backend: backendFor(record.scope),
            stillValid: () => session.tokens()?.usable(record.id) ?? false,
          };
        },
        onHandshakeFailure(peer, reason, repeated, tokenId) {
          // A blocked source, or a client over a cap, can knock as fast as it likes: its knocks
          // are logged and recorded once a minute per source.
          if (repeated) {
            const source = peer.kind === 'tcp' ? tcpSource(peer.address) : `uid:${peer.uid}`;
            const last = quietKnocks.get(source) ?? 0;
            if (Date.now() - last < 60_000) return;
            if (quietKnocks.size >= 10_000) quietKnocks.clear();
            quietKnocks.set(source, Date.now());
            reason = `${reason} (repeated; further ones from this source are not recorded for a minute)`;
          }
          const token = tokenId === undefined ? {} : { token_id: tokenId };
          log.info({ peer, reason, ...token }, 'token handshake failed');
          void record({ event: 'handshake-failed', peer, reason, ...token });
        },
      }).catch((err: Error) => {
        throw new KeyholdError(`cannot listen on ${where}: ${err.message}`, 'pick another address or stop what holds it');
      });
      servers.push({ server, ...(address.kind === 'unix' ? { unlinkPath: address.path } : {}) });
      if (address.kind === 'tcp' && !isLoopback(address.host)) {
        log.warn({ host: address.host, port: address.port }, 'token listener on a non-loopback address: tokens cross the network in the clear');
      }
      log.info({ listen: address }, 'token listener ready');
    }

    // A scope that gets keys gets a socket; a socket, once open, stays while the daemon runs (its
    // scope may lose every key: the socket then answers no identities, as a locked one does), so a
    // shell's SSH_AUTH_SOCK never points at a path that vanished; see EmptiedScopes for the bound.
    // Those the config names are there from the start, locked or not.
    const configuredScopes = options.scopes ?? [];
    const emptied = new EmptiedScopes(MAX_EMPTY_SCOPE_SOCKETS);
    const LOCKED = -2;
    let syncedVersion = -1;
    // ssh-add -t: one timer for the earliest expiry, re-armed whenever the vault version moves
    // (whoever changed it). Requests already hide an expired key; the sweep takes it out of the
    // vault, audited, also when its time passed while the daemon was stopped or locked.
    let expiryVersion = -1;
    let expiryTimer: NodeJS.Timeout | null = null;
    const armExpiry = (minDelayMs = 0) => {
      const cache = session.keys(false);
      const version = cache ? cache.version : LOCKED;
      if (version === expiryVersion) return;
      expiryVersion = version;
      if (expiryTimer) clearTimeout(expiryTimer);
      expiryTimer = null;
      const next = cache?.nextExpiry() ?? null;
      if (next === null) return;
      const delay = Math.min(MAX_TIMER_MS, Math.max(minDelayMs, next - Date.now()));
      expiryTimer = setTimeout(() => {
        expiryTimer = null;
        void sweepExpired();
      }, delay);
      expiryTimer.unref();
    };
    const sweepExpired = async () => {
      let retryMs = 0;
      try {
        const removed = await changeVault(thisProcess(), (api) => api.expireAssignments(new Date()));
        if (removed.length > 0) log.info({ expired: removed }, 'ssh-add lifetime ended: keys unassigned, certificates removed');
      } catch (err) {
        // Locked meanwhile, a busy vault, an audit log that cannot be written: requests hide the
        // keys meanwhile; try again a little later.
        retryMs = EXPIRY_RETRY_MS;
        if (session.unlocked) log.warn({ err: (err as Error).message }, 'could not remove keys whose ssh-add lifetime ended; retrying');
      }
      // Nothing changed (a clock that fired early): re-arm, never in a busy loop.
      expiryVersion = -1;
      armExpiry(Math.max(retryMs, 10));
    };
    const syncScopes = async () => {
      armExpiry();
      closeRevokedSessions();
      if (!options.scopeSockets) return;
      const cache = session.keys(false);
      const version = cache ? cache.version : LOCKED;
      if (version === syncedVersion) return;
      syncedVersion = version;
      // Locked, the vault says nothing: the sockets stay as they are.
      if (!cache) return sockets.sync(new Set([...sockets.scopes(), ...configuredScopes]));
      const tooMany = (scope: string) => log.info({ scope, kept: MAX_EMPTY_SCOPE_SOCKETS }, 'closing the socket of the scope empty the longest: too many empty scopes');
      await sockets.sync(emptied.keep(new Set([...cache.scopeNames(), ...configuredScopes]), sockets.scopes(), tooMany));
    };
    session.onChange(() => {
      syncedVersion = -1;
    });
    await syncScopes();
    const controlPath = controlSocketPath(runtimeDir);
    let control: { server: Server; unlinkPath?: string } | null = null;
    let restoring = false;
    let restoreRefused = false;
    /**
     * The runtime dir removed under a running daemon (a tmp cleaner, a logout that took
     * $XDG_RUNTIME_DIR): the dir, daemon.pid, the control socket and the scope sockets are put
     * back, rather than leave a daemon nobody can reach and the way open to a second one.
     */
    const restoreRuntimeDir = async () => {
      if (restoring || restoreRefused || !control || existsSync(controlPath)) return;
      restoring = true;
      try {
        log.warn({ runtimeDir }, 'the runtime dir or the control socket is gone; putting them back');
        try {
          ensurePrivateDir(runtimeDir);
          ensurePrivateDir(scopesDir(runtimeDir));
        } catch (err) {
          // Someone else made it, open to others, say: not a place for our sockets. Said once.
          restoreRefused = true;
          log.error({ err: (err as Error).message }, 'cannot put the runtime dir back');
          return;
        }
        if (!lock.inPlace()) {
          let next: PidLock;
          try {
            next = acquirePidLock(pidFilePath(runtimeDir));
          } catch (err) {
            // Another daemon took the runtime dir meanwhile: it serves it now; this one stays as it is.
            restoreRefused = true;
            log.error({ err: (err as Error).message }, 'cannot take the runtime dir back');
            return;
          }
          lock.abandon();
          lock = next;
        }
        await closeServer(control.server);
        control.server = await listenControl(controlPath, { log, limit, handle });
        // Their files went with the dir: the same scopes get fresh sockets (locked ones too).
        const served = sockets.scopes();
        await sockets.close();
        await sockets.sync(served);
        syncedVersion = -1;
        log.info({ runtimeDir }, 'runtime dir restored');
      } finally {
        restoring = false;
      }
    };
    const timer = setInterval(() => {
      restoreRuntimeDir()
        .then(syncScopes)
        .catch((err: Error) => log.error({ err: err.message }, 'scope sync failed'));
    }, options.pollIntervalMs ?? 250);

    let requestStop: (actor: AuditPeer) => void = () => {};
    const stopRequested = new Promise<AuditPeer>((resolve) => (requestStop = resolve));
    const handle = async (request: ControlRequest, peer: Peer): Promise<unknown> => {
      const actor = peer as AuditPeer;
      switch (request.op) {
        case 'status':
          return session.status(sockets.paths());
        case 'lock':
          session.lock('keyhold lock', actor);
          return session.status(sockets.paths());
        case 'stop':
          // Unlike a SIGTERM (systemd's restart must come back unlocked), `keyhold stop` ends the remembered unlock.
          session.forgetRemembered();
          // Once this answer is written (the control server writes it when this returns), not before.
          setImmediate(() => requestStop(actor));
          return { pid: process.pid };
        case 'unlock': {
          checkVault(request.vaultId);
          const keks: FactorKeks = new Map(Object.entries(request.keks));
          try {
            await unlockSession(keks, { idleMs: request.idleMs ?? null, ttlMs: request.ttlMs ?? null, rememberMs: request.rememberMs ?? null }, actor);
          } finally {
            for (const kek of keks.values()) kek.fill(0);
          }
          return session.status(sockets.paths());
        }
        case 'approvals':
          return approvals.wait(request.after, request.waitMs ?? 0);
        case 'approve':
        case 'deny': {
          const by = controlApprover(peer);
          const found = request.op === 'approve' ? approvals.approve(request.id, by, request.rememberMs) : approvals.deny(request.id, by);
          if (!found) throw notFound('no request with that id waits for a confirmation', 'see `keyhold approvals`: it may have been answered, timed out or withdrawn');
          return { id: request.id, approved: request.op === 'approve' };
        }
        case 'call': {
          checkVault(request.vaultId);
          try {
            return await changeVault<unknown>(actor, (api) => callVaultMethod(api, { ...request, args: copyBuffers(request.args) }));
          } finally {
            zeroBuffers(request.args);
          }
        }
      }
    };
    /** Unlocks with these KEKs (the caller zeroes them), then serves the scopes the vault has. */
    const unlockSession = async (keks: FactorKeks, timers: UnlockTimers, actor: AuditPeer): Promise<void> => {
      try {
        await session.unlock(keks, timers, actor);
      } catch (err) {
        log.warn({ err: (err as Error).message }, 'unlock refused');
        throw err;
      }
      await session.auditWritten().catch(() => log.warn('unlock not yet in the audit log (it cannot be written now)'));
      await syncScopes();
    };
    /**
     * A change to the vault by `actor` (the control socket's peer, or ssh-add's on a scope socket):
     * answered once its audit line is written and the scope sockets follow it.
     */
    const changeVault = async <T>(actor: AuditPeer, change: (api: DaemonVaultApi) => Promise<T>): Promise<T> => {
      const failure = session.auditFailure;
      if (failure) {
        throw new KeyholdError(`the audit log cannot be written (${failure.code}) since ${failure.since}; nothing was done`, 'free space on its disk; keyhold resumes by itself');
      }
      const api = session.api(actor);
      try {
        // Another process may hold the vault's write lock: wait for it here, without blocking
        // the event loop (the database's own busy timeout is 0 in the daemon). Each operation
        // resolves only once its own audit line is in the log.
        const result = await retryWhileBusy(() => change(api));
        session.changed();
        await session.auditWritten();
        await syncScopes();
        return result;
      } catch (err) {
        throw err instanceof AuditUnavailableError ? notAudited(err) : err;
      }
    };
    const checkVault = (vaultId: string) => {
      if (vaultId !== options.vaultId) {
        throw new KeyholdError(`this daemon serves another vault (${options.paths.db})`, 'stop it, or use another KEYHOLD_RUNTIME_DIR');
      }
    };
    control = { server: await listenControl(controlPath, { log, limit, handle }), unlinkPath: controlPath };
    servers.push(control);

    log.info({ vault: options.paths.db, runtimeDir, locked: !session.unlocked, sockets: sockets.paths() }, 'keyhold daemon ready');
    let stopping: Promise<void> | null = null;
    return {
      session,
      socketPaths: () => sockets.paths(),
      stopRequested,
      stop(reason?: string, actor?: AuditPeer) {
        stopping ??= (async () => {
          clearInterval(timer);
          clearInterval(guardSweep);
          if (expiryTimer) clearTimeout(expiryTimer);
          approvals.refuseAll('withdrawn');
          confirmProgram?.close();
          guard.stop();
          await closeServers();
          await sockets.close();
          session.close(reason, actor);
          await pool?.close();
          lock.release();
          log.info('keyhold daemon stopped');
        })();
        return stopping;
      },
    };
  } catch (err) {
    await closeServers();
    session.close();
    lock.release();
    throw err;
  }
}

function notAudited(err: AuditUnavailableError): KeyholdError {
  return new KeyholdError(
    `its audit line could not be written (${err.code}): a change was made but is not confirmed, and nothing read is returned`,
    'free space on the disk of the audit log, then check with `keyhold audit tail`',
  );
}

/** Who answered through the control socket (its peer is always a local process). */
function controlApprover(peer: Peer): Approver {
  return peer.kind === 'unix' ? { channel: 'control', pid: peer.pid, uid: peer.uid } : { channel: 'control', pid: 0, uid: -1 };
}

/**
 * Sockets kept for scopes that lost their last key (the config's scopes are not counted): each is
 * a descriptor, out of the few the daemon keeps for itself (RESERVED_DESCRIPTORS).
 */
const MAX_EMPTY_SCOPE_SOCKETS = 64;

/** setTimeout's limit; a later expiry is re-armed when it fires. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** How soon a sweep of expired keys that failed is tried again. */
const EXPIRY_RETRY_MS = 5_000;

/** How long a change through the daemon waits for another process's write lock on the vault. */
const WRITE_LOCK_WAIT_MS = 10_000;

/** Runs a vault operation again while another process holds the database's write lock. */
async function retryWhileBusy<T>(attempt: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + WRITE_LOCK_WAIT_MS;
  for (let delay = 5; ; delay = Math.min(delay * 2, 250)) {
    try {
      return await attempt();
    } catch (err) {
      if (!isBusyError(err)) throw err;
      if (Date.now() + delay > deadline) {
        throw new KeyholdError('the vault is busy: another process has held its write lock for 10 s', 'try again once that process has finished');
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

/** Each attempt gets its own copies: vault operations zero the key material they are given. */
function copyBuffers(value: unknown): any {
  if (Buffer.isBuffer(value)) return Buffer.from(value);
  if (Array.isArray(value)) return value.map(copyBuffers);
  if (value !== null && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, copyBuffers(v)]));
  return value;
}

function zeroBuffers(value: unknown): void {
  if (Buffer.isBuffer(value)) value.fill(0);
  else if (Array.isArray(value)) value.forEach(zeroBuffers);
  else if (value !== null && typeof value === 'object') Object.values(value).forEach(zeroBuffers);
}

/** Descriptors kept back for the vault's files, the logs, the listeners and the signing threads. */
const RESERVED_DESCRIPTORS = 256;

/**
 * What the owner's control and scope sockets may hold: the descriptors the token listeners cannot
 * take (their own cap) and the daemon does not need for itself, up to 16,384.
 */
function ownerConnectionLimit(fileLimit: number | null, tokenSockets: number): number {
  if (fileLimit === null) return 16_384;
  return Math.max(64, Math.min(16_384, fileLimit - tokenSockets - RESERVED_DESCRIPTORS));
}

function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}
