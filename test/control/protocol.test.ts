// The control socket's wire format (Buffers as {$b64}, uint32-length frames) and the daemon's
// validation of decoded requests.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { EXIT, KeyholdError } from '../../src/errors.js';
import {
  decodeMessage,
  encodeMessage,
  errorFromResponse,
  errorResponse,
  fromWire,
  toWire,
  type ControlRequest,
} from '../../src/control/protocol.js';
import { parseControlRequest } from '../../src/control/server.js';
import { VAULT_METHODS } from '../../src/vault/api.js';
import { MAX_DURATION_MS } from '../../src/duration.js';
import { validCalls } from './valid-calls.js';

const RUNS = 300;

/** Decodes a frame from encodeMessage: checks the length prefix, then decodes the payload. */
function decodeFrame(frame: Buffer): unknown {
  expect(frame.length).toBeGreaterThanOrEqual(4);
  expect(frame.readUInt32BE(0)).toBe(frame.length - 4);
  return decodeMessage(frame.subarray(4));
}

/** A deep comparison that is exact about Buffers (bytes), arrays, and plain/null-prototype objects. */
function sameValue(a: unknown, b: unknown): boolean {
  if (Buffer.isBuffer(a) || Buffer.isBuffer(b)) return Buffer.isBuffer(a) && Buffer.isBuffer(b) && a.equals(b);
  if (Array.isArray(a) || Array.isArray(b)) {
    return Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((v, i) => sameValue(v, b[i]));
  }
  if (a !== null && typeof a === 'object') {
    if (b === null || typeof b !== 'object') return false;
    const ka = Object.keys(a).sort();
    const kb = Object.keys(b).sort();
    return (
      ka.length === kb.length &&
      ka.every((k, i) => k === kb[i] && sameValue((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]))
    );
  }
  return Object.is(a, b);
}

// ---------------------------------------------------------------------------------------------
// Generators: JSON-ish values with Buffers at any depth. Keys never `$b64` (an object whose only
// key is `$b64` is the Buffer encoding itself) nor `__proto__`.

const keyArb = fc.string({ maxLength: 12 }).filter((k) => k !== '$b64' && k !== '__proto__');
const bufferArb = fc.oneof(
  fc.constant(Buffer.alloc(0)),
  fc.uint8Array({ maxLength: 64 }).map((u) => Buffer.from(u)),
  fc.constant(Buffer.from([0, 0xff, 0x80, 0x7f, 0x0a, 0x0d, 0x22, 0x5c])),
);
const leafArb = fc.oneof(
  fc.constant(null),
  fc.boolean(),
  fc.integer(),
  fc.double({ noNaN: true, noDefaultInfinity: true }).map((d) => (Object.is(d, -0) ? 0 : d)),
  fc.string({ maxLength: 20 }),
  fc.string({ unit: 'binary', maxLength: 20 }),
  bufferArb,
);
const { value: valueArb } = fc.letrec<{ value: unknown }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    leafArb,
    fc.array(tie('value'), { maxLength: 5 }),
    fc.dictionary(keyArb, tie('value'), { maxKeys: 5 }),
  ),
}));

