// One agent socket per scope under `<runtime>/scopes/<scope>.sock`, kept in step with the vault.
import { unlinkSync } from 'node:fs';
import type { Server } from 'node:net';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { AgentBackend } from './backend.js';
import { serveConnection } from './connection.js';
import { closeServer, listenUnix, sameUserOrRoot, type ConnectionLimit } from './unix-listener.js';

export interface ScopeSocketOptions {
  dir: string;
  log: Logger;
  limit: ConnectionLimit;
  idleTimeoutMs: number;
  maxPendingWrite: number;
  backendFor: (scope: string) => AgentBackend;
}

export function scopeSocketPath(dir: string, scope: string): string {
  return join(dir, `${scope}.sock`);
}

/**
 * Which scopes keep a socket: those that have keys (or that the config names), and those whose
 * socket is open though their scope has no keys any more, so that a path a shell was given does
 * not vanish while the daemon runs. Of the latter at most `maxEmpty` stay, the one empty the
 * longest going first: a scope per CI job, over weeks, must not use up the daemon's descriptors.
 */
export class EmptiedScopes {
  /** Scopes kept without keys, in the order they emptied. */
  private readonly emptied = new Set<string>();

  constructor(private readonly maxEmpty: number) {}

  /** The scopes to serve, given those that want a socket now and those served now; `dropped` hears of the ones let go. */
  keep(wanted: ReadonlySet<string>, served: Iterable<string>, dropped: (scope: string) => void = () => {}): Set<string> {
    for (const scope of this.emptied) if (wanted.has(scope)) this.emptied.delete(scope);
    for (const scope of served) if (!wanted.has(scope)) this.emptied.add(scope);
    for (const scope of this.emptied) {
      if (this.emptied.size <= this.maxEmpty) break;
      this.emptied.delete(scope);
      dropped(scope);
    }
    return new Set([...wanted, ...this.emptied]);
  }
}

export class ScopeSockets {
  private readonly servers = new Map<string, Server>();
  /** Scopes whose path could not be used; retried only when the set of scopes changes again. */
  private readonly refused = new Set<string>();
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly options: ScopeSocketOptions) {}

  /** Opens sockets for new scopes and removes those of scopes that are gone. Calls run in order. */
  sync(scopes: Iterable<string>): Promise<void> {
    const wanted = new Set(scopes);
    this.queue = this.queue.then(() => this.apply(wanted));
    return this.queue;
  }

  /** The scopes served now. */
  scopes(): string[] {
    return [...this.servers.keys()];
  }

  paths(): string[] {
    return [...this.servers.keys()].map((scope) => scopeSocketPath(this.options.dir, scope));
  }

  close(): Promise<void> {
    return this.sync([]);
  }

  private async apply(wanted: Set<string>): Promise<void> {
    const { dir, log } = this.options;
    for (const [scope, server] of this.servers) {
      if (wanted.has(scope)) continue;
      this.servers.delete(scope);
      await closeServer(server);
      try {
        unlinkSync(scopeSocketPath(dir, scope));
      } catch {
        /* already gone */
      }
      log.info({ scope }, 'scope socket removed');
    }
    for (const scope of this.refused) if (!wanted.has(scope)) this.refused.delete(scope);
    for (const scope of wanted) {
      if (this.servers.has(scope) || this.refused.has(scope)) continue;
      const path = scopeSocketPath(dir, scope);
      const backend = this.options.backendFor(scope);
      const scopeLog = log.child({ scope });
      try {
        const server = await listenUnix({
          path,
          log,
          limit: this.options.limit,
          allowPeer: sameUserOrRoot,
          onConnection: (socket, peer, processStart) => {
            if (scopeLog.isLevelEnabled('debug')) scopeLog.debug({ peer }, 'agent connection');
            serveConnection(socket, backend, {
              peer,
              log: scopeLog,
              idleTimeoutMs: this.options.idleTimeoutMs,
              maxPendingWrite: this.options.maxPendingWrite,
              processStart,
            });
          },
        });
        this.servers.set(scope, server);
        log.info({ scope, path }, 'scope socket ready');
      } catch (err) {
        this.refused.add(scope);
        log.error({ scope, path, err: (err as Error).message }, 'cannot open scope socket');
      }
    }
  }
}
