// The per-connection agent loop: frames in, one response per request out, in order.
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { frame, FrameError, FrameReader } from '../agent-protocol/framing.js';
import {
  encodeQueryContents,
  encodeResponse,
  EXT_QUERY,
  EXT_SESSION_BIND,
  parseRequest,
  parseSessionBind,
  type AgentResponse,
} from '../agent-protocol/messages.js';
import { fingerprint } from '../agent-protocol/public-key.js';
import { verifySsh } from '../agent-protocol/signature.js';
import type { AgentBackend, MemoryBudget, Peer, RequestContext, SessionBinding, SignResult } from './backend.js';

export const SUPPORTED_EXTENSIONS = [EXT_QUERY, EXT_SESSION_BIND] as const;

/** As OpenSSH's agent: a session id longer than this is not a real one. */
const MAX_SESSION_ID = 128;
/** How long a connection closed for a protocol error keeps draining what the client still sends. */
const LINGER_MS = 2_000;
/** Requests a client may have waiting for a signing thread before we stop reading its socket. */
const MAX_IN_FLIGHT = 64;
/** As OpenSSH's agent: bindings recorded per connection (one per hop of a forwarding chain). */
const MAX_BINDINGS = 16;

export interface ConnectionOptions {
  peer: Peer;
  log: Logger;
  /** Closed after this long without a byte from the client. */
  idleTimeoutMs: number;
  /** Reading pauses while more than this many response bytes wait for the client to read them. */
  maxPendingWrite: number;
  /** Called before each request; false closes the connection without an answer (e.g. a revoked token). */
  admit?: () => boolean;
  /** The token this connection authenticated with, for the backend's records. */
  tokenId?: string;
  /** Where bytes of partially received frames are accounted (token listeners); none: unlimited. */
  memory?: MemoryBudget;
}

const FAILURE = frame(encodeResponse({ type: 'failure' }));
const SUCCESS = frame(encodeResponse({ type: 'success' }));
const EXTENSION_FAILURE = frame(encodeResponse({ type: 'extension-failure' }));