describe('toWire / fromWire', () => {
  it('round-trips nested objects and arrays holding Buffers (empty, binary, large)', () => {
    const value = {
      empty: Buffer.alloc(0),
      binary: Buffer.from([0, 1, 2, 0xfe, 0xff, 0x00]),
      big: Buffer.alloc(70_000, 0xa5),
      nested: { list: [Buffer.from('abc'), 1, 'two', null, true, [Buffer.alloc(1)], { deep: { deeper: Buffer.from([0x80]) } }] },
      text: 'héllo \u0000 "quoted" \\ 🙂',
      n: -12.5,
      arr: [],
      obj: {},
    };
    const wire = toWire(value);
    // the wire form is pure JSON: no Buffer survives, and JSON keeps it exact
    const json = JSON.stringify(wire);
    expect(json).not.toContain('"type":"Buffer"');
    expect((wire as { binary: unknown }).binary).toEqual({ $b64: 'AAEC/v8A' });
    expect((wire as { empty: unknown }).empty).toEqual({ $b64: '' });
    const back = fromWire(JSON.parse(json)) as typeof value;
    expect(sameValue(back, value)).toBe(true);
    expect(Buffer.isBuffer(back.empty) && back.empty.length === 0).toBe(true);
    expect(Buffer.isBuffer(back.nested.list[0])).toBe(true);
    expect(back.big.equals(value.big)).toBe(true);
    // a Buffer alone, and inside an array, at top level
    expect((fromWire(JSON.parse(JSON.stringify(toWire(Buffer.from([9, 8]))))) as Buffer).equals(Buffer.from([9, 8]))).toBe(true);
    const arr = fromWire(JSON.parse(JSON.stringify(toWire([Buffer.alloc(0), Buffer.from('x')])))) as Buffer[];
    expect(arr.map((b) => b.toString('hex'))).toEqual(['', '78']);
  });

  it('undefined properties are dropped; a Buffer view round-trips its own bytes only', () => {
    expect(JSON.stringify(toWire({ a: undefined, b: 1 }))).toBe('{"b":1}');
    const backing = Buffer.from('0123456789');
    const view = backing.subarray(3, 6);
    const back = fromWire(JSON.parse(JSON.stringify(toWire({ view })))) as { view: Buffer };
    expect(back.view.toString()).toBe('345');
  });

  it('fromWire builds objects without a prototype: "__proto__" from the peer is plain data', () => {
    const before = ({} as Record<string, unknown>).polluted;
    const decoded = fromWire(JSON.parse('{"__proto__":{"polluted":true},"constructor":{"prototype":{"polluted":true}},"a":{"$b64":"AQI="}}')) as Record<string, unknown>;
    expect(({} as Record<string, unknown>).polluted).toBe(before);
    expect(Object.getPrototypeOf(decoded)).toBe(null);
    expect(Object.keys(decoded).sort()).toEqual(['__proto__', 'a', 'constructor']);
    expect((decoded.a as Buffer).equals(Buffer.from([1, 2]))).toBe(true);
    // an object with $b64 and anything else is not a Buffer
    const notBuffer = fromWire({ $b64: 'AQI=', other: 1 }) as Record<string, unknown>;
    expect(Buffer.isBuffer(notBuffer)).toBe(false);
    expect(notBuffer.$b64).toBe('AQI=');
    expect(Buffer.isBuffer(fromWire({ $b64: 5 }))).toBe(false);
  });

  it('refuses values nested deeper than its limit, both ways', () => {
    let deep: unknown = 1;
    for (let i = 0; i < 100; i++) deep = [deep];
    expect(() => toWire(deep)).toThrow(/deep/);
    expect(() => fromWire(deep)).toThrow(/deep/);
    let ok: unknown = Buffer.from('x');
    for (let i = 0; i < 20; i++) ok = { k: ok };
    expect(sameValue(fromWire(JSON.parse(JSON.stringify(toWire(ok)))), ok)).toBe(true);
  });

  it('property: fromWire(JSON(toWire(v))) equals v for random JSON-ish values with Buffers', () => {
    fc.assert(
      fc.property(valueArb, (v) => {
        const back = fromWire(JSON.parse(JSON.stringify(toWire(v))));
        return sameValue(back, v);
      }),
      { numRuns: RUNS },
    );
  });
});

describe('encodeMessage / decodeMessage', () => {
  it('round-trips with a correct uint32 length prefix (bytes, not characters)', () => {
    const value = { op: 'call', vaultId: 'v', method: 'importKey', args: ['ci', Buffer.from([0, 255]), 'ünïcödé 🙂'] };
    const frame = encodeMessage(value);
    const payload = frame.subarray(4);
    expect(frame.readUInt32BE(0)).toBe(payload.length);
    expect(payload.length).toBe(Buffer.byteLength(JSON.stringify(toWire(value))));
    expect(payload.length).toBeGreaterThan(JSON.stringify(toWire(value)).length); // multi-byte characters counted as bytes
    expect(sameValue(decodeFrame(frame), value)).toBe(true);
    // primitives too
    for (const v of [null, 0, 'x', true, [], {}]) expect(sameValue(decodeFrame(encodeMessage(v)), v)).toBe(true);
  });

  it('property: decodeMessage(encodeMessage(v) without its 4-byte prefix) equals v', () => {
    fc.assert(
      fc.property(valueArb, (v) => {
        const frame = encodeMessage(v);
        if (frame.readUInt32BE(0) !== frame.length - 4) return false;
        return sameValue(decodeMessage(frame.subarray(4)), v);
      }),
      { numRuns: RUNS },
    );
  });

  it('a payload that is not JSON throws SyntaxError (the server maps it to a usage error)', () => {
    expect(() => decodeMessage(Buffer.from('{"op":'))).toThrow(SyntaxError);
    expect(() => decodeMessage(Buffer.from([0xff, 0xfe]))).toThrow(SyntaxError);
  });
});

// ---------------------------------------------------------------------------------------------

const kek = () => Buffer.alloc(32, 7);

