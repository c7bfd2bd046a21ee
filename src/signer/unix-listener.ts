// Unix-socket listeners: a 0600 socket at a path we own, peers checked with SO_PEERCRED.
import { chmodSync, lstatSync, readFileSync, readlinkSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import { peerCredentials, type PeerCredentials } from '../libc.js';
import type { Peer } from './backend.js';

/**
 * A cap on open connections shared by the owner's listeners (control socket, scope sockets); the
 * token listeners have their own (TokenConnections), so containers cannot use this one up.
 */
export class ConnectionLimit {
  private open = 0;

  constructor(readonly max: number) {}

  tryAcquire(socket: Socket): boolean {
    if (this.open >= this.max) return false;
    this.open++;
    socket.once('close', () => this.open--);
    return true;
  }

  get count(): number {
    return this.open;
  }
}

/** The executable of a peer process, read when it connects (it may exec something else later). */
export function processExe(pid: number): string | null {
  try {
    return readlinkSync(`/proc/${pid}/exe`);
  } catch {
    return null;
  }
}

/**
 * When a process started (clock ticks since boot, field 22 of /proc/PID/stat), read when it
 * connects: with its pid it names that process and no later one that reuses the pid. Null if the
 * process is gone.
 */
export function processStartTime(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    // Field 2 (the command name) is in parentheses and may hold spaces or ')': count from the last one.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const start = fields[22 - 3];
    return start && /^[0-9]+$/.test(start) ? start : null;
  } catch {
    return null;
  }
}

/** Only the daemon's own uid, or root, may talk to a host socket. */
export function sameUserOrRoot(cred: PeerCredentials): boolean {
  return cred.uid === process.getuid!() || cred.uid === 0;
}

export class SocketPathError extends Error {
  override name = 'SocketPathError';
}

/**
 * Makes `path` free for a new socket: a socket left there by a dead daemon is removed (the caller
 * holds the runtime dir's pid lock, so no live daemon owns it); anything else is refused.
 */
export function clearStaleSocket(path: string): void {
  let stat;
  try {
    stat = lstatSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!stat.isSocket()) throw new SocketPathError(`${path} exists and is not a socket; refusing to replace it`);
  unlinkSync(path);
}

export interface UnixListenerOptions {
  path: string;
  log: Logger;
  limit: ConnectionLimit;
  allowPeer: (cred: PeerCredentials) => boolean;
  /** `processStart`: see processStartTime. */
  onConnection: (socket: Socket, peer: Peer & { kind: 'unix' }, processStart: string | null) => void;
}

export function listenUnix(options: UnixListenerOptions): Promise<Server> {
  const { path, log } = options;
  clearStaleSocket(path);
  const server = trackConnections(createServer((socket) => {
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    const cred = typeof fd === 'number' && fd >= 0 ? peerCredentials(fd) : null;
    if (!cred || !options.allowPeer(cred)) {
      log.warn({ path, peer: cred }, 'refused connection from another user');
      socket.destroy();
      return;
    }
    if (!options.limit.tryAcquire(socket)) {
      log.warn({ path, limit: options.limit.max }, 'connection limit reached; refusing connection');
      socket.destroy();
      return;
    }
    options.onConnection(socket, { kind: 'unix', ...cred, exe: processExe(cred.pid) }, processStartTime(cred.pid));
  }));
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      server.on('error', (err) => log.error({ path, err: err.message }, 'listener error'));
      chmodSync(path, 0o600);
      resolve(server);
    });
  });
}

const connections = new WeakMap<Server, Set<Socket>>();

/** Remembers a listener's open connections so that `closeServer` can end them. */
export function trackConnections(server: Server): Server {
  const open = new Set<Socket>();
  connections.set(server, open);
  server.on('connection', (socket: Socket) => {
    open.add(socket);
    socket.once('close', () => open.delete(socket));
  });
  return server;
}

/**
 * Stops listening and ends the listener's open connections: node's own close waits for every
 * client to hang up, which an idle agent client may never do.
 */
export function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    for (const socket of connections.get(server) ?? []) socket.destroy();
  });
}
