import { usageError } from './errors.js';

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** The longest duration `parseDuration` returns (9,999,999 days). */
export const MAX_DURATION_MS = 9_999_999 * UNITS.d!;

/** `90s`, `30m`, `8h`, `7d` → milliseconds. */
export function parseDuration(text: string, what = 'duration'): number {
  const match = /^([1-9][0-9]{0,6})([smhd])$/.exec(text.trim());
  if (!match) throw usageError(`invalid ${what} ${JSON.stringify(text.slice(0, 40))}`, 'use a number and a unit: 90s, 30m, 8h, 7d');
  return Number(match[1]) * UNITS[match[2]!]!;
}
