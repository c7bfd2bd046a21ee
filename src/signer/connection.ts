// The agent's side of one connection, in the manner of OpenSSH's ssh-agent.c: one handler per
// message (the process* functions below), and a per-connection loop (AgentConnection) that frames
// requests, sends one reply per request in request order, applies backpressure and closes.
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { frame, FrameError, FrameReader } from '../agent-protocol/framing.js';
import {
  encodeQueryContents,
  encodeResponse,
  EXT_QUERY,
  EXT_SESSION_BIND,
  MSG,
  parseRequest,
  parseSessionBind,
  SECRET_REQUEST_TYPES,
  type AddIdentityRequest,
} from '../agent-protocol/messages.js';
import { fingerprint } from '../agent-protocol/public-key.js';
import { verifySsh } from '../agent-protocol/signature.js';
import { isCertificateBlob, verifiedCertificateOf, type Certificate } from '../agent-protocol/certificate.js';
import { UnsupportedAddError } from '../agent-protocol/private-key.js';
import { WireFormatError } from '../agent-protocol/wire.js';
import type { AgentBackend, KeyOperationResult, MemoryBudget, Peer, RequestContext, SessionBinding, SignResult } from './backend.js';

/**
 * What `query` lists: the extensions beyond `query` itself (its answer says that one is there),
 * as OpenSSH's agent (10.3 and later) answers, byte for byte.
 */
export const QUERY_LISTS = [EXT_SESSION_BIND] as const;

/** As OpenSSH's agent: a session id longer than this is not a real one. */
const MAX_SESSION_ID = 128;
/** How long a connection closed for a protocol error keeps draining what the client still sends. */
const LINGER_MS = 2_000;
/** Requests a client may have waiting for a signature before we stop reading its socket. */
const MAX_IN_FLIGHT = 64;
/** As OpenSSH's agent: bindings recorded per connection (one per hop of a forwarding chain). */
const MAX_BINDINGS = 16;
/**
 * Replies one read may produce beyond what the client has not read yet, as a multiple of
 * `maxPendingWrite`: one read of small requests (5-byte identities requests, say) can ask for
 * far more reply bytes than it holds, so pausing the socket afterwards is not enough. A client
 * past this is not reading its replies, and is closed.
 */
const UNREAD_REPLY_FACTOR = 4;
/** What a reply that is still a promise (a signature) counts for in that limit. */
const SIGNATURE_REPLY_ESTIMATE = 1024;

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
  /** That token's subject. */
  tokenSubject?: string;
  /** Unix peers: the process's start time (see processStartTime). */
  processStart?: string | null;
  /** Where bytes of partially received frames are accounted (token listeners); none: unlimited. */
  memory?: MemoryBudget;
}

const FAILURE = frame(encodeResponse({ type: 'failure' }));
const SUCCESS = frame(encodeResponse({ type: 'success' }));
const EXTENSION_FAILURE = frame(encodeResponse({ type: 'extension-failure' }));
const QUERY_RESPONSE = frame(
  encodeResponse({ type: 'extension-response', name: EXT_QUERY, contents: encodeQueryContents(QUERY_LISTS) }),
);

// ---------------------------------------------------------------------------------------------
// One handler per message
// ---------------------------------------------------------------------------------------------

/** What the handlers know of their connection (OpenSSH's SocketEntry). */
interface AgentSession {
  readonly backend: AgentBackend;
  readonly context: RequestContext;
  /** The context's bindings, writable here only. */
  readonly bindings: SessionBinding[];
  readonly peer: Peer;
  readonly log: Logger;
  readonly debug: boolean;
}

/** A key operation (add, remove, lock, unlock) the backend answers later. */
class KeyOperationReply {
  constructor(
    readonly outcome: Promise<boolean>,
    readonly operation: string,
    readonly fingerprint?: string,
  ) {}
}

/** A reply still being made: a signature (a signing thread, its audit line), or a key operation. */
type PendingReply = Promise<SignResult> | KeyOperationReply;

