// What the wire server needs from whoever holds the keys, and nothing more (in the manner of Go's
// golang.org/x/crypto/ssh/agent.Agent): list identities, sign; and optionally OpenSSH's key
// operations (add, remove, lock, unlock), which a backend without them answers with FAILURE.
import type { AddIdentityRequest, Identity } from '../agent-protocol/messages.js';

export type Peer =
  /** `exe` is read from /proc at accept time (null if the process is already gone). */
  | { kind: 'unix'; pid: number; uid: number; gid: number; exe: string | null }
  | { kind: 'tcp'; address: string; port: number };

/** A host key the client bound this connection to with session-bind@openssh.com. */
export interface SessionBinding {
  hostKey: Buffer;
  sessionId: Buffer;
  isForwarding: boolean;
}

export interface RequestContext {
  peer: Peer;
  bindings: readonly SessionBinding[];
  /** A session-bind was attempted on this connection, whether or not it was accepted (OpenSSH's session_bind_attempted). */
  sessionBindAttempted?: boolean;
  /** The token a container connection authenticated with. */
  tokenId?: string;
  /** That token's subject (policy `subjects`). */
  tokenSubject?: string;
  /**
   * Unix peers: the process's start time (field 22 of /proc/PID/stat) read when it connected, so
   * that what is granted to a process is not inherited by a later one given the same pid.
   */
  processStart?: string | null;
  /** Aborted once the client is gone: a request still waiting for a confirmation is withdrawn. */
  hangup?: AbortSignal;
}

export type SignResult =
  | { ok: true; signature: Buffer; fingerprint: string; algorithm: string }
  | { ok: false; reason: SignRefusal; fingerprint?: string };

/**
 * Why a signature was refused. Policy: `policy` (a deny rule or default), `denied` (a confirm was
 * denied), `confirm-timeout`, `rate` (over a rule's rate), `too-many-pending` (confirms waiting),
 * `withdrawn` (its client hung up while it waited for a confirmation).
 */
export type SignRefusal =
  | 'locked'
  | 'unknown-key'
  | 'sha1-refused'
  | 'audit-unavailable'
  | 'error'
  | 'policy'
  | 'denied'
  | 'confirm-timeout'
  | 'rate'
  | 'too-many-pending'
  | 'withdrawn';

export interface AgentBackend {
  identities(context: RequestContext): readonly Identity[];
  /** May answer later (a signing thread); replies still go out in request order. */
  sign(keyBlob: Buffer, data: Buffer, flags: number, context: RequestContext): SignResult | Promise<SignResult>;

  // OpenSSH's key operations (ssh-add). Each is optional: a backend without it answers FAILURE.
  // Each answers true (SUCCESS) or false (FAILURE), at once or later; replies stay in request
  // order. A throw or a rejected Promise answers FAILURE. Arguments that are Buffers are views
  // the connection wipes or drops once the answer is settled: copy what you keep.

  /**
   * `ssh-add [-c] [-t N] [-h …] KEY` (messages 17 and 25). `request.key.key` is a private KeyObject
   * already checked against `request.key.publicBlob`; constraints are parsed (unknown ones never
   * get here: they are FAILURE, as OpenSSH).
   */
  addIdentity?(request: AddIdentityRequest, context: RequestContext): KeyOperationResult;
  /**
   * An add (17 or 25) the codec refused although it may be well formed: a key type this agent
   * does not hold (DSA, security keys) or a constraint it does not know. The answer is FAILURE
   * either way; this is for the backend's records. `reason` is our own text, no key bytes.
   */
  addRefused?(reason: string, context: RequestContext): void;
  /** `ssh-add -d KEY` (18): the public key blob, as sent (not validated beyond being a string). */
  removeIdentity?(keyBlob: Buffer, context: RequestContext): KeyOperationResult;
  /** `ssh-add -D` (19). */
  removeAllIdentities?(context: RequestContext): KeyOperationResult;
  /** `ssh-add -x` (22). Never called with an empty passphrase (FAILURE, as OpenSSH). */
  lock?(passphrase: Buffer, context: RequestContext): KeyOperationResult;
  /** `ssh-add -X` (23). Never called with an empty passphrase (FAILURE, as OpenSSH). */
  unlock?(passphrase: Buffer, context: RequestContext): KeyOperationResult;
}

/** true: SUCCESS; false: FAILURE. */
export type KeyOperationResult = boolean | Promise<boolean>;

/**
 * Memory a connection may hold for partially received frames, drawn from budgets shared with other
 * connections (per token, per source, overall). A connection reserves bytes as a partial frame
 * grows and releases them once the frame is complete or the connection closes; a refused
 * reservation closes the connection.
 */
export interface MemoryBudget {
  reserve(bytes: number): boolean;
  release(bytes: number): void;
}
