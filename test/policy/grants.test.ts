// Remember grants and rate counters on their own: who they belong to (a process by pid and start
// time, a token), expiry, refill, and bounded memory.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { compilePolicy } from '../../src/policy/compile.js';
import { MAX_GRANTS, MAX_RATE_COUNTERS, peerAccount, peerIdentity, PolicyState } from '../../src/policy/grants.js';
import type { RequestContext } from '../../src/signer/backend.js';
import { processStartTime } from '../../src/signer/unix-listener.js';

const unix = (pid: number, processStart: string | null): RequestContext => ({
  peer: { kind: 'unix', pid, uid: 1000, gid: 1000, exe: '/usr/bin/ssh' },
  bindings: [],
  processStart,
});

describe('peer identity', () => {
  it('a process is its pid and start time; a token its id; a process whose start is unknown gets no identity', () => {
    expect(peerIdentity(unix(10, '123'))).toBe('process:10:123');
    expect(peerIdentity(unix(10, null))).toBe(null);
    expect(peerAccount(unix(10, null))).toBe('pid:10');
    expect(peerIdentity({ peer: { kind: 'tcp', address: '127.0.0.1', port: 5 }, bindings: [], tokenId: 'tok' })).toBe('token:tok');
  });

  it('processStartTime reads field 22 of /proc/PID/stat; another process has its own; a gone one has none', async () => {
    const own = readFileSync('/proc/self/stat', 'utf8');
    expect(processStartTime(process.pid)).toBe(own.slice(own.lastIndexOf(')') + 2).split(' ')[19]);
    // A command name with spaces and parentheses does not shift the fields.
    const dir = mkdtempSync(join(tmpdir(), 'keyhold-comm-'));
    const oddName = join(dir, 'x) (y z');
    symlinkSync(execFileSync('sh', ['-c', 'command -v sleep'], { encoding: 'utf8' }).trim(), oddName);
    const child = spawn(oddName, ['5']);
    expect(readFileSync(`/proc/${child.pid}/stat`, 'utf8')).toContain('(x) (y z)');
    await new Promise((r) => setTimeout(r, 200));
    const start = processStartTime(child.pid!);
    expect(start).toMatch(/^\d+$/);
    expect(Number(start)).toBeGreaterThanOrEqual(Number(processStartTime(process.pid)));
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    await new Promise((r) => setTimeout(r, 50));
    expect(processStartTime(child.pid!)).toBe(null);
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('PolicyState', () => {
  const policy = compilePolicy({ default: 'deny', rules: [{ action: 'allow', rate: '2/10s' }, { action: 'confirm', remember: '1m' }] });

  it('grants last their time, for that peer, key and rule only', () => {
    const state = new PolicyState(policy, 0);
    state.grant('process:1:5', 'SHA256:k', 1, 60_000, 0);
    expect(state.granted('process:1:5', 'SHA256:k', 1, 59_999)).toBe(true);
    expect(state.granted('process:1:5', 'SHA256:k', 1, 60_000)).toBe(false);
    expect(state.granted('process:1:6', 'SHA256:k', 1, 1)).toBe(false);
    expect(state.granted('process:1:5', 'SHA256:j', 1, 1)).toBe(false);
    expect(state.granted('process:1:5', 'SHA256:k', null, 1)).toBe(false);
  });

  it('a rate refills over its period, per peer', () => {
    const state = new PolicyState(policy, 0);
    const rule = policy.rules[0]!;
    expect([state.takeRate('a', rule, 0), state.takeRate('a', rule, 0), state.takeRate('a', rule, 0)]).toEqual([true, true, false]);
    expect(state.takeRate('b', rule, 0)).toBe(true);
    expect(state.takeRate('a', rule, 4_999)).toBe(false);
    expect(state.takeRate('a', rule, 5_000)).toBe(true);
  });

  it('memory stays bounded: idle counters and expired grants are swept, and each map has a cap', () => {
    const state = new PolicyState(policy, 0);
    const rule = policy.rules[0]!;
    for (let i = 0; i < MAX_RATE_COUNTERS + 100; i++) state.takeRate(`p${i}`, rule, 0);
    expect(state.sizes.counters).toBeLessThanOrEqual(MAX_RATE_COUNTERS);
    for (let i = 0; i < MAX_GRANTS + 100; i++) state.grant(`p${i}`, 'SHA256:k', 1, 1_000, 0);
    expect(state.sizes.grants).toBe(MAX_GRANTS);
    // A minute on, every counter has refilled and every grant expired: the next use sweeps them.
    state.takeRate('late', rule, 120_000);
    expect(state.sizes).toEqual({ grants: 0, counters: 1 });
  });
});