/** A framed reply, or one still being made. */
type Reply = Buffer | PendingReply;

const isPending = (reply: Reply): reply is PendingReply => !Buffer.isBuffer(reply);

/** The backend method each key operation needs; without it the message is answered as unknown. */
const KEY_OPERATIONS: Record<number, keyof AgentBackend> = {
  [MSG.ADD_IDENTITY]: 'addIdentity',
  [MSG.ADD_ID_CONSTRAINED]: 'addIdentity',
  [MSG.REMOVE_IDENTITY]: 'removeIdentity',
  [MSG.REMOVE_ALL_IDENTITIES]: 'removeAllIdentities',
  [MSG.LOCK]: 'lock',
  [MSG.UNLOCK]: 'unlock',
};

function processMessage(session: AgentSession, payload: Buffer): Reply {
  const code = payload[0]!;
  try {
    return dispatch(session, payload, code);
  } finally {
    // A private key or a passphrase: wipe the frame once handled (the backend got a KeyObject and
    // copies). Out of reach: the kernel's socket buffer and, for a frame split across reads, the
    // socket chunks and superseded buffers FrameReader assembled it from.
    if (SECRET_REQUEST_TYPES.has(code)) payload.fill(0);
  }
}

function dispatch(session: AgentSession, payload: Buffer, code: number): Reply {
  // Without the backend method, no parsing (an add builds a key): the answer of an unknown type.
  const needs = KEY_OPERATIONS[code];
  if (needs && !session.backend[needs]) return processUnsupported(session, code);
  let request;
  try {
    request = parseRequest(payload);
  } catch (err) {
    if (session.debug) {
      // Our own messages, which never quote key bytes or passphrases.
      const reason = err instanceof WireFormatError ? err.message : undefined;
      session.log.debug({ peer: session.peer, type: code, reason }, 'malformed request');
    }
    if (err instanceof UnsupportedAddError && (code === MSG.ADD_IDENTITY || code === MSG.ADD_ID_CONSTRAINED)) {
      try {
        session.backend.addRefused?.(err.message, session.context);
      } catch {
        // Only the backend's records: the answer is FAILURE whatever they do.
      }
    }
    return FAILURE;
  }
  switch (request.type) {
    case 'request-identities':
      return processRequestIdentities(session);
    case 'sign':
      return processSignRequest(session, request.keyBlob, request.data, request.flags);
    case 'extension':
      return processExtension(session, request.name, request.contents);
    case 'add-identity':
      return processAddIdentity(session, request);
    case 'remove-identity':
      return processRemoveIdentity(session, request.keyBlob);
    case 'remove-all-identities':
      return processRemoveAllIdentities(session);
    case 'lock':
      return processLock(session, request.passphrase, true);
    case 'unlock':
      return processLock(session, request.passphrase, false);
    case 'unsupported':
      return processUnsupported(session, request.code);
  }
}

function processRequestIdentities(session: AgentSession): Buffer {
  return frame(encodeResponse({ type: 'identities', identities: [...session.backend.identities(session.context)] }));
}

function processSignRequest(session: AgentSession, keyBlob: Buffer, data: Buffer, flags: number): Reply {
  const result = session.backend.sign(keyBlob, data, flags, session.context);
  return result instanceof Promise ? result : signReply(session, result);
}

function signReply(session: AgentSession, result: SignResult): Buffer {
  if (!result.ok) {
    if (session.debug) session.log.debug({ peer: session.peer, reason: result.reason, fingerprint: result.fingerprint }, 'sign refused');
    return FAILURE;
  }
  if (session.debug) session.log.debug({ peer: session.peer, fingerprint: result.fingerprint, algorithm: result.algorithm }, 'signed');
  return frame(encodeResponse({ type: 'signature', signature: result.signature }));
}

function processExtension(session: AgentSession, name: string, contents: Buffer): Buffer {
  if (name === EXT_QUERY) return processQuery();
  if (name === EXT_SESSION_BIND) return processSessionBind(session, contents) ? SUCCESS : EXTENSION_FAILURE;
  if (session.debug) session.log.debug({ peer: session.peer, extension: name.slice(0, 64) }, 'unknown extension');
  return FAILURE;
}