export function serveConnection(socket: Socket, backend: AgentBackend, options: ConnectionOptions): void {
  const { log, peer } = options;
  const debug = log.isLevelEnabled('debug');
  const reader = new FrameReader();
  const bindings: SessionBinding[] = [];
  const context: RequestContext = { peer, bindings, ...(options.tokenId ? { tokenId: options.tokenId } : {}) };
  let closed = false;

  const close = (reason: string) => {
    if (closed) return;
    closed = true;
    if (debug) log.debug({ peer, reason }, 'closing agent connection');
    socket.destroy();
  };

  const signReply = (result: SignResult): Buffer => {
    if (!result.ok) {
      if (debug) log.debug({ peer, reason: result.reason, fingerprint: result.fingerprint }, 'sign refused');
      return FAILURE;
    }
    if (debug) log.debug({ peer, fingerprint: result.fingerprint, algorithm: result.algorithm }, 'signed');
    return frame(encodeResponse({ type: 'signature', signature: result.signature }));
  };

  const respond = (payload: Buffer): Buffer | Promise<Buffer> => {
    let request;
    try {
      request = parseRequest(payload);
    } catch {
      if (debug) log.debug({ peer, type: payload[0] }, 'malformed request');
      return FAILURE;
    }
    switch (request.type) {
      case 'request-identities':
        return frame(encodeResponse({ type: 'identities', identities: [...backend.identities(context)] }));
      case 'sign': {
        const result = backend.sign(request.keyBlob, request.data, request.flags, context);
        return result instanceof Promise ? result.then(signReply, () => FAILURE) : signReply(result);
      }
      case 'extension':
        return extension(request.name, request.contents);
      case 'unsupported':
        if (debug) log.debug({ peer, type: request.code }, 'unsupported request type');
        return FAILURE;
    }
  };

  const extension = (name: string, contents: Buffer): Buffer => {
    if (name === EXT_QUERY) {
      const response: AgentResponse = {
        type: 'extension-response',
        name: EXT_QUERY,
        contents: encodeQueryContents(SUPPORTED_EXTENSIONS),
      };
      return frame(encodeResponse(response));
    }
    if (name === EXT_SESSION_BIND) return sessionBind(contents) ? SUCCESS : EXTENSION_FAILURE;
    if (debug) log.debug({ peer, extension: name.slice(0, 64) }, 'unknown extension');
    return FAILURE;
  };

  /** Verifies the host's signature over the session id and records the binding (OpenSSH's rules). */
  const sessionBind = (contents: Buffer): boolean => {
    let bind;
    try {
      bind = parseSessionBind(contents);
    } catch {
      return false;
    }
    if (bind.sessionId.length === 0 || bind.sessionId.length > MAX_SESSION_ID) return false;
    // ssh signs the exchange hash with whatever host-key algorithm the key exchange negotiated.
    if (!verifySsh(bind.hostKey, bind.signature, bind.sessionId, true)) return false;
    // A connection bound for authentication must not be rebound (it is the last hop).
    if (bindings.some((b) => !b.isForwarding)) return false;
    const same = bindings.find((b) => b.sessionId.equals(bind.sessionId));
    if (same) return same.hostKey.equals(bind.hostKey);
    if (bindings.length >= MAX_BINDINGS) return false;
    // Copies: the parsed fields are views into a socket chunk.
    bindings.push({ hostKey: Buffer.from(bind.hostKey), sessionId: Buffer.from(bind.sessionId), isForwarding: bind.isForwarding });
    if (debug) {
      log.debug({ peer, hostKey: fingerprint(bind.hostKey), forwarding: bind.isForwarding }, 'session bound');
    }
    return true;
  };

  socket.setTimeout(options.idleTimeoutMs, () => close('idle timeout'));
  socket.on('error', (err) => {
    if (debug) log.debug({ peer, err: err.message }, 'agent connection error');
  });
  // Replies that are not ready yet (a signing thread) hold back the ones after them: answers go
  // out in request order. `inFlight` bounds how many a client may have waiting.
  let ordered: Promise<void> | null = null;
  let inFlight = 0;
  const send = (replies: Buffer[]) => {
    if (closed || replies.length === 0) return;
    socket.write(replies.length === 1 ? replies[0]! : Buffer.concat(replies));
    if (socket.writableLength > options.maxPendingWrite) {
      socket.pause();
      socket.once('drain', () => socket.resume());
    }
  };
  const queue = (replies: (Buffer | Promise<Buffer>)[], then?: () => void) => {
    if (!ordered && replies.every((r) => !(r instanceof Promise))) {
      send(replies as Buffer[]);
      then?.();
      return;
    }
    inFlight += replies.length;
    if (inFlight > MAX_IN_FLIGHT) socket.pause();
    const mine: Promise<void> = (ordered ?? Promise.resolve())
      .then(() => Promise.all(replies))
      .then(
        (ready) => send(ready),
        () => close('reply failed'),
      )
      .then(() => {
        inFlight -= replies.length;
        if (inFlight <= MAX_IN_FLIGHT / 2 && !closed && socket.isPaused() && socket.writableLength <= options.maxPendingWrite) socket.resume();
        if (ordered === mine) ordered = null;
        then?.();
      });
    ordered = mine;
  };

  socket.setTimeout(options.idleTimeoutMs, () => close('idle timeout'));
  socket.on('error', (err) => {
    if (debug) log.debug({ peer, err: err.message }, 'agent connection error');
  });
  socket.on('data', (chunk: Buffer) => {
    if (closed) return;
    const replies: (Buffer | Promise<Buffer>)[] = [];
    try {
      reader.push(chunk, (payload) => {
        if (closed) return;
        if (options.admit && !options.admit()) {
          close('no longer admitted');
          return;
        }
        try {
          replies.push(respond(payload));
        } catch (err) {
          log.error({ peer, err: (err as Error).message }, 'request failed');
          replies.push(FAILURE);
        }
      });
    } catch (err) {
      if (err instanceof FrameError) {
        log.info({ peer, reason: err.message }, 'protocol error; closing agent connection');
        // Answer what came before the bad frame, then close.
        queue(replies, () => {
          if (closed) return;
          closed = true;
          if (replies.length === 0) return void socket.destroy();
          // A lingering close: keep reading (and discarding) for a moment, so that a client still
          // writing does not get a reset that throws away the replies it has not read yet.
          socket.end();
          const linger = setTimeout(() => socket.destroy(), LINGER_MS);
          socket.once('close', () => clearTimeout(linger));
        });
        return;
      }
      throw err;
    }
    if (!closed) queue(replies);
  });
}