function usageFailure(value: unknown): KeyholdError {
  let err: unknown;
  try {
    parseControlRequest(value);
  } catch (e) {
    err = e;
  }
  expect(err, `accepted ${safeShow(value)}`).toBeInstanceOf(KeyholdError);
  expect((err as KeyholdError).exitCode, safeShow(value)).toBe(EXIT.USAGE);
  return err as KeyholdError;
}

function safeShow(value: unknown): string {
  try {
    return JSON.stringify(toWire(value))?.slice(0, 200) ?? String(value);
  } catch {
    return String(value);
  }
}

describe('parseControlRequest', () => {
  it('accepts valid status, lock, unlock and call requests', async () => {
    expect(parseControlRequest({ op: 'status' })).toEqual({ op: 'status' });
    expect(parseControlRequest({ op: 'lock', extra: 'ignored' })).toEqual({ op: 'lock' });

    const unlock = parseControlRequest({ op: 'unlock', vaultId: 'vid', keks: { 'pp-00000001': kek(), 'sa-00000002': kek() }, idleMs: 2000, ttlMs: null });
    expect(unlock).toMatchObject({ op: 'unlock', vaultId: 'vid', idleMs: 2000, ttlMs: null });
    expect(Object.keys((unlock as Extract<ControlRequest, { op: 'unlock' }>).keks)).toEqual(['pp-00000001', 'sa-00000002']);
    expect(parseControlRequest({ op: 'unlock', vaultId: 'vid', keks: {} })).toEqual({ op: 'unlock', vaultId: 'vid', keks: {}, idleMs: null, ttlMs: null, rememberMs: null });
    expect(parseControlRequest({ op: 'unlock', vaultId: 'vid', keks: {}, rememberMs: 5000 })).toMatchObject({ rememberMs: 5000 });
    expect(parseControlRequest({ op: 'unlock', vaultId: 'vid', keks: {}, ttlMs: MAX_DURATION_MS })).toMatchObject({ ttlMs: MAX_DURATION_MS });
    // Past what `--ttl` can say: the daemon would compute a date that does not exist.
    usageFailure({ op: 'unlock', vaultId: 'vid', keks: {}, ttlMs: Number.MAX_SAFE_INTEGER });

    const calls = await validCalls();
    for (const method of VAULT_METHODS) {
      for (const args of calls[method]) {
        const parsed = parseControlRequest({ op: 'call', vaultId: 'vid', method, args });
        expect(parsed).toMatchObject({ op: 'call', vaultId: 'vid', method });
        expect(sameValue((parsed as { args: unknown[] }).args.slice(0, args.length), args), method).toBe(true);
      }
    }
  });

  it('a valid request survives the wire: parseControlRequest(decode(encode(request)))', () => {
    const request = { op: 'unlock', vaultId: 'vid', keks: { 'sa-0000abcd': Buffer.alloc(32, 0xee) }, idleMs: 5, ttlMs: 10 };
    const parsed = parseControlRequest(decodeFrame(encodeMessage(request))) as Extract<ControlRequest, { op: 'unlock' }>;
    expect(parsed.keks['sa-0000abcd']!.equals(Buffer.alloc(32, 0xee))).toBe(true);
    expect(parsed.idleMs).toBe(5);
    expect(parsed.ttlMs).toBe(10);
  });

  it('rejects non-object input (exit 2)', () => {
    for (const value of [null, undefined, 0, 1, 'status', true, [], [{ op: 'status' }], Buffer.from('{}')]) usageFailure(value);
  });

  it('rejects unknown ops (exit 2)', () => {
    for (const op of ['STATUS', 'unlocked', '', 'constructor', '__proto__', 'toString', 'call ', undefined, null, 1, ['status'], { op: 'status' }]) {
      usageFailure({ op });
    }
    usageFailure({});
    usageFailure(JSON.parse('{"__proto__":{"op":"status"}}'));
    usageFailure(fromWire(JSON.parse('{"__proto__":{"op":"status"}}')));
  });

  it('rejects unknown or prototype methods and a missing vault id on call (exit 2)', () => {
    for (const method of [
      'constructor',
      '__proto__',
      'close',
      'toString',
      'hasOwnProperty',
      'valueOf',
      'open',
      'openWithKeks',
      'changeKeyring',
      'keyring',
      'addKey',
      'listkeys',
      'listKeys ',
      '',
      undefined,
      null,
      1,
      ['listKeys'],
    ]) {
      usageFailure({ op: 'call', vaultId: 'vid', method, args: [] });
    }
    for (const vaultId of [undefined, null, 1, {}, ['vid'], Buffer.from('vid')]) usageFailure({ op: 'call', vaultId, method: 'listKeys', args: [] });
  });

  it('rejects args that are not an array, and more args than the method takes (exit 2)', () => {
    for (const args of [undefined, null, {}, { length: 0 }, 'abc', 3, Buffer.from('x')]) {
      usageFailure({ op: 'call', vaultId: 'vid', method: 'listKeys', args });
    }
    usageFailure({ op: 'call', vaultId: 'vid', method: 'listKeys', args: ['web', 'web'] });
    usageFailure({ op: 'call', vaultId: 'vid', method: 'scopes', args: [null] });
    usageFailure({ op: 'call', vaultId: 'vid', method: 'listKeys', args: new Array(100_000).fill(null) });
    expect(parseControlRequest({ op: 'call', vaultId: 'vid', method: 'listKeys', args: ['web'] })).toMatchObject({ op: 'call' });
  });

  it('rejects KEKs that are not 32-byte Buffers, and bad keks/vaultId (exit 2)', () => {
    for (const bad of [Buffer.alloc(0), Buffer.alloc(31), Buffer.alloc(33), Buffer.alloc(64), 'x'.repeat(32), new Uint8Array(32), Array(32).fill(0), null, 32, { $b64: Buffer.alloc(32).toString('base64') }]) {
      usageFailure({ op: 'unlock', vaultId: 'vid', keks: { 'pp-00000001': bad } });
      usageFailure({ op: 'unlock', vaultId: 'vid', keks: { 'pp-00000001': kek(), 'sa-00000002': bad } });
    }
    for (const keks of [undefined, null, 'keks', 5, true]) usageFailure({ op: 'unlock', vaultId: 'vid', keks });
    for (const vaultId of [undefined, null, 5, {}, Buffer.from('v')]) usageFailure({ op: 'unlock', vaultId, keks: {} });
  });

  it('a "__proto__" factor id from the wire cannot smuggle a non-KEK in or pollute anything', () => {
    const b64 = (n: number) => Buffer.alloc(n, 3).toString('base64');
    usageFailure(decodeMessage(Buffer.from(`{"op":"unlock","vaultId":"v","keks":{"__proto__":{"$b64":"${b64(31)}"}}}`)));
    usageFailure(decodeMessage(Buffer.from(`{"op":"unlock","vaultId":"v","keks":{"__proto__":{"polluted":true}}}`)));
    // A key that is no factor id is refused, even beside a good one, even with a real KEK.
    usageFailure(decodeMessage(Buffer.from(`{"op":"unlock","vaultId":"v","keks":{"__proto__":{"$b64":"${b64(32)}"},"pp-00000001":{"$b64":"${b64(32)}"}}}`)));
    usageFailure(decodeMessage(Buffer.from(`{"op":"unlock","vaultId":"v","keks":{"constructor":{"$b64":"${b64(32)}"}}}`)));
    const parsed = parseControlRequest(
      decodeMessage(Buffer.from(`{"op":"unlock","vaultId":"v","keks":{"sa-00000002":{"$b64":"${b64(32)}"},"pp-00000001":{"$b64":"${b64(32)}"}}}`)),
    ) as Extract<ControlRequest, { op: 'unlock' }>;
    for (const [, k] of Object.entries(parsed.keks)) expect(Buffer.isBuffer(k) && k.length === 32).toBe(true);
    expect(Object.keys(parsed.keks)).toEqual(['sa-00000002', 'pp-00000001']);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    expect(Object.getPrototypeOf({})).toBe(Object.prototype);
  });

  it('rejects negative, zero, float, non-finite and non-number durations (exit 2)', () => {
    for (const d of [-1, 0, -0, 1.5, 0.1, NaN, Infinity, -Infinity, 2 ** 53, '1000', '1s', true, {}, [1000], Buffer.from('1')]) {
      usageFailure({ op: 'unlock', vaultId: 'vid', keks: {}, idleMs: d });
      usageFailure({ op: 'unlock', vaultId: 'vid', keks: {}, ttlMs: d });
    }
  });

  it('property: random JSON values (and wire-decoded ones) never throw anything but a usage KeyholdError', () => {
    const opArb = fc.oneof(fc.constantFrom('status', 'lock', 'unlock', 'call'), fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 1 }));
    const methodArb = fc.oneof(fc.constantFrom(...VAULT_METHODS, 'constructor', '__proto__', 'close', 'toString'), fc.jsonValue({ maxDepth: 1 }));
    const kekArb = fc.oneof(fc.constant(Buffer.alloc(32, 1)), bufferArb, fc.jsonValue({ maxDepth: 1 }));
    const requestish = fc.record(
      {
        op: opArb,
        vaultId: fc.oneof(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 1 })),
        method: methodArb,
        args: fc.oneof(fc.array(valueArb, { maxLength: 10 }), fc.jsonValue({ maxDepth: 2 })),
        keks: fc.oneof(fc.dictionary(keyArb, kekArb, { maxKeys: 3 }), fc.jsonValue({ maxDepth: 1 })),
        idleMs: fc.oneof(fc.integer({ min: -5, max: 100_000 }), fc.double(), fc.jsonValue({ maxDepth: 0 })),
        ttlMs: fc.oneof(fc.integer({ min: -5, max: 100_000 }), fc.double(), fc.jsonValue({ maxDepth: 0 })),
      },
      { requiredKeys: [] },
    );
    const inputArb = fc.oneof(fc.jsonValue(), fc.anything(), requestish, valueArb);
    fc.assert(
      fc.property(inputArb, fc.boolean(), (input, throughWire) => {
        let value: unknown = input;
        if (throughWire) {
          try {
            value = decodeMessage(encodeMessage(input).subarray(4));
          } catch {
            value = input; // not encodable (e.g. too deep): test it as is
          }
        }
        let result: ControlRequest;
        try {
          result = parseControlRequest(value);
        } catch (err) {
          return err instanceof KeyholdError && err.exitCode === EXIT.USAGE;
        }
        // what it accepts is what the handler may trust
        switch (result.op) {
          case 'status':
          case 'lock':
            return Object.keys(result).length === 1;
          case 'unlock':
            return (
              typeof result.vaultId === 'string' &&
              Object.values(result.keks).every((k) => Buffer.isBuffer(k) && k.length === 32) &&
              [result.idleMs, result.ttlMs].every((d) => d === null || (Number.isSafeInteger(d) && d! > 0))
            );
          case 'call':
            return (
              typeof result.vaultId === 'string' &&
              (VAULT_METHODS as readonly string[]).includes(result.method) &&
              Array.isArray(result.args) &&
              result.args.length <= 8
            );
          default:
            return false;
        }
      }),
      { numRuns: 1000 },
    );
  });
});

