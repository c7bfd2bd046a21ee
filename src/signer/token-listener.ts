// The token-gated signer for containers, on TCP or a Unix socket. Before any agent frame the client
// sends `uint32 n` (1..1024) and n bytes of token within 5 s. A valid token gets no reply bytes:
// agent frames follow on the same stream, served with the token's scope. Anything else: the
// connection is closed with nothing written (so socat-based bridges interoperate).
import { chmodSync } from 'node:fs';
import { createServer, isIPv6, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import { peerCredentials } from '../libc.js';
import type { AgentBackend, Peer } from './backend.js';
import { serveConnection } from './connection.js';
import type { HandshakeGuard } from './handshake-guard.js';
import type { TokenConnections } from './token-limits.js';
import { clearStaleSocket, processExe, trackConnections } from './unix-listener.js';

export const HANDSHAKE_TIMEOUT_MS = 5_000;
export const MAX_TOKEN_BYTES = 1024;
/**
 * Reply bytes a token connection may leave unread before we stop reading its requests (the
 * owner's sockets allow more): with thousands of container connections this bounds what their
 * unread replies can hold.
 */
export const TOKEN_MAX_PENDING_WRITE = 64 * 1024;

export interface TokenSession {
  scope: string;
  tokenId: string;
  /** The token's subject label (policy `subjects`). */
  subject: string;
  backend: AgentBackend;
  /** Checked before every request: false once the token is revoked or expired. */
  stillValid(): boolean;
}

export interface TokenListenerOptions {
  log: Logger;
  /** Socket, session and memory caps of every token listener of the daemon (not the owner's). */
  connections: TokenConnections;
  guard: HandshakeGuard;
  idleTimeoutMs: number;
  maxPendingWrite: number;
  /**
   * Looks a presented token up; a refusal says why (unknown, revoked or expired, with the token's
   * id when the vault knows it); 'locked' when the vault is locked and no token can be checked
   * (closed, but not counted against the source).
   */
  authenticate(token: Buffer): TokenSession | TokenRefused | 'locked';
  /**
   * A handshake that did not become a session. `repeated`: its source is blocked, or a cap refused
   * it; such reports can come as fast as a client can connect, so the receiver should thin them.
   */
  onHandshakeFailure?(peer: Peer, reason: string, repeated: boolean, tokenId?: string): void;
}

/** A token the listener closes on: the reason goes to the daemon's log, never to the client. */
export interface TokenRefused {
  refused: string;
  tokenId?: string;
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

/**
 * What failures and limits are counted against for a TCP peer: its IPv4 address, or the /64 an
 * IPv6 address is in (one host commonly holds a whole /64, so counting per address would give it
 * 2^64 fresh starts). An IPv4-mapped IPv6 address counts as its IPv4 address.
 */
export function tcpSource(address: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return `tcp:${mapped[1]}`;
  if (isIPv6(address)) return `tcp:${ipv6Groups(address).slice(0, 4).join(':')}::/64`;
  return `tcp:${address}`;
}

/** The eight 16-bit groups of an IPv6 address, '::' expanded (an embedded IPv4 tail as two groups). */
function ipv6Groups(address: string): string[] {
  const plain = address.split('%')[0]!;
  const withoutV4 = plain.replace(/(\d+)\.(\d+)\.(\d+)\.(\d+)$/, (_m, a, b, c, d) =>
    `${((Number(a) << 8) | Number(b)).toString(16)}:${((Number(c) << 8) | Number(d)).toString(16)}`,
  );
  const [head, tail] = withoutV4.split('::');
  const left = head ? head.split(':') : [];
  const right = tail !== undefined && tail !== '' ? tail.split(':') : [];
  const middle = tail === undefined ? [] : Array<string>(8 - left.length - right.length).fill('0');
  return [...left, ...middle, ...right].map((g) => Number.parseInt(g, 16).toString(16));
}

function peerOf(socket: Socket, kind: 'tcp' | 'unix'): { peer: Peer; source: string } | null {
  if (kind === 'tcp') {
    const address = socket.remoteAddress;
    if (!address) return null;
    return { peer: { kind: 'tcp', address, port: socket.remotePort ?? 0 }, source: tcpSource(address) };
  }
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  const cred = typeof fd === 'number' && fd >= 0 ? peerCredentials(fd) : null;
  if (!cred) return null;
  return { peer: { kind: 'unix', ...cred, exe: processExe(cred.pid) }, source: `uid:${cred.uid}` };
}

/** True at most once a minute: for log lines a flood could repeat at every connection. */
class Throttle {
  private last = 0;
  due(now = Date.now()): boolean {
    if (now - this.last < 60_000) return false;
    this.last = now;
    return true;
  }
}
const socketLimitWarning = new Throttle();

function handleConnection(socket: Socket, kind: 'tcp' | 'unix', options: TokenListenerOptions): void {
  const { log, guard, connections } = options;
  socket.on('error', () => {});
  // Every socket slot taken: make room by evicting a pending handshake (or a delayed close);
  // when all slots are sessions, this socket is refused before its token is read.
  if (!connections.tryAccept(socket)) {
    if (!guard.makeRoom()) {
      if (socketLimitWarning.due()) log.warn({ limit: connections.limits.maxSockets }, 'token listener socket limit reached; refusing connections');
      return void socket.destroy();
    }
    connections.acceptInPlaceOfEvicted(socket);
  }
  const who = peerOf(socket, kind);
  if (!who) return void socket.destroy();
  const { peer, source } = who;

  let received: Buffer = Buffer.alloc(0);
  let done = false;
  /** Ends a handshake that did not become a session; a failure's close may be held a while. */
  const end = (outcome: 'failed' | 'neutral', reason: string, how: { repeated?: boolean; closeNow?: boolean; tokenId?: string } = {}) => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    socket.removeListener('data', onData);
    socket.pause();
    const wasBlocked = guard.isBlocked(source);
    const delay = guard.finish(pending, outcome);
    options.onHandshakeFailure?.(peer, reason, (how.repeated ?? false) || wasBlocked, how.tokenId);
    if (how.closeNow) socket.destroy();
    else guard.delayClose(delay, () => socket.destroy(), source);
  };
  const fail = (reason: string, tokenId?: string) => end('failed', reason, tokenId === undefined ? {} : { tokenId });
  // An evicted handshake frees its socket at once: that is what the eviction is for.
  const pending = guard.begin(source, () => end('failed', 'evicted while pending', { closeNow: true }));
  const timer = setTimeout(() => fail('handshake timeout'), guard.timeoutFor(source, HANDSHAKE_TIMEOUT_MS));
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
    if (session === 'locked') return end('neutral', 'vault locked', { closeNow: true });
    if ('refused' in session) return fail(session.refused, session.tokenId);
    const admission = connections.openSession(socket, session.tokenId, source);
    if (!admission.ok) return end('neutral', admission.reason, { repeated: true, closeNow: true });
    done = true;
    clearTimeout(timer);
    guard.finish(pending, 'ok');
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
      tokenSubject: session.subject,
      memory: admission.memory,
    });
    socket.resume();
  };
  socket.on('data', onData);
  socket.once('close', () => {
    end('failed', 'closed during handshake', { closeNow: true });
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
