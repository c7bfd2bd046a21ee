// Property-based tests (fast-check) for framing and message parsing.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { FrameError, FrameReader, MAX_FRAME_LENGTH, frame } from '../../src/agent-protocol/framing.js';
import {
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
} from '../../src/agent-protocol/messages.js';
import { parseSignatureBlob, ecdsaSshToP1363, verifySsh } from '../../src/agent-protocol/signature.js';
import { WireFormatError } from '../../src/agent-protocol/wire.js';

const RUNS = 300;

// ---------------------------------------------------------------------------------------------
// Generators

const payloadArb = fc.uint8Array({ minLength: 1, maxLength: 300 }).map((u) => Buffer.from(u));

/** Cuts `total` bytes into chunks: random cut points, or every byte on its own. */
const cutsArb = (total: number): fc.Arbitrary<number[]> =>
  fc.oneof(
    fc.constant(Array.from({ length: total + 1 }, (_, i) => i)),
    fc.array(fc.nat({ max: Math.max(total, 0) }), { maxLength: 40 }).map((xs) => [0, ...xs.sort((a, b) => a - b), total]),
  );

function split(bytes: Buffer, cuts: number[]): Buffer[] {
  const chunks: Buffer[] = [];
  for (let i = 1; i < cuts.length; i++) chunks.push(bytes.subarray(cuts[i - 1]!, cuts[i]!));
  return chunks;
}

const streamWithCuts = <T>(arb: fc.Arbitrary<[T, Buffer]>) =>
  arb.chain(([meta, bytes]) => cutsArb(bytes.length).map((cuts) => ({ meta, bytes, chunks: split(bytes, cuts) })));

/** uint32 length + bytes, sometimes with a lying length; builds inputs that get past the first read. */
const sshStringArb = fc.oneof(
  { weight: 4, arbitrary: fc.uint8Array({ maxLength: 40 }).map((u) => Buffer.concat([u32(u.length), Buffer.from(u)])) },
  { weight: 1, arbitrary: fc.tuple(fc.nat({ max: 64 }), fc.uint8Array({ maxLength: 40 })).map(([n, u]) => Buffer.concat([u32(n), Buffer.from(u)])) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 8 }).map((u) => Buffer.from(u)) },
);

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

const KNOWN_CODES = [5, 6, 11, 12, 13, 14, 27, 28, 29];

const smallBytes = fc.uint8Array({ maxLength: 48 }).map((u) => Buffer.from(u));

/** Well-formed payloads of every modelled type, in both directions. */
const validMessageArb: fc.Arbitrary<Buffer> = fc.oneof(
  fc.constant(encodeRequest({ type: 'request-identities' })),
  fc
    .tuple(smallBytes, smallBytes, fc.nat({ max: 0xffffffff }))
    .map(([keyBlob, data, flags]) => encodeRequest({ type: 'sign', keyBlob, data, flags })),
  fc.tuple(fc.string({ maxLength: 20 }), smallBytes).map(([name, contents]) => encodeRequest({ type: 'extension', name, contents })),
  fc.constant(encodeResponse({ type: 'failure' })),
  fc.constant(encodeResponse({ type: 'success' })),
  fc.constant(encodeResponse({ type: 'extension-failure' })),
  fc
    .array(fc.record({ keyBlob: smallBytes, comment: fc.string({ maxLength: 10 }) }), { maxLength: 4 })
    .map((identities) => encodeResponse({ type: 'identities', identities })),
  smallBytes.map((signature) => encodeResponse({ type: 'signature', signature })),
  fc
    .tuple(fc.string({ maxLength: 20 }), smallBytes)
    .map(([name, contents]) => encodeResponse({ type: 'extension-response', name, contents })),
);

/** A well-formed payload damaged in one way: truncated, extended, a byte changed, or a byte deleted. */
const mutatedMessageArb = fc
  .tuple(validMessageArb, fc.nat(), fc.integer({ min: 0, max: 255 }), fc.constantFrom('truncate', 'append', 'flip', 'delete'))
  .map(([msg, at, value, how]) => {
    const i = at % msg.length;
    switch (how) {
      case 'truncate':
        return msg.subarray(0, i);
      case 'append':
        return Buffer.concat([msg, Buffer.of(value)]);
      case 'flip': {
        const copy = Buffer.from(msg);
        copy[i] = value;
        return copy;
      }
      default:
        return Buffer.concat([msg.subarray(0, i), msg.subarray(i + 1)]);
    }
  });

