// Agent-protocol messages (RFC 9987, OpenSSH PROTOCOL.agent): typed requests and responses, both
// directions, so the same codec serves the agent and a client talking to another agent.
import { cstring, readConstraints, writeConstraints, type KeyConstraints } from './key-constraints.js';
import { encodePrivateKey, readPrivateKey, type AgentPrivateKey } from './private-key.js';
import { WireFormatError, WireReader, WireWriter } from './wire.js';

export const MSG = {
  FAILURE: 5,
  SUCCESS: 6,
  REQUEST_IDENTITIES: 11,
  IDENTITIES_ANSWER: 12,
  SIGN_REQUEST: 13,
  SIGN_RESPONSE: 14,
  ADD_IDENTITY: 17,
  REMOVE_IDENTITY: 18,
  REMOVE_ALL_IDENTITIES: 19,
  LOCK: 22,
  UNLOCK: 23,
  ADD_ID_CONSTRAINED: 25,
  EXTENSION: 27,
  EXTENSION_FAILURE: 28,
  EXTENSION_RESPONSE: 29,
} as const;

export const EXT_QUERY = 'query';
export const EXT_SESSION_BIND = 'session-bind@openssh.com';

export type AgentRequest =
  | { type: 'request-identities' }
  | { type: 'sign'; keyBlob: Buffer; data: Buffer; flags: number }
  | { type: 'extension'; name: string; contents: Buffer }
  | AddIdentityRequest
  | { type: 'remove-identity'; keyBlob: Buffer }
  | { type: 'remove-all-identities' }
  /** The passphrase is a view into the request: copy it to keep it, wipe what you copy. */
  | { type: 'lock'; passphrase: Buffer }
  | { type: 'unlock'; passphrase: Buffer }
  /** A well-formed frame of a message type this codec does not model. */
  | { type: 'unsupported'; code: number };

/**
 * SSH_AGENTC_ADD_IDENTITY (17) or ADD_ID_CONSTRAINED (25). As OpenSSH's agent, both may carry
 * constraints; `constrained` only says which message it was. The private key is a checked
 * KeyObject whose public half is `key.publicBlob`.
 */
export interface AddIdentityRequest {
  type: 'add-identity';
  constrained: boolean;
  key: AgentPrivateKey;
  comment: string;
  constraints: KeyConstraints;
}

/** Message types whose bodies hold secrets (a private key, a passphrase): wiped once handled. */
export const SECRET_REQUEST_TYPES: ReadonlySet<number> = new Set([MSG.ADD_IDENTITY, MSG.ADD_ID_CONSTRAINED, MSG.LOCK, MSG.UNLOCK]);

export interface Identity {
  keyBlob: Buffer;
  comment: string;
}

export type AgentResponse =
  | { type: 'failure' }
  | { type: 'success' }
  | { type: 'identities'; identities: Identity[] }
  | { type: 'signature'; signature: Buffer }
  | { type: 'extension-failure' }
  | { type: 'extension-response'; name: string; contents: Buffer };

/** Parses one request payload (type byte + body). Throws WireFormatError when malformed. */
export function parseRequest(payload: Buffer): AgentRequest {
  const r = new WireReader(payload);
  const code = r.byte();
  switch (code) {
    case MSG.REQUEST_IDENTITIES:
      r.end();
      return { type: 'request-identities' };
    case MSG.SIGN_REQUEST: {
      const keyBlob = r.string();
      const data = r.string();
      const flags = r.uint32();
      r.end();
      return { type: 'sign', keyBlob, data, flags };
    }
    case MSG.EXTENSION: {
      const name = r.utf8();
      return { type: 'extension', name, contents: r.rest() };
    }
    case MSG.ADD_IDENTITY:
    case MSG.ADD_ID_CONSTRAINED: {
      const key = readPrivateKey(r);
      const comment = cstring(r);
      const constraints = readConstraints(r);
      return { type: 'add-identity', constrained: code === MSG.ADD_ID_CONSTRAINED, key, comment, constraints };
    }
    case MSG.REMOVE_IDENTITY: {
      const keyBlob = r.string();
      r.end();
      return { type: 'remove-identity', keyBlob };
    }
    case MSG.REMOVE_ALL_IDENTITIES:
      r.end();
      return { type: 'remove-all-identities' };
    case MSG.LOCK:
    case MSG.UNLOCK: {
      const passphrase = r.string();
      r.end();
      // As OpenSSH reads it (a C string): a NUL inside is malformed.
      if (passphrase.includes(0)) throw new WireFormatError('passphrase holds a NUL byte');
      return { type: code === MSG.LOCK ? 'lock' : 'unlock', passphrase };
    }
    default:
      return { type: 'unsupported', code };
  }
}

