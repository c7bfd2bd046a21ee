// `keyhold serve`: holds the unlocked vault and serves one agent socket per scope.
import type { Logger } from 'pino';
import { KeyholdError } from '../errors.js';
import { hardenProcess } from '../libc.js';
import { acquirePidLock, ensurePrivateDir, pidFilePath, scopesDir, type PidLock } from '../runtime-dir.js';
import { isIP } from 'node:net';
import { unlinkSync } from 'node:fs';
import type { Server } from 'node:net';
import { HandshakeGuard } from '../signer/handshake-guard.js';
import { ScopeSockets } from '../signer/scope-sockets.js';
import { listenToken, type ListenAddress } from '../signer/token-listener.js';
import { closeServer, ConnectionLimit } from '../signer/unix-listener.js';
import type { AgentBackend } from '../signer/backend.js';
import { TokenCache } from '../tokens/token-cache.js';
import { KeyCache } from '../vault/key-cache.js';
import type { Vault } from '../vault/vault.js';
import { scopeBackend } from './scope-backend.js';

export interface DaemonOptions {
  vault: Vault;
  runtimeDir: string;
  log: Logger;
  scopeSockets: boolean;
  /** Token-gated listeners for containers. */
  listen?: ListenAddress[];
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
    const tokens = new TokenCache(vault);
    const backends = new Map<string, AgentBackend>();
    const backendFor = (scope: string) => {
      let backend = backends.get(scope);
      if (!backend) backends.set(scope, (backend = scopeBackend(cache, scope, { allowSha1: options.allowSha1 ?? false })));
      return backend;
    };
    const limit = new ConnectionLimit(options.maxConnections ?? 16384);
    const idleTimeoutMs = options.idleTimeoutMs ?? 10 * 60_000;
    const maxPendingWrite = 1024 * 1024;
    const sockets = new ScopeSockets({ dir: scopesDir(runtimeDir), log, limit, idleTimeoutMs, maxPendingWrite, backendFor });
    const guard = new HandshakeGuard();
    const guardSweep = setInterval(() => guard.sweep(), 60_000);
    guardSweep.unref();
    const tokenServers: { address: ListenAddress; server: Server }[] = [];
    const closeTokenServers = async () => {
      for (const { address, server } of tokenServers.splice(0)) {
        await closeServer(server);
        if (address.kind === 'unix') {
          try {
            unlinkSync(address.path);
          } catch {
            /* already gone */
          }
        }
      }
    };
    try {
      for (const address of options.listen ?? []) {
        const where = address.kind === 'unix' ? `unix:${address.path}` : `tcp:${address.host}:${address.port}`;
        const server = await listenToken(address, {
          log: log.child({ listener: address.kind === 'unix' ? address.path : `${address.host}:${address.port}` }),
          limit,
          guard,
          idleTimeoutMs,
          maxPendingWrite,
          authenticate(token) {
            const record = tokens.lookup(token);
            if (!record) return null;
            return {
              scope: record.scope,
              tokenId: record.id,
              backend: backendFor(record.scope),
              stillValid: () => tokens.usable(record.id),
            };
          },
          onHandshakeFailure(peer, reason) {
            log.info({ peer, reason }, 'token handshake failed');
          },
        }).catch((err: Error) => {
          throw new KeyholdError(`cannot listen on ${where}: ${err.message}`, 'pick another address or stop what holds it');
        });
        tokenServers.push({ address, server });
        if (address.kind === 'tcp' && !isLoopback(address.host)) {
          log.warn({ host: address.host, port: address.port }, 'token listener on a non-loopback address: tokens cross the network in the clear');
        }
        log.info({ listen: address }, 'token listener ready');
      }
    } catch (err) {
      await closeTokenServers();
      throw err;
    }
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
          clearInterval(guardSweep);
          await closeTokenServers();
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

function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}
