// Phantom tokens: the format (`khp_` + 43 base64url characters = 256 random bits), the hash that is
// the only thing stored, and the usable/expired/revoked rule.
import { describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import {
  mintToken,
  newTokenId,
  TOKEN_PATTERN,
  TOKEN_PREFIX,
  TOKEN_SHOWN_CHARS,
  tokenHash,
  tokenUsable,
  type TokenRecord,
} from '../../src/tokens/tokens.js';

/** The contract's format, written out independently of the implementation's constant. */
const CONTRACT_FORMAT = /^khp_[A-Za-z0-9_-]{43}$/;

describe('mintToken', () => {
  it('is khp_ + 43 base64url characters', () => {
    for (let i = 0; i < 200; i++) {
      const token = mintToken();
      expect(token).toMatch(CONTRACT_FORMAT);
      expect(token).toHaveLength(47);
      expect(token.startsWith('khp_')).toBe(true);
      // No padding, no standard-base64 characters.
      expect(token).not.toMatch(/[=+/]/);
    }
  });

  it('the 43 characters carry exactly 256 bits (decode to 32 bytes and re-encode unchanged)', () => {
    for (let i = 0; i < 200; i++) {
      const token = mintToken();
      const body = token.slice(4);
      const bytes = Buffer.from(body, 'base64url');
      expect(bytes).toHaveLength(32);
      expect(bytes.toString('base64url')).toBe(body);
    }
  });

  it('is distinct over 20,000 mints', () => {
    const seen = new Set<string>();
    for (let i = 0; i < 20_000; i++) seen.add(mintToken());
    expect(seen.size).toBe(20_000);
  });

  it('every one of the 256 bits varies (each is set in roughly half of 2,000 tokens)', () => {
    const counts = new Array<number>(256).fill(0);
    const n = 2000;
    for (let i = 0; i < n; i++) {
      const bytes = Buffer.from(mintToken().slice(4), 'base64url');
      for (let bit = 0; bit < 256; bit++) if (bytes[bit >> 3]! & (0x80 >> (bit & 7))) counts[bit]!++;
    }
    // For a fair bit, 2000 draws: mean 1000, sd ≈ 22; 800..1200 is a > 9-sigma band.
    for (let bit = 0; bit < 256; bit++) {
      expect(counts[bit], `bit ${bit}`).toBeGreaterThan(800);
      expect(counts[bit], `bit ${bit}`).toBeLessThan(1200);
    }
  });

  it('the exported pattern and prefix agree with the contract', () => {
    expect(TOKEN_PREFIX).toBe('khp_');
    expect(TOKEN_SHOWN_CHARS).toBeLessThanOrEqual(8);
    const good = 'khp_' + 'A'.repeat(43);
    expect(TOKEN_PATTERN.test(good)).toBe(true);
    for (const bad of ['khp_' + 'A'.repeat(42), 'khp_' + 'A'.repeat(44), 'khq_' + 'A'.repeat(43), 'khp_' + 'A'.repeat(42) + '=', 'khp_' + 'A'.repeat(42) + '+', '']) {
      expect(TOKEN_PATTERN.test(bad), bad).toBe(false);
    }
  });
});

describe('tokenHash', () => {
  it('is SHA-256 of the token text, equal for string and Buffer', () => {
    const token = mintToken();
    const expected = createHash('sha256').update(token, 'utf8').digest();
    expect(tokenHash(token).equals(expected)).toBe(true);
    expect(tokenHash(Buffer.from(token)).equals(expected)).toBe(true);
    expect(tokenHash(token)).toHaveLength(32);
  });

  it('differs for tokens that differ in one character', () => {
    const token = mintToken();
    const last = token.at(-1) === 'A' ? 'B' : 'A';
    const other = token.slice(0, -1) + last;
    expect(tokenHash(token).equals(tokenHash(other))).toBe(false);
  });
});

describe('newTokenId', () => {
  it('is distinct and never contains the token', () => {
    const ids = new Set<string>();
    for (let i = 0; i < 2000; i++) ids.add(newTokenId());
    expect(ids.size).toBe(2000);
    for (const id of ids) expect(id).not.toMatch(/^khp_/);
  });
});

describe('tokenUsable', () => {
  const base: TokenRecord = {
    id: 'tok_1',
    scope: 'web',
    subject: 'ci',
    created: new Date(0).toISOString(),
    expires: null,
    revoked: null,
    prefix: 'khp_abcd',
  };
  const now = Date.parse('2030-01-01T00:00:00.000Z');

  it('a token without expiry and not revoked is usable', () => {
    expect(tokenUsable(base, now)).toBe(true);
  });

  it('a token is usable until its expiry, not at or after it', () => {
    const expires = new Date(now + 1000).toISOString();
    expect(tokenUsable({ ...base, expires }, now)).toBe(true);
    expect(tokenUsable({ ...base, expires }, now + 999)).toBe(true);
    expect(tokenUsable({ ...base, expires }, now + 1000)).toBe(false);
    expect(tokenUsable({ ...base, expires }, now + 5000)).toBe(false);
  });

  it('a revoked token is not usable, whatever its expiry', () => {
    expect(tokenUsable({ ...base, revoked: new Date(now - 1).toISOString() }, now)).toBe(false);
    expect(tokenUsable({ ...base, revoked: new Date(now - 1).toISOString(), expires: new Date(now + 1e9).toISOString() }, now)).toBe(false);
  });
});
