// Property-based tests (fast-check) for the add/remove/lock codec: random and damaged frames never
// throw anything but WireFormatError and never take long; a damaged key never yields a KeyObject
// whose public key differs from the public key the request claims; constraints round-trip.
import fc from 'fast-check';
import { createPublicKey, generateKeyPairSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { MSG, parseRequest, type AgentRequest } from '../../src/agent-protocol/messages.js';
import { CONSTRAIN, EXT_RESTRICT_DESTINATION, readConstraints, writeConstraints, type DestinationHop, type KeyConstraints } from '../../src/agent-protocol/key-constraints.js';
import { describeKey, type SshKeyType } from '../../src/agent-protocol/public-key.js';
import { signatureAlgorithmFor, signSsh, verifySsh } from '../../src/agent-protocol/signature.js';
import { UnsupportedAddError } from '../../src/agent-protocol/private-key.js';
import { verifyCertificate } from '../../src/agent-protocol/certificate.js';
import { WireFormatError, WireReader, WireWriter } from '../../src/agent-protocol/wire.js';
import { readString, sshString, u32 } from '../helpers/raw-wire.js';
import { addExchanges } from './add-frames-fixture.js';
import { payloadOf } from './golden-fixture.js';

const RUNS = 300;
/** Far above what one parse takes (an RSA check is milliseconds); a parse that loops fails here. */
const PARSE_BUDGET_MS = 1_000;

const requests = addExchanges().map((p) => payloadOf(p.request));
const plainAdds = addExchanges()
  .filter((p) => p.request.client === 'ssh-add KEY')
  .map((p) => ({ keyType: p.request.keyType as SshKeyType, payload: payloadOf(p.request) }));
/** The second add of each `ssh-add KEY (with KEY-cert.pub)` run: the certificate. */
const certificateAdds = addExchanges()
  .filter((p) => p.request.client === 'ssh-add KEY (with KEY-cert.pub)')
  .filter((_, i) => i % 2 === 1)
  .map((p) => ({ keyType: p.request.keyType as SshKeyType, payload: payloadOf(p.request) }));
const KEY_OPERATION_CODES = [MSG.ADD_IDENTITY, MSG.REMOVE_IDENTITY, MSG.REMOVE_ALL_IDENTITIES, MSG.LOCK, MSG.UNLOCK, MSG.ADD_ID_CONSTRAINED];

/** Parses within the time budget; anything thrown must be a WireFormatError. */
function parseBounded(bytes: Buffer): AgentRequest | WireFormatError {
  const started = performance.now();
  try {
    return parseRequest(bytes);
  } catch (e) {
    if (!(e instanceof WireFormatError)) throw new Error(`threw ${(e as Error)?.name}: ${(e as Error)?.message} instead of WireFormatError`);
    return e;
  } finally {
    expect(performance.now() - started).toBeLessThan(PARSE_BUDGET_MS);
  }
}

/**
 * The public key an add request claims, read with the test's own helpers (not the codec): the
 * ed25519 `pub`, the ecdsa curve and Q, the rsa e and n, as a public blob.
 */
function claimedPublicBlob(payload: Buffer): Buffer {
  const [typeBytes, afterType] = readString(payload, 1);
  const type = typeBytes.toString();
  if (type === 'ssh-ed25519') return Buffer.concat([sshString(type), sshString(readString(payload, afterType)[0])]);
  if (type === 'ssh-rsa') {
    const [n, afterN] = readString(payload, afterType);
    const [e] = readString(payload, afterN);
    return Buffer.concat([sshString(type), sshString(e), sshString(n)]);
  }
  const [curve, afterCurve] = readString(payload, afterType);
  const [q] = readString(payload, afterCurve);
  return Buffer.concat([sshString(type), sshString(curve), sshString(q)]);
}

/** Damage: flip a bit, overwrite a byte, cut, drop a byte, insert a byte, or corrupt a length field. */
const damagedArb = (base: Buffer) =>
  fc.tuple(fc.nat({ max: base.length - 1 }), fc.integer({ min: 0, max: 5 }), fc.integer({ min: 0, max: 255 })).map(([i, kind, value]) => {
    const copy = Buffer.from(base);
    switch (kind) {
      case 0:
        copy[i] = copy[i]! ^ (1 << (value % 8));
        return copy;
      case 1:
        copy[i] = value;
        return copy;
      case 2:
        return copy.subarray(0, i);
      case 3:
        return Buffer.concat([copy.subarray(0, i), copy.subarray(i + 1)]);
      case 4:
        return Buffer.concat([copy.subarray(0, i), Buffer.of(value), copy.subarray(i)]);
      default:
        if (i + 4 <= copy.length) copy.writeUInt32BE((copy.readUInt32BE(i) + value - 128) >>> 0, i);
        return copy;
    }
  });

const goldenArb = fc.constantFrom(...requests);
const damagedGoldenArb = goldenArb.chain(damagedArb);

/** Key-operation-shaped garbage: a key-operation type code, then strings, numbers and bytes. */
const randomKeyOperationArb = fc
  .tuple(
    fc.constantFrom(...KEY_OPERATION_CODES),
    fc.array(
      fc.oneof(
        fc.uint8Array({ maxLength: 40 }).map((u) => sshString(Buffer.from(u))),
        fc.constantFrom('ssh-ed25519', 'ssh-rsa', 'ecdsa-sha2-nistp256', 'ssh-ed25519-cert-v01@openssh.com', 'sk-ssh-ed25519@openssh.com', EXT_RESTRICT_DESTINATION).map(sshString),
        fc.nat().map(u32),
        fc.constantFrom(...[1, 2, 3, 255].map((c) => Buffer.of(c))),
        fc.uint8Array({ maxLength: 8 }).map((u) => Buffer.from(u)),
      ),
      { maxLength: 10 },
    ),
  )
  .map(([code, parts]) => Buffer.concat([Buffer.of(code), ...parts]));

describe('add/remove/lock parsing properties', () => {
  it('random key-operation frames return a request or throw WireFormatError, quickly', () => {
    fc.assert(fc.property(randomKeyOperationArb, (bytes) => void parseBounded(bytes)), { numRuns: RUNS });
  });

  it('damaged golden frames return a request or throw WireFormatError, quickly', () => {
    let refused = 0;
    fc.assert(
      fc.property(damagedGoldenArb, (bytes) => {
        if (parseBounded(bytes) instanceof WireFormatError) refused++;
      }),
      { numRuns: RUNS },
    );
    expect(refused).toBeGreaterThan(0);
  });

  it('a damaged key never yields a KeyObject whose public key differs from the one the request claims', () => {
    let accepted = 0;
    fc.assert(
      fc.property(fc.constantFrom(...plainAdds).chain(({ keyType, payload }) => damagedArb(payload).map((bytes) => ({ keyType, bytes }))), ({ keyType, bytes }) => {
        const result = parseBounded(bytes);
        if (result instanceof WireFormatError || result.type !== 'add-identity') return;
        accepted++;
        const claimed = claimedPublicBlob(bytes);
        expect(result.key.publicBlob.equals(claimed)).toBe(true);
        expect(describeKey(createPublicKey(result.key.key)).blob.equals(claimed)).toBe(true);
        const data = Buffer.from('keyhold add fuzz');
        expect(verifySsh(claimed, signSsh(result.key.key, signatureAlgorithmFor(keyType, 4), data), data)).toBe(true);
      }),
      { numRuns: RUNS },
    );
    // Damage in the comment or in padding leaves the key whole: some must be accepted.
    expect(accepted).toBeGreaterThan(0);
  });

  it('a damaged certificate add that parses carries a certificate that verifies under its CA and certifies the key it carries', () => {
    let accepted = 0;
    fc.assert(
      fc.property(fc.constantFrom(...certificateAdds).chain(({ keyType, payload }) => damagedArb(payload).map((bytes) => ({ keyType, bytes }))), ({ keyType, bytes }) => {
        const result = parseBounded(bytes);
        if (result instanceof WireFormatError || result.type !== 'add-identity') return;
        accepted++;
        const cert = result.key.certificate!;
        expect(verifyCertificate(cert)).toBe(true);
        expect(result.key.publicBlob.equals(cert.publicBlob)).toBe(true);
        expect(describeKey(createPublicKey(result.key.key)).blob.equals(cert.publicBlob)).toBe(true);
        const data = Buffer.from('keyhold cert add fuzz');
        expect(verifySsh(cert.publicBlob, signSsh(result.key.key, signatureAlgorithmFor(keyType, 4), data), data)).toBe(true);
      }),
      { numRuns: RUNS },
    );
    expect(accepted).toBeGreaterThan(0);
  });

  it('a private part that does not belong to the public part is refused, for every key type', () => {
    for (const { keyType, payload } of plainAdds) {
      // The last byte of the key's private part (ed25519: pub's copy; ecdsa: d; rsa: q) is just
      // before the comment, the last field.
      const comment = findCommentOffset(payload);
      const damaged = Buffer.from(payload);
      damaged[comment - 1] = damaged[comment - 1]! ^ 0x01;
      expect(() => parseRequest(damaged), keyType).toThrow(WireFormatError);
    }
  });
});

/** Offset of the comment's length field in an unconstrained golden add (the comment is the last field). */
function findCommentOffset(payload: Buffer): number {
  for (let offset = payload.length - 4; offset > 0; offset--) {
    if (payload.readUInt32BE(offset) === payload.length - offset - 4) return offset;
  }
  throw new Error('no comment found');
}

describe('constraints', () => {
  const hostKey = (() => {
    const raw = Buffer.from(generateKeyPairSync('ed25519').publicKey.export({ format: 'jwk' }).x!, 'base64url');
    return Buffer.concat([sshString('ssh-ed25519'), sshString(raw)]);
  })();
  const name = fc.stringMatching(/^[a-z0-9.-]{1,20}$/);
  const keys = fc.array(fc.boolean().map((isCa) => ({ keyBlob: hostKey, isCa })), { minLength: 1, maxLength: 3 });
  const constraintsArb: fc.Arbitrary<KeyConstraints> = fc.record({
    lifetimeSeconds: fc.option(fc.nat({ max: 0xffffffff }), { nil: null }),
    confirm: fc.boolean(),
    destinations: fc.array(
      fc.record({
        from: fc.oneof(
          fc.constant(null).map((): DestinationHop => ({ user: null, hostname: null, hostKeys: [] })),
          fc.record({ user: fc.constant(null), hostname: name, hostKeys: keys }),
        ),
        to: fc.record({ user: fc.option(name, { nil: null }), hostname: name, hostKeys: keys }),
      }),
      { maxLength: 3 },
    ),
  });

  it('round-trip: what we write, we read back', () => {
    fc.assert(
      fc.property(constraintsArb, (constraints) => {
        const bytes = writeConstraints(new WireWriter(), constraints).toBuffer();
        expect(readConstraints(new WireReader(bytes))).toEqual(constraints);
      }),
      { numRuns: RUNS },
    );
  });

  it('an unknown constraint, an unknown extension or a repeated one is malformed (as OpenSSH)', () => {
    const read = (bytes: Buffer) => () => readConstraints(new WireReader(bytes));
    for (const code of [0, 3, 4, 100, 254]) expect(read(Buffer.concat([Buffer.of(code), u32(10)]))).toThrow(WireFormatError);
    expect(read(Buffer.concat([Buffer.of(CONSTRAIN.EXTENSION), sshString('sk-provider@openssh.com'), sshString('internal')]))).toThrow(/unsupported constraint extension/);
    expect(read(Buffer.concat([Buffer.of(CONSTRAIN.EXTENSION), sshString('future@example.com'), sshString('')]))).toThrow(WireFormatError);
    expect(read(Buffer.of(CONSTRAIN.CONFIRM, CONSTRAIN.CONFIRM))).toThrow(/twice/);
    expect(read(Buffer.concat([Buffer.of(CONSTRAIN.LIFETIME), u32(1), Buffer.of(CONSTRAIN.LIFETIME), u32(2)]))).toThrow(/twice/);
  });

  it('a destination without a "to" host or keys, or with a "from" user, is malformed (as OpenSSH)', () => {
    const hop = (user: string, host: string, withKey: boolean) =>
      Buffer.concat([sshString(user), sshString(host), sshString(''), ...(withKey ? [sshString(hostKey), Buffer.of(0)] : [])]);
    const constraint = (from: Buffer, to: Buffer) =>
      Buffer.concat([Buffer.of(CONSTRAIN.EXTENSION), sshString(EXT_RESTRICT_DESTINATION), sshString(sshString(Buffer.concat([sshString(from), sshString(to), sshString('')])))]);
    const read = (bytes: Buffer) => () => readConstraints(new WireReader(bytes));
    expect(read(constraint(hop('', '', false), hop('', 'host', true)))()).toMatchObject({ destinations: [{ to: { hostname: 'host' } }] });
    expect(read(constraint(hop('', '', false), hop('git', '', false)))).toThrow(/incomplete "to"/);
    expect(read(constraint(hop('', '', false), hop('', 'host', false)))).toThrow(/incomplete "to"/);
    expect(read(constraint(hop('root', 'a', true), hop('', 'host', true)))).toThrow(/inconsistent "from"/);
    expect(read(constraint(hop('', 'a', false), hop('', 'host', true)))).toThrow(/inconsistent "from"/);
    expect(read(constraint(hop('', 'a\0b', false), hop('', 'host', true)))).toThrow(/NUL/);
  });
});

describe('remove and lock bodies', () => {
  it('are malformed with trailing bytes, a truncated string, or a NUL inside a passphrase (OpenSSH reads a C string)', () => {
    const bad = [
      Buffer.of(MSG.REMOVE_ALL_IDENTITIES, 0),
      Buffer.concat([Buffer.of(MSG.REMOVE_IDENTITY), sshString('blob'), Buffer.of(0)]),
      Buffer.concat([Buffer.of(MSG.REMOVE_IDENTITY), u32(9), Buffer.from('blob')]),
      Buffer.concat([Buffer.of(MSG.LOCK), sshString('pass'), Buffer.of(0)]),
      Buffer.concat([Buffer.of(MSG.UNLOCK), sshString('pa\0ss')]),
      Buffer.of(MSG.UNLOCK),
    ];
    for (const bytes of bad) expect(() => parseRequest(bytes), bytes.toString('hex')).toThrow(WireFormatError);
    expect(parseRequest(Buffer.concat([Buffer.of(MSG.LOCK), sshString('')]))).toEqual({ type: 'lock', passphrase: Buffer.alloc(0) });
  });

  it('security-key and DSA keys (and their certificates) are refused as unsupported, naming the type', () => {
    for (const type of ['sk-ssh-ed25519@openssh.com', 'sk-ecdsa-sha2-nistp256@openssh.com', 'ssh-dss', 'ssh-dss-cert-v01@openssh.com', 'sk-ssh-ed25519-cert-v01@openssh.com']) {
      expect(() => parseRequest(Buffer.concat([Buffer.of(MSG.ADD_IDENTITY), sshString(type), sshString('x')]))).toThrow(UnsupportedAddError);
    }
    expect(() => parseRequest(Buffer.concat([Buffer.of(MSG.ADD_IDENTITY), sshString('sk-ssh-ed25519@openssh.com')]))).toThrow(/security keys/);
  });
});
