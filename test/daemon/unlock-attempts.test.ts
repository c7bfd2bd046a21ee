// ssh-add -X's wrong passwords slow the next attempt down (as OpenSSH's agent), with a timer:
// the event loop keeps turning meanwhile, and a right one resets the count.
import { describe, expect, it } from 'vitest';
import { UNLOCK_DELAY_STEP_MS, UnlockAttempts } from '../../src/daemon/key-operations.js';

describe('UnlockAttempts', () => {
  it('delays each attempt by the failures before it, without blocking the event loop, and resets on success', async () => {
    const attempts = new UnlockAttempts();
    const startedAt: number[] = [];
    const answers = [false, false, true, true];
    let ticks = 0;
    const ticker = setInterval(() => ticks++, 10);
    const t0 = Date.now();
    try {
      // All four asked at once: they run one at a time, in order.
      const results = await Promise.all(
        answers.map((answer) =>
          attempts.run(async () => {
            startedAt.push(Date.now() - t0);
            return answer;
          }),
        ),
      );
      expect(results).toEqual(answers);
    } finally {
      clearInterval(ticker);
    }
    // 0, then 100 ms after one failure, then 200 ms after two; the success before the last resets.
    expect(startedAt[1]! - startedAt[0]!).toBeGreaterThanOrEqual(UNLOCK_DELAY_STEP_MS - 5);
    expect(startedAt[2]! - startedAt[1]!).toBeGreaterThanOrEqual(2 * UNLOCK_DELAY_STEP_MS - 5);
    expect(startedAt[3]! - startedAt[2]!).toBeLessThan(UNLOCK_DELAY_STEP_MS);
    expect(attempts.failed).toBe(0);
    expect(ticks).toBeGreaterThanOrEqual(10);
  });

  it('a throwing attempt counts as a failure and does not jam the queue', async () => {
    const attempts = new UnlockAttempts();
    await expect(attempts.run(() => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(attempts.failed).toBe(1);
    expect(await attempts.run(async () => true)).toBe(true);
  });
});
