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

const OPENSSH_UNITS: Record<string, number> = { s: 1, m: 60, h: 3_600, d: 86_400, w: 604_800 };
/** The longest lifetime an agent constraint can carry (a uint32 of seconds). */
const MAX_LIFETIME_SECONDS = 0xffff_ffff;

/**
 * OpenSSH's time format, as `ssh-agent -t` and `ssh-add -t` take it (sshd_config(5) TIME
 * FORMATS): plain seconds, or number-unit pairs run together (`1h30m`, `90s`, `2W`) → seconds.
 */
export function parseOpenSshDuration(text: string, what = 'lifetime'): number {
  const bad = () => usageError(`invalid ${what} ${JSON.stringify(text.slice(0, 40))}`, 'use seconds (90) or OpenSSH time units run together: 90s, 30m, 1h30m, 2d, 1w');
  if (/^[0-9]{1,10}$/.test(text)) {
    const seconds = Number(text);
    if (seconds > MAX_LIFETIME_SECONDS) throw bad();
    return seconds;
  }
  if (!/^([0-9]{1,10}[smhdwSMHDW])+$/.test(text)) throw bad();
  let total = 0;
  for (const [, count, unit] of text.matchAll(/([0-9]+)([a-zA-Z])/g)) total += Number(count) * OPENSSH_UNITS[unit!.toLowerCase()]!;
  if (total > MAX_LIFETIME_SECONDS) throw bad();
  return total;
}
