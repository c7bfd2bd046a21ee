// Golden vectors: frames captured from real OpenSSH 9.2 clients and ssh-agent must parse, carry the
// expected content, verify, and re-encode byte for byte.
import { describe, expect, it } from 'vitest';
import { FrameReader, frame } from '../../src/agent-protocol/framing.js';
import {
  EXT_QUERY,
  EXT_SESSION_BIND,
  encodeRequest,
  encodeResponse,
  encodeSessionBind,
  parseRequest,
  parseResponse,
  parseSessionBind,
  type AgentRequest,
  type AgentResponse,
} from '../../src/agent-protocol/messages.js';
import { blobKeyType, fingerprint, publicKeyFromBlob, describeKey } from '../../src/agent-protocol/public-key.js';
import { parseSignatureBlob, signatureAlgorithmFor, verifySsh } from '../../src/agent-protocol/signature.js';
import type { SshKeyType } from '../../src/agent-protocol/public-key.js';
import { WireReader } from '../../src/agent-protocol/wire.js';
import { exchanges, fixture, frameBytes, label, parseLine, payloadOf, type CapturedFrame } from './golden-fixture.js';

const KEY_TYPES = ['ssh-ed25519', 'ssh-rsa', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521'];
const RSA_256_CLIENT = 'ssh -o PubkeyAcceptedAlgorithms=rsa-sha2-256';
const RSA_SHA1_CLIENT = 'ssh -o PubkeyAcceptedAlgorithms=ssh-rsa';
const FORWARD_CLIENT = 'ssh -A (remote ssh-add -l)';

const frames = fixture.frames;
const indexed = frames.map((f, i) => ({ f, i, name: label(f, i) }));
const requests = indexed.filter(({ f }) => f.direction === 'request');
const responses = indexed.filter(({ f }) => f.direction === 'response');
const pairs = exchanges();
const signPairs = pairs.filter((p) => p.request.msgType === 13);
const bindFrames = indexed.filter(({ f }) => f.msgType === 27 && f.client !== 'manual-query');
const publicKeys = new Map(Object.entries(fixture.publicKeys).map(([type, line]) => [type, parseLine(line)]));
const hostKey = parseLine(fixture.sshdHostKey);

function request(f: CapturedFrame): AgentRequest {
  return parseRequest(payloadOf(f));
}

function response(f: CapturedFrame): AgentResponse {
  return parseResponse(payloadOf(f));
}

function narrow<T extends { type: string }, K extends T['type']>(value: T, type: K): Extract<T, { type: K }> {
  expect(value.type).toBe(type);
  return value as Extract<T, { type: K }>;
}

/** Flags each captured client is known to send (OpenSSH 9.2 defaults and the forced runs). */
function expectedFlags(client: string, keyType: string | null): number {
  if (keyType !== 'ssh-rsa') return 0;
  if (client === RSA_256_CLIENT) return 2;
  if (client === RSA_SHA1_CLIENT) return 0;
  return 4;
}

function expectedAlgorithm(keyType: string, flags: number): string {
  if (keyType !== 'ssh-rsa') return keyType;
  return ({ 0: 'ssh-rsa', 2: 'rsa-sha2-256', 4: 'rsa-sha2-512' } as Record<number, string>)[flags]!;
}

function flipByte(buf: Buffer, index: number): Buffer {
  const copy = Buffer.from(buf);
  copy[index] = copy[index]! ^ 0x01;
  return copy;
}

/** The session-bind sent on the same connection as `f`, decoded. */
function bindFor(f: CapturedFrame) {
  const bind = frames.find(
    (g) => g.msgType === 27 && g.client === f.client && g.keyType === f.keyType && g.conn === f.conn,
  );
  if (!bind) return undefined;
  return parseSessionBind(narrow(request(bind), 'extension').contents);
}

describe('agent-frames.json fixture', () => {
  it('holds the expected mix of captured traffic', () => {
    expect(fixture.opensshVersion).toMatch(/^OpenSSH_9\.2/);
    expect(Object.keys(fixture.publicKeys).sort()).toEqual([...KEY_TYPES].sort());
    const counts = new Map<string, number>();
    for (const f of frames) counts.set(`${f.direction}:${f.msgType}`, (counts.get(`${f.direction}:${f.msgType}`) ?? 0) + 1);
    expect(counts.get('request:11')).toBe(16);
    expect(counts.get('response:12')).toBe(16);
    expect(counts.get('request:13')).toBe(13);
    expect(counts.get('response:14')).toBe(13);
    expect(counts.get('request:27')).toBe(10);
    expect(counts.get('response:6')).toBe(9);
    expect(counts.get('response:5')).toBe(1);
    expect(pairs).toHaveLength(frames.length / 2);
  });

  it.each(indexed.map(({ f, name }) => [name, f] as const))('%s: header length and msgType match', (_name, f) => {
    const bytes = frameBytes(f);
    expect(bytes.readUInt32BE(0)).toBe(bytes.length - 4);
    expect(bytes[4]).toBe(f.msgType);
  });
});

describe('every captured frame parses and re-encodes byte-identically', () => {
  it.each(requests.map(({ f, name }) => [name, f] as const))('%s', (_name, f) => {
    const parsed = request(f);
    expect(parsed.type).not.toBe('unsupported');
    expect(frame(encodeRequest(parsed))).toEqual(frameBytes(f));
  });

  it.each(responses.map(({ f, name }) => [name, f] as const))('%s', (_name, f) => {
    const parsed = response(f);
    expect(frame(encodeResponse(parsed))).toEqual(frameBytes(f));
  });

  it('the whole capture, per direction, comes out of one FrameReader in order', () => {
    for (const direction of ['request', 'response'] as const) {
      const list = frames.filter((f) => f.direction === direction);
      const reader = new FrameReader();
      const got: Buffer[] = [];
      reader.push(Buffer.concat(list.map(frameBytes)), (p) => got.push(Buffer.from(p)));
      expect(got).toEqual(list.map(payloadOf));
      expect(reader.buffered).toBe(0);
    }
  });

  it('the whole capture also comes out right when fed one byte at a time', () => {
    const all = Buffer.concat(frames.map(frameBytes));
    const reader = new FrameReader();
    const got: Buffer[] = [];
    for (let i = 0; i < all.length; i++) reader.push(all.subarray(i, i + 1), (p) => got.push(Buffer.from(p)));
    expect(got).toEqual(frames.map(payloadOf));
  });
});

describe('identities answers', () => {
  const answers = responses.filter(({ f }) => f.msgType === 12);

  it.each(answers.map(({ f, name }) => [name, f] as const))('%s lists exactly the recorded publicKeys', (_name, f) => {
    const { identities } = narrow(response(f), 'identities');
    expect(identities).toHaveLength(KEY_TYPES.length);
    const seen = identities.map((id) => {
      const type = blobKeyType(id.keyBlob);
      const recorded = publicKeys.get(type);
      expect(recorded, `unexpected key type ${type}`).toBeDefined();
      expect(id.keyBlob).toEqual(recorded!.blob);
      expect(id.comment).toBe(recorded!.comment);
      return type;
    });
    expect(seen.sort()).toEqual([...KEY_TYPES].sort());
  });

  it('every recorded public key blob parses into a KeyObject and back to the same blob', () => {
    for (const [type, { blob }] of publicKeys) {
      const info = describeKey(publicKeyFromBlob(blob));
      expect(info.type).toBe(type);
      expect(info.blob).toEqual(blob);
    }
    expect(publicKeys.get('ssh-rsa') && describeKey(publicKeyFromBlob(publicKeys.get('ssh-rsa')!.blob)).bits).toBe(3072);
    expect(fingerprint(hostKey.blob)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
  });
});

describe('sign requests', () => {
  it('cover every key type and every client run', () => {
    expect(new Set(signPairs.map((p) => p.request.keyType))).toEqual(new Set(KEY_TYPES));
    expect(new Set(signPairs.map((p) => p.request.client))).toEqual(
      new Set(['ssh-keygen -Y sign -n git', 'ssh', RSA_256_CLIENT, RSA_SHA1_CLIENT, FORWARD_CLIENT]),
    );
  });

  it.each(signPairs.map((p) => [label(p.request, p.index), p.request] as const))(
    '%s: key blob and flags are what the client sent',
    (_name, f) => {
      const sign = narrow(request(f), 'sign');
      expect(sign.keyBlob).toEqual(publicKeys.get(f.keyType!)!.blob);
      expect(sign.flags).toBe(expectedFlags(f.client, f.keyType));
      expect(sign.data.length).toBeGreaterThan(0);
    },
  );

  it('ssh-keygen -Y sign asks to sign an SSHSIG blob for namespace "git"', () => {
    const fromKeygen = signPairs.filter((p) => p.request.client.startsWith('ssh-keygen'));
    expect(fromKeygen).toHaveLength(5);
    for (const { request: f } of fromKeygen) {
      const { data } = narrow(request(f), 'sign');
      expect(data.subarray(0, 6).toString('latin1')).toBe('SSHSIG');
      const r = new WireReader(data.subarray(6));
      expect(r.utf8()).toBe('git');
      expect(r.string()).toHaveLength(0); // reserved
      expect(r.utf8()).toBe('sha512');
      expect(r.string()).toHaveLength(64);
      r.end();
    }
  });

  it('ssh asks to sign a userauth request bound to the session id of its session-bind', () => {
    const fromSsh = signPairs.filter((p) => !p.request.client.startsWith('ssh-keygen'));
    expect(fromSsh).toHaveLength(8);
    for (const { request: f } of fromSsh) {
      const sign = narrow(request(f), 'sign');
      const bind = bindFor(f);
      expect(bind, label(f, 0)).toBeDefined();
      const r = new WireReader(sign.data);
      expect(r.string()).toEqual(bind!.sessionId);
      expect(r.byte()).toBe(50); // SSH_MSG_USERAUTH_REQUEST
      r.utf8(); // user
      expect(r.utf8()).toBe('ssh-connection');
      // OpenSSH >= 8.9 uses the host-bound variant, which appends the server's host key.
      expect(r.utf8()).toBe('publickey-hostbound-v00@openssh.com');
      expect(r.boolean()).toBe(true);
      expect(r.utf8()).toBe(expectedAlgorithm(f.keyType!, sign.flags));
      expect(r.string()).toEqual(sign.keyBlob);
      expect(r.string()).toEqual(bind!.hostKey);
      r.end();
    }
  });
});

describe('sign responses', () => {
  it.each(signPairs.map((p) => [label(p.response, p.index), p] as const))(
    '%s verifies over the matching request with the matching key',
    (_name, { request: req, response: res }) => {
      const sign = narrow(request(req), 'sign');
      const { signature } = narrow(response(res), 'signature');
      const algorithm = parseSignatureBlob(signature).algorithm;
      expect(algorithm).toBe(expectedAlgorithm(req.keyType!, sign.flags));
      // The codec's flag interpretation agrees with what the real ssh-agent did.
      expect(signatureAlgorithmFor(req.keyType as SshKeyType, sign.flags)).toBe(algorithm);

      const sha1 = algorithm === 'ssh-rsa';
      expect(verifySsh(sign.keyBlob, signature, sign.data, sha1)).toBe(true);
      expect(verifySsh(sign.keyBlob, signature, flipByte(sign.data, sign.data.length - 1), sha1)).toBe(false);
      expect(verifySsh(sign.keyBlob, signature, flipByte(sign.data, 0), sha1)).toBe(false);
      expect(verifySsh(sign.keyBlob, flipByte(signature, signature.length - 1), sign.data, sha1)).toBe(false);
      // Against another key of the fixture it must fail.
      const other = publicKeys.get(req.keyType === 'ssh-ed25519' ? 'ecdsa-sha2-nistp256' : 'ssh-ed25519')!.blob;
      expect(verifySsh(other, signature, sign.data, sha1)).toBe(false);
    },
  );

  it('the SHA-1 ssh-rsa signature from the forced run is refused unless allowSha1', () => {
    const pair = signPairs.find((p) => p.request.client === RSA_SHA1_CLIENT)!;
    const sign = narrow(request(pair.request), 'sign');
    const { signature } = narrow(response(pair.response), 'signature');
    expect(parseSignatureBlob(signature).algorithm).toBe('ssh-rsa');
    expect(verifySsh(sign.keyBlob, signature, sign.data)).toBe(false);
    expect(verifySsh(sign.keyBlob, signature, sign.data, true)).toBe(true);
  });
});

describe('session-bind@openssh.com', () => {
  it.each(bindFrames.map(({ f, name }) => [name, f] as const))(
    '%s parses and its host signature verifies over the session id',
    (_name, f) => {
      const ext = narrow(request(f), 'extension');
      expect(ext.name).toBe(EXT_SESSION_BIND);
      const bind = parseSessionBind(ext.contents);
      expect(bind.hostKey).toEqual(hostKey.blob);
      expect(bind.sessionId.length).toBeGreaterThanOrEqual(32);
      expect(bind.isForwarding).toBe(f.client === FORWARD_CLIENT && f.conn === 3);
      expect(encodeSessionBind(bind)).toEqual(ext.contents);

      expect(verifySsh(bind.hostKey, bind.signature, bind.sessionId, true)).toBe(true);
      for (const at of [0, bind.sessionId.length >> 1, bind.sessionId.length - 1]) {
        expect(verifySsh(bind.hostKey, bind.signature, flipByte(bind.sessionId, at), true)).toBe(false);
      }
    },
  );

  it('is answered with SSH_AGENT_SUCCESS by ssh-agent', () => {
    const answers = pairs.filter((p) => p.request.msgType === 27 && p.request.client !== 'manual-query');
    expect(answers.length).toBe(bindFrames.length);
    for (const p of answers) expect(response(p.response)).toEqual({ type: 'success' });
  });

  it('each ssh run binds its own session', () => {
    const ids = new Set(bindFrames.filter(({ f }) => f.conn === 1).map(({ f }) => bindFor(f)!.sessionId.toString('hex')));
    expect(ids.size).toBe(bindFrames.filter(({ f }) => f.conn === 1).length);
  });
});

describe('manual query', () => {
  const pair = pairs.find((p) => p.request.client === 'manual-query')!;

  it('parses as an extension request named "query" with no contents', () => {
    const ext = narrow(request(pair.request), 'extension');
    expect(ext.name).toBe(EXT_QUERY);
    expect(ext.contents).toHaveLength(0);
  });

  it("OpenSSH 9.2's agent does not know it and answers SSH_AGENT_FAILURE", () => {
    expect(response(pair.response)).toEqual({ type: 'failure' });
  });
});