/** Message-shaped garbage: random bytes, a type code followed by string-ish tokens, or damaged valid messages. */
const messageLikeArb = fc.oneof(
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 200 }).map((u) => Buffer.from(u)) },
  {
    weight: 1,
    arbitrary: fc
      .tuple(
        fc.oneof(fc.constantFrom(...KNOWN_CODES), fc.integer({ min: 0, max: 255 })),
        fc.oneof(fc.constant(null), fc.nat({ max: 6 })),
        fc.array(sshStringArb, { maxLength: 6 }),
      )
      .map(([code, count, parts]) => Buffer.concat([Buffer.of(code), ...(count === null ? [] : [u32(count)]), ...parts])),
  },
  { weight: 3, arbitrary: validMessageArb },
  { weight: 2, arbitrary: mutatedMessageArb },
);

/** Runs `fn`; anything thrown must be a WireFormatError. */
function onlyWireFormatError<T>(fn: () => T): T | WireFormatError {
  try {
    return fn();
  } catch (e) {
    if (!(e instanceof WireFormatError)) throw new Error(`threw ${String(e)} (${(e as Error)?.name}) instead of WireFormatError`);
    return e;
  }
}

// ---------------------------------------------------------------------------------------------

/** Straightforward model of the framing: what a whole-stream reader delivers, and whether it fails. */
function modelFrames(stream: Buffer, max: number): { frames: Buffer[]; error: boolean } {
  const frames: Buffer[] = [];
  let offset = 0;
  while (stream.length - offset >= 4) {
    const length = stream.readUInt32BE(offset);
    if (length === 0 || length > max) return { frames, error: true };
    if (stream.length - offset - 4 < length) break;
    frames.push(stream.subarray(offset + 4, offset + 4 + length));
    offset += 4 + length;
  }
  return { frames, error: false };
}

function feed(reader: FrameReader, chunks: Buffer[]): { frames: Buffer[]; error: unknown } {
  const frames: Buffer[] = [];
  try {
    for (const chunk of chunks) reader.push(chunk, (p) => frames.push(Buffer.from(p)));
  } catch (error) {
    return { frames, error };
  }
  return { frames, error: undefined };
}

