// Phantom tokens: `khp_` + 43 base64url characters (256 random bits). Only SHA-256(token) is
// stored and looked up, so checking a token compares no secret bytes and leaks no timing.
import { createHash, randomBytes } from 'node:crypto';

export const TOKEN_PREFIX = 'khp_';
export const TOKEN_PATTERN = /^khp_[A-Za-z0-9_-]{43}$/;
/** How much of a token a listing may show. */
export const TOKEN_SHOWN_CHARS = 8;

export function mintToken(): string {
  return TOKEN_PREFIX + randomBytes(32).toString('base64url');
}

export function newTokenId(): string {
  return `tok_${randomBytes(6).toString('hex')}`;
}

/** What `newTokenId` returns. */
export const TOKEN_ID_PATTERN = /^tok_[0-9a-f]{12}$/;
/** Who holds a token: up to 128 printable characters (it is shown in listings and the audit log). */
export const TOKEN_SUBJECT_PATTERN = /^[^\0-\x1f\x7f]{0,128}$/;

export function tokenHash(token: Buffer | string): Buffer {
  return createHash('sha256').update(token).digest();
}

export interface TokenRecord {
  id: string;
  scope: string;
  subject: string;
  created: string;
  expires: string | null;
  revoked: string | null;
  /** The first TOKEN_SHOWN_CHARS characters of the token. */
  prefix: string;
}

export function tokenUsable(record: TokenRecord, now = Date.now()): boolean {
  return record.revoked === null && (record.expires === null || Date.parse(record.expires) > now);
}
