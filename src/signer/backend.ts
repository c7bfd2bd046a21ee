// What the wire server needs from whoever holds the keys, and nothing more (in the manner of Go's
// golang.org/x/crypto/ssh/agent.Agent): list identities, sign.
import type { Identity } from '../agent-protocol/messages.js';

export type Peer =
  | { kind: 'unix'; pid: number; uid: number; gid: number }
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
}

export type SignResult =
  | { ok: true; signature: Buffer; fingerprint: string; algorithm: string }
  | { ok: false; reason: 'locked' | 'unknown-key' | 'sha1-refused' | 'error'; fingerprint?: string };

export interface AgentBackend {
  identities(context: RequestContext): readonly Identity[];
  sign(keyBlob: Buffer, data: Buffer, flags: number, context: RequestContext): SignResult;
}