describe('FrameReader properties', () => {
  it('(a) yields exactly the framed payloads, in order, however the stream is chunked', () => {
    fc.assert(
      fc.property(
        streamWithCuts(
          fc.array(payloadArb, { maxLength: 12 }).map((ps) => [ps, Buffer.concat(ps.map(frame))] as [Buffer[], Buffer]),
        ),
        ({ meta: payloads, chunks }) => {
          const reader = new FrameReader();
          const got = feed(reader, chunks);
          expect(got.error).toBeUndefined();
          expect(got.frames).toEqual(payloads);
          expect(reader.buffered).toBe(0);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('(a) one byte at a time, with a trailing partial frame left buffered', () => {
    fc.assert(
      fc.property(fc.array(payloadArb, { minLength: 1, maxLength: 6 }), payloadArb, fc.nat(), (payloads, last, cut) => {
        const tail = frame(last);
        const keep = 1 + (cut % (tail.length - 1)); // 1 .. tail.length-1 bytes of the next frame
        const stream = Buffer.concat([...payloads.map(frame), tail.subarray(0, keep)]);
        const reader = new FrameReader();
        const got = feed(reader, split(stream, Array.from({ length: stream.length + 1 }, (_, i) => i)));
        expect(got.error).toBeUndefined();
        expect(got.frames).toEqual(payloads);
        expect(reader.buffered).toBe(keep);
      }),
      { numRuns: RUNS },
    );
  });

  it('(b) random byte streams, randomly split, only ever throw FrameError and agree with a model', () => {
    const max = 64; // a small bound, so random headers hit both sides of it
    const streamArb = fc.oneof(
      fc.uint8Array({ maxLength: 600 }).map((u) => Buffer.from(u)),
      // Valid frames interleaved with junk headers and junk bytes.
      fc
        .array(
          fc.oneof(
            fc.uint8Array({ minLength: 1, maxLength: max }).map((u) => frame(Buffer.from(u))),
            fc.nat({ max: 2 * max }).map(u32),
            fc.uint8Array({ maxLength: 8 }).map((u) => Buffer.from(u)),
          ),
          { maxLength: 12 },
        )
        .map((parts) => Buffer.concat(parts)),
    );
    let sawError = 0;
    let sawFrames = 0;
    fc.assert(
      fc.property(streamWithCuts(streamArb.map((b) => [null, b] as [null, Buffer])), ({ bytes, chunks }) => {
        const got = feed(new FrameReader(max), chunks);
        if (got.error !== undefined) sawError++;
        if (got.frames.length > 0) sawFrames++;
        if (got.error !== undefined) expect(got.error).toBeInstanceOf(FrameError);
        for (const f of got.frames) {
          expect(f.length).toBeGreaterThanOrEqual(1);
          expect(f.length).toBeLessThanOrEqual(max);
        }
        const model = modelFrames(bytes, max);
        expect(got.frames).toEqual(model.frames);
        expect(got.error !== undefined).toBe(model.error);
      }),
      { numRuns: RUNS },
    );
    // The generator must exercise both outcomes, or the property says little.
    expect(sawError).toBeGreaterThan(RUNS / 10);
    expect(sawFrames).toBeGreaterThan(RUNS / 10);
  });

  it('(b) with the default 256 KiB bound, random streams only ever throw FrameError', () => {
    fc.assert(
      fc.property(
        streamWithCuts(fc.uint8Array({ maxLength: 400 }).map((u) => [null, Buffer.from(u)] as [null, Buffer])),
        ({ bytes, chunks }) => {
          const got = feed(new FrameReader(), chunks);
          if (got.error !== undefined) expect(got.error).toBeInstanceOf(FrameError);
          const model = modelFrames(bytes, MAX_FRAME_LENGTH);
          expect(got.frames).toEqual(model.frames);
          expect(got.error !== undefined).toBe(model.error);
        },
      ),
      { numRuns: RUNS },
    );
  });
});

describe('message parsing properties', () => {
  it('(c) parseRequest on random bytes returns a value or throws WireFormatError', () => {
    const parsedTypes = new Set<string>();
    let failures = 0;
    fc.assert(
      fc.property(messageLikeArb, (bytes) => {
        const result = onlyWireFormatError(() => parseRequest(bytes));
        if (result instanceof WireFormatError) {
          failures++;
          return;
        }
        parsedTypes.add(result.type);
        // What parses as identities/sign re-encodes to exactly the input (no lossy fields there).
        if (result.type === 'request-identities' || result.type === 'sign') expect(encodeRequest(result)).toEqual(bytes);
        if (result.type === 'unsupported') {
          expect(result.code).toBe(bytes[0]);
          expect([MSG.REQUEST_IDENTITIES, MSG.SIGN_REQUEST, MSG.EXTENSION, MSG.ADD_IDENTITY, MSG.REMOVE_IDENTITY, MSG.REMOVE_ALL_IDENTITIES, MSG.LOCK, MSG.UNLOCK, MSG.ADD_ID_CONSTRAINED]).not.toContain(result.code);
        }
      }),
      { numRuns: RUNS },
    );
    expect(failures).toBeGreaterThan(0);
    // Random bytes may also land on the short key operations (remove-all is one byte).
    expect([...parsedTypes]).toEqual(expect.arrayContaining(['extension', 'request-identities', 'sign', 'unsupported']));
  });

  it('(c) parseResponse on random bytes returns a value or throws WireFormatError', () => {
    const parsedTypes = new Set<string>();
    let failures = 0;
    fc.assert(
      fc.property(messageLikeArb, (bytes) => {
        const result = onlyWireFormatError(() => parseResponse(bytes));
        if (result instanceof WireFormatError) {
          failures++;
          return;
        }
        parsedTypes.add(result.type);
        expect([5, 6, 12, 14, 28, 29]).toContain(bytes[0]);
        if (['failure', 'success', 'extension-failure', 'signature'].includes(result.type)) {
          expect(encodeResponse(result)).toEqual(bytes);
        }
      }),
      { numRuns: RUNS },
    );
    expect(failures).toBeGreaterThan(0);
    expect([...parsedTypes].sort()).toEqual(
      ['extension-failure', 'extension-response', 'failure', 'identities', 'signature', 'success'],
    );
  });

  it('(c) extension bodies, signature blobs and ECDSA signatures: a value or WireFormatError', () => {
    const body = fc.array(sshStringArb, { maxLength: 5 }).chain((parts) =>
      fc.oneof(fc.constant(Buffer.concat(parts)), fc.uint8Array({ maxLength: 3 }).map((t) => Buffer.concat([...parts, Buffer.from(t)]))),
    );
    fc.assert(
      fc.property(body, (bytes) => {
        onlyWireFormatError(() => parseSessionBind(bytes));
        onlyWireFormatError(() => parseQueryContents(bytes));
        onlyWireFormatError(() => parseSignatureBlob(bytes));
        for (const size of [32, 48, 66]) onlyWireFormatError(() => ecdsaSshToP1363(bytes, size));
      }),
      { numRuns: RUNS },
    );
  });

  it('verifySsh never throws on garbage; it answers false', () => {
    const keyBlob = fc.oneof(
      fc.array(sshStringArb, { maxLength: 4 }).map((p) => Buffer.concat(p)),
      fc
        .tuple(
          fc.constantFrom('ssh-ed25519', 'ssh-rsa', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521'),
          fc.array(sshStringArb, { maxLength: 3 }),
        )
        .map(([t, p]) => Buffer.concat([u32(t.length), Buffer.from(t), ...p])),
    );
    fc.assert(
      fc.property(keyBlob, fc.array(sshStringArb, { maxLength: 3 }), fc.uint8Array({ maxLength: 40 }), fc.boolean(), (key, sig, data, sha1) => {
        expect(verifySsh(key, Buffer.concat(sig), Buffer.from(data), sha1)).toBe(false);
      }),
      { numRuns: RUNS },
    );
  });

  it('(d) random sign requests: encode → parse is the identity, and parse → encode too', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 600 }),
        fc.uint8Array({ maxLength: 2048 }),
        fc.oneof(fc.constantFrom(0, 2, 4, 6), fc.nat({ max: 0xffffffff })),
        (keyBlob, data, flags) => {
          const request: AgentRequest = { type: 'sign', keyBlob: Buffer.from(keyBlob), data: Buffer.from(data), flags };
          const payload = encodeRequest(request);
          expect(payload[0]).toBe(MSG.SIGN_REQUEST);
          expect(payload.length).toBe(1 + 4 + keyBlob.length + 4 + data.length + 4);
          const parsed = parseRequest(payload);
          expect(parsed).toEqual(request);
          expect(encodeRequest(parsed)).toEqual(payload);
          // And through the framing too.
          const out: Buffer[] = [];
          new FrameReader().push(frame(payload), (p) => out.push(Buffer.from(p)));
          expect(out.map(parseRequest)).toEqual([request]);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('random identities answers, extension messages, query lists and session-binds round-trip', () => {
    const bytesArb = fc.uint8Array({ maxLength: 120 }).map((u) => Buffer.from(u));
    const identities = fc.array(fc.record({ keyBlob: bytesArb, comment: fc.string({ maxLength: 40 }) }), { maxLength: 8 });
    fc.assert(
      fc.property(
        identities,
        fc.string({ maxLength: 40 }),
        bytesArb,
        fc.array(fc.string({ maxLength: 30 }), { maxLength: 6 }),
        fc.record({ hostKey: bytesArb, sessionId: bytesArb, signature: bytesArb, isForwarding: fc.boolean() }),
        (ids, name, contents, names, bind) => {
          const responses: AgentResponse[] = [
            { type: 'identities', identities: ids },
            { type: 'extension-response', name, contents },
            { type: 'signature', signature: contents },
          ];
          for (const r of responses) {
            const payload = encodeResponse(r);
            expect(parseResponse(payload)).toEqual(r);
            expect(encodeResponse(parseResponse(payload))).toEqual(payload);
          }
          const ext: AgentRequest = { type: 'extension', name, contents };
          expect(parseRequest(encodeRequest(ext))).toEqual(ext);
          expect(parseQueryContents(encodeQueryContents(names))).toEqual(names);
          expect(parseSessionBind(encodeSessionBind(bind))).toEqual(bind);
        },
      ),
      { numRuns: RUNS },
    );
  });
});