function processQuery(): Buffer {
  return QUERY_RESPONSE;
}

/** Verifies the host's signature over the session id and records the binding (OpenSSH's rules). */
function processSessionBind(session: AgentSession, contents: Buffer): boolean {
  const { bindings } = session;
  // Set before anything is checked, as OpenSSH: a connection whose bind failed is not "local".
  session.context.sessionBindAttempted = true;
  let bind;
  try {
    bind = parseSessionBind(contents);
  } catch {
    return false;
  }
  if (bind.sessionId.length === 0 || bind.sessionId.length > MAX_SESSION_ID) return false;
  // ssh signs the exchange hash with whatever host-key algorithm the key exchange negotiated. A
  // host that presented a certificate signs with the certified key; the certificate must verify
  // under its CA (as OpenSSH's sshkey_froms), and is recorded as given, for destination matching.
  let signer = bind.hostKey;
  let certificate: Certificate | null = null;
  if (isCertificateBlob(bind.hostKey)) {
    certificate = verifiedCertificateOf(bind.hostKey);
    if (!certificate) return false;
    signer = certificate.publicBlob;
  }
  if (!verifySsh(signer, bind.signature, bind.sessionId, true)) return false;
  // A connection bound for authentication must not be rebound (it is the last hop).
  if (bindings.some((b) => !b.isForwarding)) return false;
  const same = bindings.find((b) => b.sessionId.equals(bind.sessionId));
  if (same) return same.hostKey.equals(bind.hostKey);
  if (bindings.length >= MAX_BINDINGS) return false;
  // Copies: the parsed fields are views into a socket chunk.
  bindings.push({ hostKey: Buffer.from(bind.hostKey), sessionId: Buffer.from(bind.sessionId), isForwarding: bind.isForwarding });
  if (session.debug) {
    const cert = certificate ? { hostCertificate: { keyId: certificate.keyId, serial: certificate.serial.toString(), ca: fingerprint(certificate.signatureKey) } } : {};
    session.log.debug({ peer: session.peer, hostKey: fingerprint(signer), ...cert, forwarding: bind.isForwarding }, 'session bound');
  }
  return true;
}

function processAddIdentity(session: AgentSession, request: AddIdentityRequest): Reply {
  const { fingerprint: keyFingerprint } = request.key;
  return keyOperation(session, 'add-identity', keyFingerprint, () => session.backend.addIdentity!(request, session.context));
}

function processRemoveIdentity(session: AgentSession, keyBlob: Buffer): Reply {
  return keyOperation(session, 'remove-identity', fingerprint(keyBlob), () => session.backend.removeIdentity!(keyBlob, session.context));
}

function processRemoveAllIdentities(session: AgentSession): Reply {
  return keyOperation(session, 'remove-all-identities', undefined, () => session.backend.removeAllIdentities!(session.context));
}

/** As OpenSSH's process_lock_agent: an empty passphrase is refused before anything else. */
function processLock(session: AgentSession, passphrase: Buffer, lock: boolean): Reply {
  const operation = lock ? 'lock' : 'unlock';
  if (passphrase.length === 0) {
    if (session.debug) session.log.debug({ peer: session.peer, operation }, 'empty passphrase refused');
    return FAILURE;
  }
  // The backend's copy, valid until its answer settles, then wiped (the frame is wiped at once).
  const copy = Buffer.from(passphrase);
  const wipe = () => void copy.fill(0);
  const reply = keyOperation(session, operation, undefined, () =>
    lock ? session.backend.lock!(copy, session.context) : session.backend.unlock!(copy, session.context),
  );
  if (reply instanceof KeyOperationReply) return new KeyOperationReply(reply.outcome.finally(wipe), operation);
  wipe();
  return reply;
}

