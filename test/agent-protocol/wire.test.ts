// SSH wire primitives (RFC 4251 §5).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { WireFormatError, WireReader, WireWriter } from '../../src/agent-protocol/wire.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const mpint = (magnitude: Buffer): string => new WireWriter().mpint(magnitude).toBuffer().toString('hex');

function bigToBuf(n: bigint): Buffer {
  if (n === 0n) return Buffer.alloc(0);
  let h = n.toString(16);
  if (h.length % 2) h = '0' + h;
  return Buffer.from(h, 'hex');
}

const bufToBig = (b: Buffer): bigint => (b.length === 0 ? 0n : BigInt('0x' + b.toString('hex')));

describe('WireWriter.mpint', () => {
  it('encodes zero as an empty string, however it is given', () => {
    expect(mpint(Buffer.alloc(0))).toBe('00000000');
    expect(mpint(Buffer.of(0))).toBe('00000000');
    expect(mpint(Buffer.alloc(7))).toBe('00000000');
  });

  it('pads a magnitude whose high bit is set with 0x00', () => {
    expect(mpint(Buffer.of(0x80))).toBe('00000002' + '0080');
    expect(mpint(Buffer.of(0xff, 0x01))).toBe('00000003' + '00ff01');
  });

  it('does not pad when the high bit is clear', () => {
    expect(mpint(Buffer.of(0x7f))).toBe('00000001' + '7f');
    expect(mpint(Buffer.of(0x01, 0x00))).toBe('00000002' + '0100');
  });

  it('trims leading zero bytes, keeping exactly one 0x00 when the next byte has the high bit', () => {
    expect(mpint(hex('00 00 12 34'))).toBe('00000002' + '1234');
    expect(mpint(hex('00 80'))).toBe('00000002' + '0080');
    expect(mpint(hex('00 00 00 80 00'))).toBe('00000003' + '008000');
  });

  it('matches the RFC 4251 §5 examples', () => {
    expect(mpint(hex('09a378f9b2e332a7'))).toBe('00000008' + '09a378f9b2e332a7');
    expect(mpint(hex('80'))).toBe('00000002' + '0080');
  });

  it('round-trips any non-negative integer through mpintUnsigned, minimally encoded', () => {
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: (1n << 600n) - 1n }), fc.nat({ max: 4 }), (n, extraZeros) => {
        const magnitude = Buffer.concat([Buffer.alloc(extraZeros), bigToBuf(n)]);
        const encoded = new WireWriter().mpint(magnitude).toBuffer();
        const body = encoded.subarray(4);
        expect(encoded.readUInt32BE(0)).toBe(body.length);
        // Minimal: no leading 0x00 unless it shields a high bit; never a negative-looking first byte.
        if (body.length > 0) {
          expect(body[0]! & 0x80).toBe(0);
          if (body[0] === 0) expect(body[1]! & 0x80).toBe(0x80);
        }
        const r = new WireReader(encoded);
        const decoded = r.mpintUnsigned();
        r.end();
        expect(bufToBig(Buffer.from(decoded))).toBe(n);
        expect(decoded.length === 0 || decoded[0] !== 0).toBe(true);
      }),
      { numRuns: 300 },
    );
  });
});

describe('WireReader.mpintUnsigned', () => {
  it('strips the sign pad and leading zeros', () => {
    expect(new WireReader(hex('00000002 0080')).mpintUnsigned()).toEqual(Buffer.of(0x80));
    expect(new WireReader(hex('00000003 000012')).mpintUnsigned()).toEqual(Buffer.of(0x12));
    expect(new WireReader(hex('00000000')).mpintUnsigned()).toEqual(Buffer.alloc(0));
  });

  it('rejects negative mpints (RFC 4251 examples -1234 and -deadbeef) with WireFormatError', () => {
    expect(() => new WireReader(hex('00000002 edcc')).mpintUnsigned()).toThrow(WireFormatError);
    expect(() => new WireReader(hex('00000005 ff21524111')).mpintUnsigned()).toThrow(WireFormatError);
    expect(() => new WireReader(hex('00000001 80')).mpintUnsigned()).toThrow(WireFormatError);
  });

  it('rejects a truncated mpint', () => {
    expect(() => new WireReader(hex('00000004 0102')).mpintUnsigned()).toThrow(WireFormatError);
  });
});

