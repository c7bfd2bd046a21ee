// Audit before reply (PRODUCT.md, "Guarantees"): no signature leaves the daemon before its audit
// line is written to the log file, and acknowledged changes are audited before the
// acknowledgement; so kill -9 at any moment leaves a line for everything a client got back.
import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import {
  bare,
  completeEntries,
  expectAuditVerifies,
  killLaunched,
  run,
  sleep,
  SigningLoad,
  unauditedSignatures,
} from '../helpers/audit.js';
import {
  daemonPid,
  initVault,
  keyholdOk,
  makeKeyholdEnv,
  processAlive,
  startServe,
  stopAllServes,
  waitFor,
  type KeyholdEnv,
} from '../helpers/keyhold.js';

const envs: KeyholdEnv[] = [];

afterEach(async () => {
  killLaunched();
  await stopAllServes();
  for (const k of envs.splice(0)) k.cleanup();
});

function newVault(prefix: string): KeyholdEnv {
  const k = makeKeyholdEnv(prefix);
  envs.push(k);
  initVault(k);
  return k;
}

async function kill9(pid: number): Promise<void> {
  process.kill(pid, 'SIGKILL');
  await waitFor(() => !processAlive(pid), 10_000, 'the daemon to die');
}

describe('kill -9 of the daemon under signing load', () => {
  it('every signature a client received has its sign line, at random kill moments (3 rounds, 24 pipelined clients)', async () => {
    const k = newVault('kh-audit-kill-');
    keyholdOk(k, ['key', 'generate', 'web']);
    let total = 0;
    for (let round = 0; round < 3; round++) {
      const serve = await startServe(k);
      const load = new SigningLoad(serve.socket('web'), 24, 4, `r${round}`);
      // Under way first (a loaded machine may take a while to connect 24 clients), then a random moment.
      await waitFor(() => load.received.size > 100, 10_000, 'the load to sign');
      await sleep(Math.random() * 1200);
      await kill9(serve.proc.pid!);
      await load.stop();
      await serve.stop();
      expect(load.received.size, 'the load signed something before the kill').toBeGreaterThan(100);
      const missing = unauditedSignatures(k, load.received);
      expect(missing.length, `round ${round}: ${missing.length} of ${load.received.size} received signatures have no audit line`).toBe(0);
      total += load.received.size;
    }
    console.log(`audit-kill: ${total} signatures received across 3 kills, every one audited`);
    await expectAuditVerifies(k);
  }, 60_000);
});

describe('kill -9 right after a change through the daemon was acknowledged', () => {
  it('secret set/get/rm, token issue, key generate/rm: each acknowledged operation has its line', async () => {
    const k = newVault('kh-audit-ack-');
    keyholdOk(k, ['key', 'generate', 'web']);
    const b = bare(k);
    const operations: { args: string[]; input?: string; line: (e: ReturnType<typeof completeEntries>[number]) => boolean }[] = [
      { args: ['secret', 'set', 'ci', 'TOKEN_A'], input: randomBytes(8).toString('hex'), line: (e) => e.event === 'secret-set' && e.name === 'TOKEN_A' },
      { args: ['secret', 'get', 'ci', 'TOKEN_A'], line: (e) => e.event === 'secret-read' && e.name === 'TOKEN_A' },
      { args: ['secret', 'rm', 'ci', 'TOKEN_A'], line: (e) => e.event === 'secret-removed' && e.name === 'TOKEN_A' },
      { args: ['token', 'issue', 'ci', '--subject', 'job-1'], line: (e) => e.event === 'token-issued' && e.subject === 'job-1' },
      { args: ['key', 'generate', 'ops', '--comment', 'ops-key'], line: (e) => e.event === 'key-added' && e.scope === 'ops' },
    ];
    for (const op of operations) {
      const serve = await startServe(k);
      const done = await run(b, op.args, op.input);
      await kill9(serve.proc.pid!);
      await serve.stop();
      expect(done.code, `${op.args.join(' ')}: ${done.stderr}`).toBe(0);
      expect(completeEntries(k).some(op.line), `audit line for acknowledged \`keyhold ${op.args.join(' ')}\``).toBe(true);
    }
    // And a key removal, whose fingerprint comes from the listing.
    const fp = (JSON.parse(keyholdOk(k, ['key', 'list', '--scope', 'ops', '--json'])) as { fingerprint: string }[])[0]!.fingerprint;
    const serve = await startServe(k);
    const removed = await run(b, ['key', 'rm', fp]);
    await kill9(serve.proc.pid!);
    await serve.stop();
    expect(removed.code, removed.stderr).toBe(0);
    expect(completeEntries(k).some((e) => e.event === 'key-removed' && e.fingerprint === fp), 'audit line for acknowledged key rm').toBe(true);
    await expectAuditVerifies(k);
    expect(daemonPid(k.runtime) === null || !processAlive(daemonPid(k.runtime)!)).toBe(true);
  }, 60_000);
});

