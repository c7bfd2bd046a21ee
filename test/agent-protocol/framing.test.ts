// Agent-protocol framing: uint32 length + payload, 1 byte to 256 KiB (PRODUCT.md "Wire formats").
import { describe, expect, it } from 'vitest';
import { FrameError, FrameReader, MAX_FRAME_LENGTH, frame } from '../../src/agent-protocol/framing.js';

const KIB256 = 256 * 1024;

const header = (length: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(length >>> 0, 0);
  return b;
};

/** Pushes chunks in order, collecting copies of every payload delivered. */
function collect(reader: FrameReader, ...chunks: Buffer[]): Buffer[] {
  const got: Buffer[] = [];
  for (const chunk of chunks) reader.push(chunk, (p) => got.push(Buffer.from(p)));
  return got;
}

describe('frame()', () => {
  it('prefixes the payload with its big-endian length', () => {
    expect(frame(Buffer.from('\x0bhi', 'latin1')).toString('hex')).toBe('00000003' + '0b6869');
    expect(frame(Buffer.of(5)).toString('hex')).toBe('0000000105');
  });
});

describe('FrameReader', () => {
  it('uses the contract bound of 256 KiB', () => {
    expect(MAX_FRAME_LENGTH).toBe(262144);
  });

  it('delivers a 1-byte frame', () => {
    const reader = new FrameReader();
    expect(collect(reader, Buffer.from('0000000105', 'hex'))).toEqual([Buffer.of(5)]);
    expect(reader.buffered).toBe(0);
  });

  it('delivers several frames from one chunk, in order, without the length headers', () => {
    const a = Buffer.of(11);
    const b = Buffer.from('0d0102030405', 'hex');
    const c = Buffer.of(6);
    const reader = new FrameReader();
    expect(collect(reader, Buffer.concat([frame(a), frame(b), frame(c)]))).toEqual([a, b, c]);
  });

  it('throws FrameError on a zero-length frame, without calling back', () => {
    const reader = new FrameReader();
    const calls: Buffer[] = [];
    expect(() => reader.push(header(0), (p) => calls.push(p))).toThrow(FrameError);
    expect(calls).toHaveLength(0);
  });

  it('throws FrameError on a zero-length header split across pushes', () => {
    const reader = new FrameReader();
    expect(collect(reader, Buffer.of(0, 0))).toEqual([]);
    expect(() => collect(reader, Buffer.of(0, 0))).toThrow(FrameError);
  });

  it('accepts a frame of exactly 256 KiB', () => {
    const payload = Buffer.alloc(KIB256, 0xa5);
    payload[0] = 13;
    payload[KIB256 - 1] = 0x5a;
    const framed = frame(payload);
    const whole = collect(new FrameReader(), framed);
    expect(whole).toHaveLength(1);
    expect(whole[0]!.length).toBe(KIB256);
    expect(whole[0]!.equals(payload)).toBe(true);
    // And in uneven pieces.
    const pieces = [framed.subarray(0, 3), framed.subarray(3, 70_000), framed.subarray(70_000)];
    const split = collect(new FrameReader(), ...pieces);
    expect(split).toHaveLength(1);
    expect(split[0]!.equals(payload)).toBe(true);
  });

  it('throws FrameError for 256 KiB + 1 as soon as the 4 header bytes arrive, before any body', () => {
    const reader = new FrameReader();
    const calls: Buffer[] = [];
    expect(() => reader.push(header(KIB256 + 1), (p) => calls.push(p))).toThrow(FrameError);
    expect(calls).toHaveLength(0);
  });

  it('throws FrameError on an oversized header arriving one byte at a time, at the 4th byte', () => {
    const h = header(0xffffffff);
    const reader = new FrameReader();
    for (let i = 0; i < 3; i++) expect(() => collect(reader, h.subarray(i, i + 1))).not.toThrow();
    expect(reader.buffered).toBe(3);
    expect(() => collect(reader, h.subarray(3, 4))).toThrow(FrameError);
  });

  it('throws FrameError on an oversized header even with part of the body in the same chunk', () => {
    const reader = new FrameReader();
    expect(() => collect(reader, Buffer.concat([header(KIB256 + 1), Buffer.alloc(100)]))).toThrow(FrameError);
  });

  it('delivers the frames before a bad header in the same chunk, then throws', () => {
    const a = Buffer.of(11);
    const b = Buffer.from('1b000000057175657279', 'hex');
    for (const bad of [header(0), header(KIB256 + 1), header(0x80000000)]) {
      const reader = new FrameReader();
      const got: Buffer[] = [];
      expect(() =>
        reader.push(Buffer.concat([frame(a), frame(b), bad, Buffer.of(1, 2, 3)]), (p) => got.push(Buffer.from(p))),
      ).toThrow(FrameError);
      expect(got).toEqual([a, b]);
    }
  });

  it('waits on a truncated frame without calling back, then completes when the rest arrives', () => {
    const payload = Buffer.from('0e0000000401020304', 'hex');
    const framed = frame(payload);
    const reader = new FrameReader();
    const got: Buffer[] = [];
    reader.push(framed.subarray(0, framed.length - 1), (p) => got.push(Buffer.from(p)));
    expect(got).toHaveLength(0);
    expect(reader.buffered).toBe(framed.length - 1);
    reader.push(framed.subarray(framed.length - 1), (p) => got.push(Buffer.from(p)));
    expect(got).toEqual([payload]);
    expect(reader.buffered).toBe(0);
  });

  it('completes a frame whose remainder arrives together with the next frame', () => {
    const a = Buffer.alloc(50, 1);
    const b = Buffer.alloc(20, 2);
    const stream = Buffer.concat([frame(a), frame(b)]);
    const reader = new FrameReader();
    expect(collect(reader, stream.subarray(0, 30))).toEqual([]);
    expect(collect(reader, stream.subarray(30))).toEqual([a, b]);
  });

  it('buffered reports pending bytes at every stage', () => {
    const framed = frame(Buffer.alloc(10, 7));
    const reader = new FrameReader();
    expect(reader.buffered).toBe(0);
    collect(reader, framed.subarray(0, 2));
    expect(reader.buffered).toBe(2);
    collect(reader, framed.subarray(2, 4));
    expect(reader.buffered).toBe(4);
    collect(reader, framed.subarray(4, 9));
    expect(reader.buffered).toBe(9);
    const got = collect(reader, framed.subarray(9, 14));
    expect(got).toHaveLength(1);
    expect(reader.buffered).toBe(0);
    // A complete frame plus part of the next: only the part is pending.
    collect(reader, Buffer.concat([framed, framed.subarray(0, 6)]));
    expect(reader.buffered).toBe(6);
  });

  it('held follows the memory of a partial frame: at least 4 KiB once begun, under twice what arrived, never over its length, 0 once complete', () => {
    const framed = frame(Buffer.alloc(200_000, 1));
    const reader = new FrameReader();
    collect(reader, framed.subarray(0, 3));
    expect(reader.held).toBe(0);
    collect(reader, framed.subarray(3, 5));
    expect(reader.held).toBe(4096);
    for (let sent = 5; sent < framed.length - 1; ) {
      const next = Math.min(sent + 30_000, framed.length - 1);
      collect(reader, framed.subarray(sent, next));
      sent = next;
      expect(reader.held).toBeGreaterThanOrEqual(reader.buffered - 4);
      expect(reader.held).toBeLessThanOrEqual(Math.min(200_000, 2 * reader.buffered));
    }
    expect(collect(reader, framed.subarray(framed.length - 1))).toHaveLength(1);
    expect(reader.held).toBe(0);
  });

  it('byte-at-a-time feeding of a large frame delivers it once, intact', () => {
    const payload = Buffer.alloc(64 * 1024);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 31) & 0xff;
    const framed = frame(payload);
    const reader = new FrameReader();
    const got: Buffer[] = [];
    let deliveredEarly = false;
    for (let i = 0; i < framed.length; i++) {
      reader.push(framed.subarray(i, i + 1), (p) => got.push(Buffer.from(p)));
      if (i < framed.length - 1 && got.length > 0) deliveredEarly = true;
    }
    expect(deliveredEarly).toBe(false);
    expect(got).toHaveLength(1);
    expect(got[0]!.equals(payload)).toBe(true);
  });

  it('honours a smaller maxLength given to the constructor', () => {
    const reader = new FrameReader(10);
    expect(collect(reader, frame(Buffer.alloc(10, 1)))).toEqual([Buffer.alloc(10, 1)]);
    expect(() => collect(reader, header(11))).toThrow(FrameError);
  });

  it('FrameError is an Error with its own name', () => {
    let caught: unknown;
    try {
      new FrameReader().push(header(0), () => {});
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(FrameError);
    expect(caught).toBeInstanceOf(Error);
    expect((caught as Error).name).toBe('FrameError');
  });
});