export function encodeRequest(request: AgentRequest): Buffer {
  const w = new WireWriter();
  switch (request.type) {
    case 'request-identities':
      return w.byte(MSG.REQUEST_IDENTITIES).toBuffer();
    case 'sign':
      return w.byte(MSG.SIGN_REQUEST).string(request.keyBlob).string(request.data).uint32(request.flags).toBuffer();
    case 'extension':
      return w.byte(MSG.EXTENSION).string(request.name).raw(request.contents).toBuffer();
    case 'add-identity': {
      w.byte(request.constrained ? MSG.ADD_ID_CONSTRAINED : MSG.ADD_IDENTITY).raw(encodePrivateKey(request.key.key, request.key.certificate?.blob)).string(request.comment);
      return writeConstraints(w, request.constraints).toBuffer();
    }
    case 'remove-identity':
      return w.byte(MSG.REMOVE_IDENTITY).string(request.keyBlob).toBuffer();
    case 'remove-all-identities':
      return w.byte(MSG.REMOVE_ALL_IDENTITIES).toBuffer();
    case 'lock':
    case 'unlock':
      return w.byte(request.type === 'lock' ? MSG.LOCK : MSG.UNLOCK).string(request.passphrase).toBuffer();
    case 'unsupported':
      return w.byte(request.code).toBuffer();
  }
}


export function encodeResponse(response: AgentResponse): Buffer {
  const w = new WireWriter();
  switch (response.type) {
    case 'failure':
      return FAILURE_PAYLOAD;
    case 'success':
      return SUCCESS_PAYLOAD;
    case 'extension-failure':
      return EXTENSION_FAILURE_PAYLOAD;
    case 'identities':
      w.byte(MSG.IDENTITIES_ANSWER).uint32(response.identities.length);
      for (const id of response.identities) w.string(id.keyBlob).string(id.comment);
      return w.toBuffer();
    case 'signature':
      return w.byte(MSG.SIGN_RESPONSE).string(response.signature).toBuffer();
    case 'extension-response':
      return w.byte(MSG.EXTENSION_RESPONSE).string(response.name).raw(response.contents).toBuffer();
  }
}

const FAILURE_PAYLOAD = Buffer.of(MSG.FAILURE);
const SUCCESS_PAYLOAD = Buffer.of(MSG.SUCCESS);
const EXTENSION_FAILURE_PAYLOAD = Buffer.of(MSG.EXTENSION_FAILURE);

/** Parses one response payload (type byte + body). Throws WireFormatError when malformed. */
export function parseResponse(payload: Buffer): AgentResponse {
  const r = new WireReader(payload);
  const code = r.byte();
  switch (code) {
    case MSG.FAILURE:
      r.end();
      return { type: 'failure' };
    case MSG.SUCCESS:
      r.end();
      return { type: 'success' };
    case MSG.EXTENSION_FAILURE:
      r.end();
      return { type: 'extension-failure' };
    case MSG.IDENTITIES_ANSWER: {
      const count = r.uint32();
      // Each identity needs at least 8 bytes; a larger count is a lie that would make us loop.
      if (count > r.remaining / 8) throw new WireFormatError('identity count exceeds message');
      const identities: Identity[] = [];
      for (let i = 0; i < count; i++) identities.push({ keyBlob: r.string(), comment: r.utf8() });
      r.end();
      return { type: 'identities', identities };
    }
    case MSG.SIGN_RESPONSE: {
      const signature = r.string();
      r.end();
      return { type: 'signature', signature };
    }
    case MSG.EXTENSION_RESPONSE: {
      const name = r.utf8();
      return { type: 'extension-response', name, contents: r.rest() };
    }
    default:
      throw new WireFormatError(`unexpected response type ${code}`);
  }
}

/**
 * Body of a `query` extension response (after the echoed name "query"): one string per supported
 * extension up to the end of the message, as RFC 9987 and OpenSSH >= 10.3 encode it.
 */
export function encodeQueryContents(names: readonly string[]): Buffer {
  const w = new WireWriter();
  for (const name of names) w.string(name);
  return w.toBuffer();
}

export function parseQueryContents(contents: Buffer): string[] {
  const r = new WireReader(contents);
  const names: string[] = [];
  while (r.remaining > 0) names.push(r.utf8());
  return names;
}

export interface SessionBind {
  hostKey: Buffer;
  sessionId: Buffer;
  signature: Buffer;
  isForwarding: boolean;
}

export function parseSessionBind(contents: Buffer): SessionBind {
  const r = new WireReader(contents);
  const bind = { hostKey: r.string(), sessionId: r.string(), signature: r.string(), isForwarding: r.boolean() };
  r.end();
  return bind;
}

export function encodeSessionBind(bind: SessionBind): Buffer {
  return new WireWriter()
    .string(bind.hostKey)
    .string(bind.sessionId)
    .string(bind.signature)
    .boolean(bind.isForwarding)
    .toBuffer();
}
