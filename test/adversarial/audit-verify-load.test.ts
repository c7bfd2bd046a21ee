// `keyhold audit verify` through the daemon reads and checks the whole log (up to 512 MiB): it
// runs on a thread of its own, so the daemon goes on answering signatures while it does.
import { afterEach, describe, expect, it } from 'vitest';
import { bare, killLaunched, launch, sleep } from '../helpers/audit.js';
import { initVault, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, type KeyholdEnv } from '../helpers/keyhold.js';
import { identitiesFrame, parseIdentities, RawConn, signRequestFrame } from '../helpers/raw-wire.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';

const envs: KeyholdEnv[] = [];
afterEach(async () => {
  killLaunched();
  await stopAllServes();
  for (const k of envs.splice(0)) k.cleanup();
});

describe('audit verify of a large log through the daemon', () => {
  it('signatures keep being answered while it runs (300,000 lines)', async () => {
    const k = makeKeyholdEnv('kh-verify-load-');
    envs.push(k);
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web']);
    const vault = await Vault.open(vaultPaths(k.vault), async () => Buffer.from(k.passphrase));
    for (let i = 0; i < 300_000; i++) {
      void vault.record({ event: 'sign', scope: 'web', data_sha256: i.toString(16).padStart(64, '0'), fingerprint: 'SHA256:' + 'x'.repeat(43) });
      if (i % 5_000 === 4_999) vault.flushAudit();
    }
    vault.close();

    const serve = await startServe(k);
    const conn = await RawConn.connect(serve.socket('web'));
    conn.send(identitiesFrame());
    const blob = parseIdentities(await conn.reply())[0]!.blob;
    const replyTimes: number[] = [];
    let signing = true;
    const signer = (async () => {
      for (let i = 0; signing; i++) {
        conn.send(signRequestFrame(blob, Buffer.from(`during-verify-${i}`)));
        if ((await conn.reply(30_000))[0] !== 14) throw new Error('sign refused');
        replyTimes.push(Date.now());
      }
    })();
    await sleep(200);
    const verify = await launch(bare(k), ['audit', 'verify']).done;
    signing = false;
    await signer;
    conn.close();
    expect(verify.code, verify.stderr).toBe(0);
    expect(Number(/ok: (\d+) entries/.exec(verify.stdout)?.[1])).toBeGreaterThan(300_000);
    // While the daemon checked the log, the longest pause between two answers stayed a small part
    // of the check (on the event loop, the whole check would be one pause).
    const during = replyTimes.filter((t) => t >= Date.now() - verify.ms);
    const longestGap = Math.max(...during.slice(1).map((t, i) => t - during[i]!));
    console.log(`audit verify of 300,000 lines took ${verify.ms} ms (CLI included); ${during.length} signatures meanwhile, longest gap ${longestGap} ms`);
    expect(during.length).toBeGreaterThan(100);
    expect(longestGap).toBeLessThan(verify.ms / 3);
  }, 90_000);
});
