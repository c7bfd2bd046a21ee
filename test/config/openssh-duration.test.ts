// OpenSSH's time format as `ssh-agent -t` takes it, for `keyhold serve --add-lifetime`.
import { describe, expect, it } from 'vitest';
import { parseOpenSshDuration } from '../../src/duration.js';

describe('parseOpenSshDuration', () => {
  it('plain seconds and unit pairs run together, any case, as sshd_config(5) TIME FORMATS', () => {
    expect(parseOpenSshDuration('0')).toBe(0);
    expect(parseOpenSshDuration('600')).toBe(600);
    expect(parseOpenSshDuration('90s')).toBe(90);
    expect(parseOpenSshDuration('10m')).toBe(600);
    expect(parseOpenSshDuration('1h30m')).toBe(5400);
    expect(parseOpenSshDuration('1H30M')).toBe(5400);
    expect(parseOpenSshDuration('2d')).toBe(172_800);
    expect(parseOpenSshDuration('1w')).toBe(604_800);
  });

  it('refuses anything else, and lifetimes a uint32 of seconds cannot carry', () => {
    for (const bad of ['', ' ', '-1', '1.5', '1y', 'h', '1h 30m', '30m1', '4294967296', '100000000w']) {
      expect(() => parseOpenSshDuration(bad), bad).toThrow(/invalid lifetime/);
    }
  });
});
