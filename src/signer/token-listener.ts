// The token-gated signer for containers, on TCP or a Unix socket. Before any agent frame the client
// sends `uint32 n` (1..1024) and n bytes of token within 5 s. A valid token gets no reply bytes:
// agent frames follow on the same stream, served with the token's scope. Anything else: the
// connection is closed with nothing written (so socat-based bridges interoperate).
import { chmodSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import { peerCredentials } from '../libc.js';
import type { AgentBackend, Peer } from './backend.js';
import { serveConnection } from './connection.js';
import type { HandshakeGuard } from './handshake-guard.js';
import { clearStaleSocket, processExe, trackConnections, type ConnectionLimit } from './unix-listener.js';

export const HANDSHAKE_TIMEOUT_MS = 5_000;
export const MAX_TOKEN_BYTES = 1024;

export interface TokenSession {
  scope: string;
  tokenId: string;
  backend: AgentBackend;
  /** Checked before every request: false once the token is revoked or expired. */
  stillValid(): boolean;
}

export interface TokenListenerOptions {
  log: Logger;
  limit: ConnectionLimit;
  guard: HandshakeGuard;
  idleTimeoutMs: number;
  maxPendingWrite: number;
  /**
   * Looks a presented token up; null when it is unknown, revoked or expired; 'locked' when the
   * vault is locked and no token can be checked (closed, but not counted against the source).
   */
  authenticate(token: Buffer): TokenSession | null | 'locked';
  onHandshakeFailure?(peer: Peer, reason: string): void;
}

export type ListenAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export function parseListenAddress(text: string): ListenAddress | null {
  if (text.startsWith('unix:') && text.length > 5) return { kind: 'unix', path: text.slice(5) };
  const tcp = /^tcp:(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):([0-9]{1,5})$/.exec(text);
  if (tcp) {
    const port = Number(tcp[3]);
    if (port <= 65535) return { kind: 'tcp', host: (tcp[1] ?? tcp[2])!, port };
  }
  return null;
}

function peerOf(socket: Socket, kind: 'tcp' | 'unix'): { peer: Peer; source: string } | null {
  if (kind === 'tcp') {
    const address = socket.remoteAddress;
    if (!address) return null;
    return { peer: { kind: 'tcp', address, port: socket.remotePort ?? 0 }, source: `tcp:${address}` };
  }
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  const cred = typeof fd === 'number' && fd >= 0 ? peerCredentials(fd) : null;
  if (!cred) return null;
  return { peer: { kind: 'unix', ...cred, exe: processExe(cred.pid) }, source: `uid:${cred.uid}` };
}

function handleConnection(socket: Socket, kind: 'tcp' | 'unix', options: TokenListenerOptions): void {
  const { log, guard } = options;
  socket.on('error', () => {});
  const who = peerOf(socket, kind);
  if (!who) return void socket.destroy();
  const { peer, source } = who;
  const verdict = guard.begin(source);
  if (verdict !== 'ok') {
    options.onHandshakeFailure?.(peer, verdict === 'blocked' ? 'source blocked after repeated failures' : 'too many pending handshakes');
    return void socket.destroy();
  }
  if (!options.limit.tryAcquire(socket)) {
    guard.finish(source, true);
    log.warn({ limit: options.limit.max }, 'connection limit reached; refusing connection');
    return void socket.destroy();
  }

  let received: Buffer = Buffer.alloc(0);
  let done = false;
  const fail = (reason: string) => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    socket.removeListener('data', onData);
    socket.pause();
    options.onHandshakeFailure?.(peer, reason);
    guard.delayClose(guard.finish(source, false), () => socket.destroy());
  };
  const timer = setTimeout(() => fail('handshake timeout'), HANDSHAKE_TIMEOUT_MS);
  const onData = (chunk: Buffer) => {
    received = received.length === 0 ? chunk : Buffer.concat([received, chunk]);
    if (received.length < 4) return;
    const length = received.readUInt32BE(0);
    if (length < 1 || length > MAX_TOKEN_BYTES) return fail('bad token length');
    if (received.length < 4 + length) return;
    const token = received.subarray(4, 4 + length);
    const rest = received.subarray(4 + length);
    const session = options.authenticate(token);
    received = Buffer.alloc(0);
    if (session === 'locked') {
      done = true;
      clearTimeout(timer);
      guard.finish(source, true);
      options.onHandshakeFailure?.(peer, 'vault locked');
      return void socket.destroy();
    }
    if (!session) return fail('invalid token');
    done = true;
    clearTimeout(timer);
    guard.finish(source, true);
    socket.removeListener('data', onData);
    socket.pause();
    if (rest.length > 0) socket.unshift(rest);
    const sessionLog = log.child({ scope: session.scope, token: session.tokenId });
    if (sessionLog.isLevelEnabled('debug')) sessionLog.debug({ peer }, 'token session');
    serveConnection(socket, session.backend, {
      peer,
      log: sessionLog,
      idleTimeoutMs: options.idleTimeoutMs,
      maxPendingWrite: options.maxPendingWrite,
      admit: session.stillValid,
      tokenId: session.tokenId,
    });
    socket.resume();
  };
  socket.on('data', onData);
  socket.once('close', () => {
    if (!done) {
      done = true;
      clearTimeout(timer);
      guard.finish(source, false);
      options.onHandshakeFailure?.(peer, 'closed during handshake');
    }
  });
}

/** Starts a token listener; a Unix socket is made connectable by any uid (the token is the gate). */
export function listenToken(address: ListenAddress, options: TokenListenerOptions): Promise<Server> {
  const server = trackConnections(createServer((socket) => handleConnection(socket, address.kind, options)));
  if (address.kind === 'unix') clearStaleSocket(address.path);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    const ready = () => {
      server.off('error', reject);
      server.on('error', (err) => options.log.error({ err: err.message }, 'token listener error'));
      if (address.kind === 'unix') chmodSync(address.path, 0o666);
      resolve(server);
    };
    if (address.kind === 'unix') server.listen(address.path, ready);
    else server.listen({ host: address.host, port: address.port }, ready);
  });
}