describe('WireReader bounds checks', () => {
  it('throws WireFormatError for a string shorter than its length', () => {
    expect(() => new WireReader(Buffer.concat([hex('00000005'), Buffer.from('abc')])).string()).toThrow(WireFormatError);
    expect(() => new WireReader(hex('00000001')).string()).toThrow(WireFormatError);
  });

  it('throws WireFormatError (not RangeError) for an absurd string length', () => {
    expect(() => new WireReader(hex('ffffffff 00')).string()).toThrow(WireFormatError);
    expect(() => new WireReader(hex('80000000')).utf8()).toThrow(WireFormatError);
  });

  it('throws WireFormatError for a truncated length prefix, uint32, byte or boolean', () => {
    expect(() => new WireReader(hex('000000')).string()).toThrow(WireFormatError);
    expect(() => new WireReader(hex('000000')).uint32()).toThrow(WireFormatError);
    expect(() => new WireReader(Buffer.alloc(0)).byte()).toThrow(WireFormatError);
    expect(() => new WireReader(Buffer.alloc(0)).boolean()).toThrow(WireFormatError);
    expect(() => new WireReader(Buffer.alloc(0)).nameList()).toThrow(WireFormatError);
  });

  it('end() accepts a fully read buffer and rejects trailing bytes', () => {
    const ok = new WireReader(hex('00000002 6869'));
    expect(ok.utf8()).toBe('hi');
    expect(ok.remaining).toBe(0);
    expect(() => ok.end()).not.toThrow();

    const trailing = new WireReader(hex('00000002 6869 00'));
    expect(trailing.utf8()).toBe('hi');
    expect(trailing.remaining).toBe(1);
    expect(() => trailing.end()).toThrow(WireFormatError);
  });

  it('reads every primitive in sequence', () => {
    const r = new WireReader(hex('2a 01 00 deadbeef 00000003 616263 00000003 612c62 00000000'));
    expect(r.byte()).toBe(0x2a);
    expect(r.boolean()).toBe(true);
    expect(r.boolean()).toBe(false);
    expect(r.uint32()).toBe(0xdeadbeef);
    expect(r.string()).toEqual(Buffer.from('abc'));
    expect(r.nameList()).toEqual(['a', 'b']);
    expect(r.nameList()).toEqual([]);
    r.end();
  });

  it('treats any non-zero boolean byte as true', () => {
    expect(new WireReader(Buffer.of(0x02)).boolean()).toBe(true);
    expect(new WireReader(Buffer.of(0xff)).boolean()).toBe(true);
  });

  it('rest() returns everything unread and leaves nothing', () => {
    const r = new WireReader(hex('01 020304'));
    r.byte();
    expect(r.rest()).toEqual(hex('020304'));
    expect(r.remaining).toBe(0);
    r.end();
  });
});

describe('WireWriter', () => {
  it('encodes each primitive big-endian, length-prefixed where due', () => {
    const out = new WireWriter()
      .byte(0x2a)
      .boolean(true)
      .boolean(false)
      .uint32(0xdeadbeef)
      .uint32(0xffffffff)
      .string('héllo')
      .string(Buffer.of(1, 2))
      .nameList(['a', 'b'])
      .nameList([])
      .raw(Buffer.of(9))
      .toBuffer();
    expect(out.toString('hex')).toBe(
      '2a' + '01' + '00' + 'deadbeef' + 'ffffffff' + '00000006' + Buffer.from('héllo').toString('hex') +
        '00000002' + '0102' + '00000003' + '612c62' + '00000000' + '09',
    );
  });

  it('round-trips random strings and uint32s through WireReader', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.uint8Array({ maxLength: 64 }), fc.string(), fc.nat({ max: 0xffffffff })), { maxLength: 10 }),
        (items) => {
          const w = new WireWriter();
          for (const [bytes, text, n] of items) w.string(Buffer.from(bytes)).string(text).uint32(n);
          const r = new WireReader(w.toBuffer());
          for (const [bytes, text, n] of items) {
            expect(r.string()).toEqual(Buffer.from(bytes));
            expect(r.utf8()).toBe(text);
            expect(r.uint32()).toBe(n);
          }
          r.end();
        },
      ),
      { numRuns: 200 },
    );
  });
});