// ---------------------------------------------------------------------------------------------

describe('errors across the socket', () => {
  it('errorFromResponse keeps known exit codes and maps unknown ones to 1', () => {
    for (const code of [EXIT.ERROR, EXIT.USAGE, EXIT.LOCKED, EXIT.DENIED, EXIT.NOT_FOUND]) {
      const err = errorFromResponse({ message: `m${code}`, hint: 'h', exitCode: code });
      expect(err).toBeInstanceOf(KeyholdError);
      expect(err.exitCode).toBe(code);
      expect(err.message).toBe(`m${code}`);
      expect(err.hint).toBe('h');
    }
    for (const code of [6, 42, 255, 256, -1, 2.5, NaN, Infinity, 1e9]) {
      const err = errorFromResponse({ message: 'odd', exitCode: code });
      expect(err.exitCode, String(code)).toBe(EXIT.ERROR);
      expect(err.hint).toBeUndefined();
    }
    // a peer sending other types is coerced, not trusted
    const weird = errorFromResponse({ message: 12 as unknown as string, hint: { x: 1 } as unknown as string, exitCode: '4' as unknown as number });
    expect(weird.message).toBe('12');
    expect(typeof weird.hint).toBe('string');
    expect(weird.exitCode).toBe(EXIT.ERROR);
  });

  it('errorResponse → wire → errorFromResponse keeps message, hint and exit code; other errors become exit 1', () => {
    const original = new KeyholdError('wrong passphrase', 'try again', EXIT.DENIED);
    const response = decodeFrame(encodeMessage(errorResponse(original))) as { ok: boolean; error: { message: string; hint?: string; exitCode: number } };
    expect(response.ok).toBe(false);
    const back = errorFromResponse(response.error);
    expect([back.message, back.hint, back.exitCode]).toEqual(['wrong passphrase', 'try again', EXIT.DENIED]);
    const noHint = errorResponse(new KeyholdError('x', undefined, EXIT.NOT_FOUND));
    expect(noHint).toEqual({ ok: false, error: { message: 'x', exitCode: EXIT.NOT_FOUND } });
    const plain = errorResponse(new TypeError('boom'));
    expect(plain).toEqual({ ok: false, error: { message: 'daemon error: boom', exitCode: EXIT.ERROR } });
    expect(errorResponse('str')).toEqual({ ok: false, error: { message: 'daemon error: str', exitCode: EXIT.ERROR } });
  });
});
