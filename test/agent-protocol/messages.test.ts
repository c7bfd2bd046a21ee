// Typed agent messages: every supported type round-trips, hand-built bytes decode as expected,
// malformed bodies throw WireFormatError.
import { describe, expect, it } from 'vitest';
import {
  EXT_QUERY,
  EXT_SESSION_BIND,
  MSG,
  encodeQueryContents,
  encodeRequest,
  encodeResponse,
  encodeSessionBind,
  parseQueryContents,
  parseRequest,
  parseResponse,
  parseSessionBind,
  type AgentRequest,
  type AgentResponse,
  type SessionBind,
} from '../../src/agent-protocol/messages.js';
import { WireFormatError } from '../../src/agent-protocol/wire.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const str = (s: string | Buffer): string => {
  const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(b.length);
  return len.toString('hex') + b.toString('hex');
};

const ed25519Blob = hex(str('ssh-ed25519') + str(Buffer.alloc(32, 0x11)));

describe('message type codes', () => {
  it('match RFC 9987 / PROTOCOL.agent', () => {
    expect(MSG).toEqual({
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
    });
    expect(EXT_QUERY).toBe('query');
    expect(EXT_SESSION_BIND).toBe('session-bind@openssh.com');
  });
});

describe('requests round-trip encode → parse → encode', () => {
  const cases: Array<[string, AgentRequest, string]> = [
    ['11 request-identities', { type: 'request-identities' }, '0b'],
    [
      '13 sign',
      { type: 'sign', keyBlob: Buffer.from('ab'), data: Buffer.from('xyz'), flags: 4 },
      '0d' + '00000002 6162' + '00000003 78797a' + '00000004',
    ],
    [
      '13 sign, empty data, all flag bits',
      { type: 'sign', keyBlob: ed25519Blob, data: Buffer.alloc(0), flags: 0xffffffff },
      '0d' + str(ed25519Blob) + '00000000' + 'ffffffff',
    ],
    [
      '27 extension query',
      { type: 'extension', name: 'query', contents: Buffer.alloc(0) },
      '1b' + str('query'),
    ],
    [
      '27 extension with contents',
      { type: 'extension', name: 'x@example.com', contents: hex('00000001 41 01') },
      '1b' + str('x@example.com') + '00000001 41 01',
    ],
  ];

  it.each(cases)('%s', (_name, request, expectedHex) => {
    const encoded = encodeRequest(request);
    expect(encoded).toEqual(hex(expectedHex));
    const parsed = parseRequest(encoded);
    expect(parsed).toEqual(request);
    expect(encodeRequest(parsed)).toEqual(encoded);
  });

  it('an unknown request type parses as unsupported with its code, whatever the body', () => {
    expect(parseRequest(hex('1a 00000000 ffff'))).toEqual({ type: 'unsupported', code: 0x1a });
    expect(parseRequest(hex('ff'))).toEqual({ type: 'unsupported', code: 0xff });
    expect(encodeRequest({ type: 'unsupported', code: 17 })).toEqual(Buffer.of(17));
  });
});

describe('responses round-trip encode → parse → encode', () => {
  const cases: Array<[string, AgentResponse, string]> = [
    ['5 failure', { type: 'failure' }, '05'],
    ['6 success', { type: 'success' }, '06'],
    ['28 extension-failure', { type: 'extension-failure' }, '1c'],
    ['12 identities, none', { type: 'identities', identities: [] }, '0c 00000000'],
    [
      '12 identities, several',
      {
        type: 'identities',
        identities: [
          { keyBlob: ed25519Blob, comment: 'me@host' },
          { keyBlob: Buffer.from('blob2'), comment: '' },
          { keyBlob: Buffer.from('blob3'), comment: 'ünïcødé ✓' },
        ],
      },
      '0c 00000003' + str(ed25519Blob) + str('me@host') + str('blob2') + str('') + str('blob3') + str('ünïcødé ✓'),
    ],
    [
      '14 signature',
      { type: 'signature', signature: hex(str('ssh-ed25519') + str(Buffer.alloc(64, 7))) },
      '0e' + str(hex(str('ssh-ed25519') + str(Buffer.alloc(64, 7)))),
    ],
    [
      '29 extension-response',
      { type: 'extension-response', name: 'query', contents: hex(str('query') + str('session-bind@openssh.com')) },
      '1d' + str('query') + str('query') + str('session-bind@openssh.com'),
    ],
  ];

  it.each(cases)('%s', (_name, response, expectedHex) => {
    const encoded = encodeResponse(response);
    expect(encoded).toEqual(hex(expectedHex));
    const parsed = parseResponse(encoded);
    expect(parsed).toEqual(response);
    expect(encodeResponse(parsed)).toEqual(encoded);
  });
});

