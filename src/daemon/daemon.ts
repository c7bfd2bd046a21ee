// `keyhold serve`: holds the unlocked vault and serves one agent socket per scope.
import type { Logger } from 'pino';
import { hardenProcess } from '../libc.js';
import { acquirePidLock, ensurePrivateDir, pidFilePath, scopesDir, type PidLock } from '../runtime-dir.js';
import { ScopeSockets } from '../signer/scope-sockets.js';
import { ConnectionLimit } from '../signer/unix-listener.js';
import { KeyCache } from '../vault/key-cache.js';
import type { Vault } from '../vault/vault.js';
import { scopeBackend } from './scope-backend.js';

export interface DaemonOptions {
  vault: Vault;
  runtimeDir: string;
  log: Logger;
  scopeSockets: boolean;
  /** How often the vault is checked for new or removed scopes. */
  pollIntervalMs?: number;
  idleTimeoutMs?: number;
  maxConnections?: number;
  allowSha1?: boolean;
}

export interface Daemon {
  socketPaths(): string[];
  stop(): Promise<void>;
}

export async function startDaemon(options: DaemonOptions): Promise<Daemon> {
  const { vault, runtimeDir, log } = options;
  const hardening = hardenProcess();
  if (!hardening.dumpable || !hardening.coreLimit) log.warn(hardening, 'could not fully disable core dumps and ptrace');
  ensurePrivateDir(runtimeDir);
  const lock: PidLock = acquirePidLock(pidFilePath(runtimeDir));
  try {
    ensurePrivateDir(scopesDir(runtimeDir));
    const cache = new KeyCache(vault);
    cache.refresh();
    const sockets = new ScopeSockets({
      dir: scopesDir(runtimeDir),
      log,
      limit: new ConnectionLimit(options.maxConnections ?? 16384),
      idleTimeoutMs: options.idleTimeoutMs ?? 10 * 60_000,
      maxPendingWrite: 1024 * 1024,
      backendFor: (scope) => scopeBackend(cache, scope, { allowSha1: options.allowSha1 ?? false }),
    });
    let syncedVersion = -1;
    const syncScopes = async () => {
      if (!options.scopeSockets) return;
      cache.refresh();
      if (cache.version === syncedVersion) return;
      syncedVersion = cache.version;
      await sockets.sync(cache.scopeNames());
    };
    await syncScopes();
    const timer = setInterval(() => {
      syncScopes().catch((err: Error) => log.error({ err: err.message }, 'scope sync failed'));
    }, options.pollIntervalMs ?? 250);
    log.info({ vault: vault.paths.db, runtimeDir, sockets: sockets.paths() }, 'keyhold daemon ready');
    let stopping: Promise<void> | null = null;
    return {
      socketPaths: () => sockets.paths(),
      stop() {
        stopping ??= (async () => {
          clearInterval(timer);
          await sockets.close();
          cache.clear();
          vault.close();
          lock.release();
          log.info('keyhold daemon stopped');
        })();
        return stopping;
      },
    };
  } catch (err) {
    lock.release();
    throw err;
  }
}