/** Calls the backend; a throw is FAILURE (logged by kind only: a message may quote a secret). */
function keyOperation(session: AgentSession, operation: string, keyFingerprint: string | undefined, call: () => KeyOperationResult): Reply {
  let result: KeyOperationResult;
  try {
    result = call();
  } catch (err) {
    session.log.error({ peer: session.peer, operation, fingerprint: keyFingerprint, err: (err as Error | undefined)?.name }, 'key operation failed');
    return FAILURE;
  }
  if (result instanceof Promise) return new KeyOperationReply(result, operation, keyFingerprint);
  return keyOperationAnswer(session, operation, keyFingerprint, result === true);
}

function keyOperationAnswer(session: AgentSession, operation: string, keyFingerprint: string | undefined, ok: boolean): Buffer {
  if (session.debug) session.log.debug({ peer: session.peer, operation, fingerprint: keyFingerprint, ok }, 'key operation');
  return ok ? SUCCESS : FAILURE;
}

function processUnsupported(session: AgentSession, code: number): Buffer {
  if (session.debug) session.log.debug({ peer: session.peer, type: code }, 'unsupported request type');
  return FAILURE;
}

// ---------------------------------------------------------------------------------------------
// The per-connection loop
// ---------------------------------------------------------------------------------------------

/** The replies of one chunk that wait for a signature, and everything behind them waits too. */
interface Batch {
  readonly count: number;
  ready: Buffer[] | null;
}

/**
 * - open: reading requests.
 * - draining: no more requests (the client half-closed, or sent a bad frame); the replies owed
 *   go out, then our side ends.
 * - closed: the socket is destroyed, or ending with nothing more to send.
 */
type State = 'open' | 'draining' | 'closed';

export function serveConnection(socket: Socket, backend: AgentBackend, options: ConnectionOptions): void {
  new AgentConnection(socket, backend, options);
}

class AgentConnection {
  private readonly session: AgentSession;
  private readonly reader = new FrameReader();
  private state: State = 'open';
  /** Set when a protocol error made us drain: end with a lingering close. */
  private lingering = false;
  /** Whether any reply was ever written (a close that owes nothing need not linger). */
  private answered = false;
  /** Chunks whose replies wait for a signature, in request order. */
  private readonly batches: Batch[] = [];
  /** Replies waiting in `batches`. */
  private inFlight = 0;
  private readPaused = false;
  /** Bytes reserved from `options.memory` for the partial frame. */
  private reserved = 0;
  /** Reply bytes the client has not read, counting those the current read is producing. */
  private unread = 0;
  private readonly hangup: AbortController;