describe('malformed messages throw WireFormatError', () => {
  const badRequests: Array<[string, string]> = [
    ['empty payload', ''],
    ['request-identities with a trailing byte', '0b 00'],
    ['sign without flags', '0d' + str('k') + str('d')],
    ['sign with 3 flag bytes', '0d' + str('k') + str('d') + '000000'],
    ['sign with trailing bytes', '0d' + str('k') + str('d') + '00000000 00'],
    ['sign with truncated key blob', '0d 00000010 6162'],
    ['sign with absurd data length', '0d' + str('k') + 'ffffffff'],
    ['extension without a name', '1b'],
    ['extension with a truncated name', '1b 00000005 7175'],
  ];

  it.each(badRequests)('request: %s', (_name, h) => {
    expect(() => parseRequest(hex(h))).toThrow(WireFormatError);
  });

  const badResponses: Array<[string, string]> = [
    ['empty payload', ''],
    ['failure with a trailing byte', '05 00'],
    ['success with a trailing byte', '06 01'],
    ['extension-failure with a trailing byte', '1c 00'],
    ['identities without a count', '0c'],
    ['identities count larger than the entries', '0c 00000002' + str('k') + str('c')],
    ['identities count 2^32-1 with no entries', '0c ffffffff'],
    ['identities with a missing comment', '0c 00000001' + str('k') + '0000'],
    ['identities with trailing bytes', '0c 00000001' + str('k') + str('c') + '00'],
    ['signature with trailing bytes', '0e' + str('sig') + '00'],
    ['signature truncated', '0e 00000009 0102'],
    ['extension-response without a name', '1d'],
    ['unknown response type', '63'],
    ['a request type as a response', '0b'],
  ];

  it.each(badResponses)('response: %s', (_name, h) => {
    expect(() => parseResponse(hex(h))).toThrow(WireFormatError);
  });

  it('a huge identities count is rejected without allocating or looping', () => {
    const started = Date.now();
    expect(() => parseResponse(hex('0c 7fffffff' + str('k') + str('c')))).toThrow(WireFormatError);
    expect(Date.now() - started).toBeLessThan(500);
  });
});

describe('query extension contents', () => {
  it('encodes one string per name, up to the end', () => {
    expect(encodeQueryContents(['query', EXT_SESSION_BIND])).toEqual(hex(str('query') + str(EXT_SESSION_BIND)));
    expect(encodeQueryContents([])).toEqual(Buffer.alloc(0));
  });

  it.each([[[]], [['query']], [['query', EXT_SESSION_BIND]], [['a', '', 'b@x.org']]])('round-trips %j', (names) => {
    const contents = encodeQueryContents(names);
    expect(parseQueryContents(contents)).toEqual(names);
    expect(encodeQueryContents(parseQueryContents(contents))).toEqual(contents);
  });

  it('round-trips inside a full extension-response message', () => {
    const names = [EXT_QUERY, EXT_SESSION_BIND];
    const payload = encodeResponse({ type: 'extension-response', name: EXT_QUERY, contents: encodeQueryContents(names) });
    expect(payload[0]).toBe(MSG.EXTENSION_RESPONSE);
    const parsed = parseResponse(payload);
    if (parsed.type !== 'extension-response') throw new Error(`got ${parsed.type}`);
    expect(parsed.name).toBe(EXT_QUERY);
    expect(parseQueryContents(parsed.contents)).toEqual(names);
  });

  it('rejects truncated contents', () => {
    expect(() => parseQueryContents(hex(str('query') + '000000'))).toThrow(WireFormatError);
    expect(() => parseQueryContents(hex('00000009 7175'))).toThrow(WireFormatError);
  });
});

describe('session-bind@openssh.com contents', () => {
  const bind: SessionBind = {
    hostKey: ed25519Blob,
    sessionId: Buffer.alloc(32, 0x42),
    signature: hex(str('ssh-ed25519') + str(Buffer.alloc(64, 9))),
    isForwarding: false,
  };

  it('encodes hostKey, sessionId, signature, then the boolean', () => {
    expect(encodeSessionBind(bind)).toEqual(
      hex(str(bind.hostKey) + str(bind.sessionId) + str(bind.signature) + '00'),
    );
    expect(encodeSessionBind({ ...bind, isForwarding: true }).at(-1)).toBe(1);
  });

  it.each([false, true])('round-trips with isForwarding=%s', (isForwarding) => {
    const value = { ...bind, isForwarding };
    const contents = encodeSessionBind(value);
    expect(parseSessionBind(contents)).toEqual(value);
    expect(encodeSessionBind(parseSessionBind(contents))).toEqual(contents);
  });

  it('round-trips inside a full extension request', () => {
    const payload = encodeRequest({ type: 'extension', name: EXT_SESSION_BIND, contents: encodeSessionBind(bind) });
    const parsed = parseRequest(payload);
    if (parsed.type !== 'extension') throw new Error(`got ${parsed.type}`);
    expect(parsed.name).toBe(EXT_SESSION_BIND);
    expect(parseSessionBind(parsed.contents)).toEqual(bind);
  });

  it('rejects a missing boolean, trailing bytes and truncation', () => {
    const good = encodeSessionBind(bind);
    expect(() => parseSessionBind(good.subarray(0, good.length - 1))).toThrow(WireFormatError);
    expect(() => parseSessionBind(Buffer.concat([good, Buffer.of(0)]))).toThrow(WireFormatError);
    expect(() => parseSessionBind(good.subarray(0, 10))).toThrow(WireFormatError);
    expect(() => parseSessionBind(Buffer.alloc(0))).toThrow(WireFormatError);
  });
});