  constructor(
    private readonly socket: Socket,
    backend: AgentBackend,
    private readonly options: ConnectionOptions,
  ) {
    const { peer, log } = options;
    const bindings: SessionBinding[] = [];
    // An agent client waits for its reply with its side open; once it stops sending (it exited,
    // or half-closed) or the socket closes, a request still waiting for a confirmation is
    // withdrawn rather than put to a human on behalf of nobody.
    const hangup = new AbortController();
    const context: RequestContext = {
      peer,
      bindings,
      ...(options.tokenId ? { tokenId: options.tokenId } : {}),
      ...(options.tokenSubject !== undefined ? { tokenSubject: options.tokenSubject } : {}),
      ...(options.processStart !== undefined ? { processStart: options.processStart } : {}),
      hangup: hangup.signal,
    };
    this.hangup = hangup;
    this.session = { backend, context, bindings, peer, log, debug: log.isLevelEnabled('debug') };

    // A client's FIN ends only its direction: the replies it is owed still go out (drain, then end).
    socket.allowHalfOpen = true;
    // Idle means the client sends nothing and is owed nothing: a request waiting for a
    // confirmation (bounded by its own timeout) keeps an open connection, and the reply restarts
    // the clock. A client that half-closed is only waiting, and gets no such grace.
    socket.setTimeout(options.idleTimeoutMs, () => {
      if (this.inFlight === 0 || this.state !== 'open') this.destroy('idle timeout');
    });
    socket.on('error', (err) => {
      if (this.session.debug) log.debug({ peer, err: err.message }, 'agent connection error');
    });
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => {
      this.hangup.abort();
      this.onEnd();
    });
    socket.on('drain', () => {
      this.accountMemory();
      this.updateFlow();
    });
    socket.once('close', () => {
      this.hangup.abort();
      this.state = 'closed';
      this.releaseMemory();
    });
  }

  private onData(chunk: Buffer): void {
    if (this.state !== 'open') return; // draining after a protocol error: discard
    const replies: Reply[] = [];
    this.unread = this.socket.writableLength;
    try {
      this.reader.push(chunk, (payload) => this.onRequest(payload, replies));
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
      this.options.log.info({ peer: this.session.peer, reason: err.message }, 'protocol error; closing agent connection');
      // Answer what came before the bad frame, then close.
      this.queue(replies);
      this.drain(true);
      return;
    }
    if (this.state !== 'open' || !this.accountMemory()) return;
    this.queue(replies);
  }

  private onRequest(payload: Buffer, replies: Reply[]): void {
    if (this.state !== 'open') return;
    if (this.options.admit && !this.options.admit()) return this.destroy('no longer admitted');
    let reply: Reply;
    try {
      reply = processMessage(this.session, payload);
    } catch (err) {
      this.options.log.error({ peer: this.session.peer, err: (err as Error).message }, 'request failed');
      reply = FAILURE;
    }
    replies.push(reply);
    this.unread += isPending(reply) ? SIGNATURE_REPLY_ESTIMATE : reply.length;
    if (this.unread > UNREAD_REPLY_FACTOR * this.options.maxPendingWrite) {
      this.options.log.info({ peer: this.session.peer, unread: this.unread }, 'client does not read its replies; closing agent connection');
      this.destroy('replies not read');
    }
  }

  /** The client half-closed: it sends nothing more and waits for its replies. */
  private onEnd(): void {
    if (this.state !== 'open') return;
    if (this.session.debug) {
      this.options.log.debug({ peer: this.session.peer, pending: this.inFlight, partial: this.reader.buffered }, 'client half-closed');
    }
    this.drain(false);
  }

  /**
   * Follows what this connection holds in the memory budget: a partial frame, and replies the
   * client has not read yet; false if refused (and closed).
   */
  private accountMemory(): boolean {
    const budget = this.options.memory;
    if (!budget || this.socket.destroyed) return true;
    const held = this.reader.held + this.socket.writableLength;
    if (held > this.reserved) {
      if (!budget.reserve(held - this.reserved)) {
        if (this.session.debug) {
          this.options.log.debug({ peer: this.session.peer, partial: held, reserved: this.reserved }, 'memory budget refused (partial frame or unread replies)');
        }
        this.destroy('memory budget exhausted');
        return false;
      }
      this.reserved = held;
    } else if (held < this.reserved) {
      budget.release(this.reserved - held);
      this.reserved = held;
    }
    return true;
  }

  private releaseMemory(): void {
    if (this.reserved === 0) return;
    this.options.memory?.release(this.reserved);
    this.reserved = 0;
  }

  /**
   * Sends ready replies at once unless earlier ones still wait; the rest wait as one batch (a
   * single Promise.allSettled per chunk, not a promise per reply) and go out in request order.
   */
  private queue(replies: Reply[]): void {
    let waiting = replies;
    if (this.batches.length === 0) {
      let ready = 0;
      while (ready < replies.length && !isPending(replies[ready]!)) ready++;
      if (ready > 0) this.write(ready === replies.length ? (replies as Buffer[]) : (replies.slice(0, ready) as Buffer[]));
      if (ready === replies.length) return;
      waiting = replies.slice(ready);
    }
    const batch: Batch = { count: waiting.length, ready: null };
    this.batches.push(batch);
    this.inFlight += batch.count;
    const pending = waiting.filter(isPending);
    if (pending.length === 0) {
      batch.ready = waiting as Buffer[];
    } else {
      void Promise.allSettled(pending.map((p) => (p instanceof KeyOperationReply ? p.outcome : p))).then((settled) => {
        try {
          let next = 0;
          batch.ready = waiting.map((reply) => {
            if (!isPending(reply)) return reply;
            const outcome = settled[next++]!;
            if (reply instanceof KeyOperationReply) return this.keyOperationSettled(reply, outcome as PromiseSettledResult<boolean>);
            if (outcome.status === 'fulfilled') return signReply(this.session, outcome.value as SignResult);
            // Only the kind: a backend's message may quote what it was asked to sign.
            this.options.log.error({ peer: this.session.peer, err: (outcome.reason as Error | undefined)?.name }, 'sign failed');
            return FAILURE;
          });
        } catch (err) {
          this.options.log.error({ peer: this.session.peer, err: (err as Error).message }, 'reply failed');
          return this.destroy('reply failed');
        }
        this.flush();
      });
    }
    this.updateFlow();
  }

  private keyOperationSettled(reply: KeyOperationReply, outcome: PromiseSettledResult<boolean>): Buffer {
    if (outcome.status === 'fulfilled') return keyOperationAnswer(this.session, reply.operation, reply.fingerprint, outcome.value === true);
    // Only the kind: a backend's message may quote a passphrase or a key.
    this.options.log.error(
      { peer: this.session.peer, operation: reply.operation, fingerprint: reply.fingerprint, err: (outcome.reason as Error | undefined)?.name },
      'key operation failed',
    );
    return FAILURE;
  }

  /** Writes the batches at the head of the queue that are ready, then ends if the client is done. */
  private flush(): void {
    const out: Buffer[] = [];
    let done = 0;
    while (this.batches.length > 0 && this.batches[0]!.ready) {
      const batch = this.batches.shift()!;
      for (const reply of batch.ready!) out.push(reply);
      done += batch.count;
    }
    this.inFlight -= done;
    this.write(out);
    this.updateFlow();
    this.endIfDrained();
  }

  private write(replies: Buffer[]): void {
    if (replies.length === 0 || this.socket.destroyed || this.socket.writableEnded) return;
    this.answered = true;
    this.socket.write(replies.length === 1 ? replies[0]! : Buffer.concat(replies));
    if (!this.accountMemory()) return;
    this.updateFlow();
  }

  /** Reads only while the client keeps up: few replies waiting for a signature, few bytes unread. */
  private updateFlow(): void {
    if (this.socket.destroyed) return;
    const pause =
      this.state === 'open' && (this.inFlight > MAX_IN_FLIGHT || this.socket.writableLength > this.options.maxPendingWrite);
    if (pause && !this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    } else if (!pause && this.readPaused) {
      this.readPaused = false;
      this.socket.resume();
    }
  }

  /** Reads no more requests; ends once the replies owed are out. */
  private drain(lingering: boolean): void {
    this.state = 'draining';
    this.lingering = lingering;
    this.releaseMemory();
    this.updateFlow(); // a lingering close keeps reading (and discarding)
    this.endIfDrained();
  }

  private endIfDrained(): void {
    if (this.state !== 'draining' || this.batches.length > 0) return;
    this.state = 'closed';
    if (this.session.debug) this.options.log.debug({ peer: this.session.peer, lingering: this.lingering }, 'ending agent connection');
    if (!this.lingering) return void this.socket.end();
    if (!this.answered) return void this.socket.destroy();
    // A lingering close: keep reading (and discarding) for a moment, so that a client still
    // writing does not get a reset that throws away the replies it has not read yet.
    this.socket.end();
    const linger = setTimeout(() => this.socket.destroy(), LINGER_MS);
    this.socket.once('close', () => clearTimeout(linger));
  }

  private destroy(reason: string): void {
    if (this.session.debug && !this.socket.destroyed) this.options.log.debug({ peer: this.session.peer, reason }, 'closing agent connection');
    this.state = 'closed';
    this.releaseMemory();
    this.socket.destroy();
  }
}
