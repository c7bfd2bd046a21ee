// End-to-end: confirmations with a real daemon and real clients. A waiting `ssh-keygen -Y sign`
// is approved, denied or timed out by `keyhold approve/deny` from another process (or by
// `approve --watch`, or a confirm program) while `ssh-add -l` on the same scope answers at once;
// remember covers the same process only; a rate refuses the 4th; hundreds of waiting requests stay
// bounded; a client that hangs up leaves nothing listed; a scope without a policy writes today's
// audit fields.
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { completeEntries, type Entry } from '../helpers/audit.js';
import {
  daemonPid,
  initVault,
  keyhold,
  keyholdOk,
  makeKeyholdEnv,
  startServe,
  stopAllServes,
  waitFor,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';
import {
  listApprovals,
  killWaiting,
  residentKiB,
  setPolicyThroughDaemon,
  spawnWaiting,
  waitForApprovals,
  type Waiting,
} from '../helpers/policy-daemon.js';
import { RawConn, signRequestFrame, verifyEd25519 } from '../helpers/raw-wire.js';

const CONFIRM_GIT = { default: 'deny', rules: [{ action: 'confirm', purpose: 'sshsig', namespaces: ['git'] }] } as const;

interface Fixture {
  k: KeyholdEnv;
  serve: ServeHandle;
  pubFile: string;
  blob: Buffer;
  msgFile: string;
  socket: string;
}

/** A vault with one key in `web` and one in `plain`, and a daemon started with `serveArgs`. */
async function fixture(serveArgs: string[] = []): Promise<Fixture> {
  const k = makeKeyholdEnv('keyhold-confirm-');
  initVault(k);
  const pubLine = keyholdOk(k, ['key', 'generate', 'web', '--comment', 'deploy']).trim();
  keyholdOk(k, ['key', 'generate', 'plain']);
  const pubFile = join(k.dir, 'web.pub');
  writeFileSync(pubFile, pubLine + '\n');
  const msgFile = join(k.dir, 'message');
  writeFileSync(msgFile, 'commit 1\n');
  const serve = await startServe(k, serveArgs);
  return { k, serve, pubFile, blob: Buffer.from(pubLine.split(' ')[1]!, 'base64'), msgFile, socket: serve.socket('web') };
}

function signWithKeygen(f: Fixture, namespace = 'git', socket = f.socket): Waiting {
  const msg = join(mkdtempSync(join(f.k.dir, 'sig-')), 'message');
  writeFileSync(msg, `signed ${Math.random()}\n`);
  return spawnWaiting('ssh-keygen', ['-Y', 'sign', '-n', namespace, '-f', f.pubFile, msg], { ...process.env, SSH_AUTH_SOCK: socket });
}

const signEntries = (k: KeyholdEnv): Entry[] => completeEntries(k).filter((e) => e.event === 'sign' || e.event === 'sign-refused');
const lastSign = (k: KeyholdEnv): Entry => signEntries(k).at(-1)!;

function sshAddList(socket: string): { status: number | null; ms: number } {
  const started = Date.now();
  const r = spawnSync('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: socket }, encoding: 'utf8', timeout: 10_000 });
  return { status: r.status, ms: Date.now() - started };
}

afterEach(() => {
  killWaiting();
});

afterAll(async () => {
  await stopAllServes();
});

describe('keyhold approve / deny from another process', () => {
  let f: Fixture;
  beforeAll(async () => {
    // 10 s: a request waits through up to four CLI runs (listing, approving) before its answer,
    // each a second or more on a loaded machine; 4 s was within reach.
    f = await fixture(['--confirm-timeout', '10s']);
    await setPolicyThroughDaemon(f.k, 'web', CONFIRM_GIT as never);
  });
  afterAll(() => f.k.cleanup());

  it('a waiting ssh-keygen -Y sign is listed, ssh-add -l answers meanwhile, and `keyhold approve ID` lets it sign', async () => {
    const signer = signWithKeygen(f);
    const [pending] = await waitForApprovals(f.k, 1);
    expect(pending).toMatchObject({ scope: 'web', purpose: 'sshsig', namespace: 'git', rule: 1, key: { comment: 'deploy' } });
    expect(pending!.caller.exe).toMatch(/ssh-keygen$/);
    expect(pending!.caller.pid).toBe(signer.proc.pid);
    const table = keyholdOk(f.k, ['approvals']);
    expect(table.split('\n')[0]).toMatch(/^ID\s+SCOPE\s+KEY\s+PURPOSE\s+HOST\/NAMESPACE\s+CALLER\s+WAITING$/);
    expect(table).toContain(pending!.id);

    const list = sshAddList(f.socket);
    expect(list.status).toBe(0);
    // Well under the 10 s a request blocked behind the confirmation would take.
    expect(list.ms).toBeLessThan(5_000);

    expect(keyhold(f.k, ['approve', pending!.id]).status).toBe(0);
    const done = await signer.done;
    expect(done.code, done.stderr).toBe(0);
    expect(lastSign(f.k)).toMatchObject({ event: 'sign', decision: 'confirm', rule: 1, purpose: 'sshsig', namespace: 'git', approved_by: { channel: 'control' } });
    expect(listApprovals(f.k)).toEqual([]);
    expect(keyholdOk(f.k, ['audit', 'tail', '-n', '1'])).toMatch(/decision=confirm rule=1 purpose=sshsig namespace="git" approved-by=control\(pid \d+ uid \d+\)/);
  });

  it('denied: ssh-keygen fails; timed out: it fails after the confirm timeout', async () => {
    const denied = signWithKeygen(f);
    const [pending] = await waitForApprovals(f.k, 1);
    expect(keyhold(f.k, ['deny', pending!.id]).status).toBe(0);
    expect((await denied.done).code).not.toBe(0);
    expect(lastSign(f.k)).toMatchObject({ event: 'sign-refused', reason: 'denied', decision: 'confirm', denied_by: { channel: 'control' } });

    const started = Date.now();
    const late = signWithKeygen(f);
    expect((await late.done).code).not.toBe(0);
    expect(Date.now() - started).toBeGreaterThanOrEqual(9_500);
    expect(lastSign(f.k)).toMatchObject({ event: 'sign-refused', reason: 'confirm-timeout' });
  });

  it('a namespace no rule confirms is refused at once (policy); an unknown id exits 5', async () => {
    const refused = signWithKeygen(f, 'file');
    expect((await refused.done).code).not.toBe(0);
    expect(lastSign(f.k)).toMatchObject({ event: 'sign-refused', reason: 'policy', decision: 'deny', rule: 'default', namespace: 'file' });
    expect(keyhold(f.k, ['approve', 'zzzzzzzz']).status).toBe(5);
    expect(keyhold(f.k, ['deny', 'zzzzzzzz']).status).toBe(5);
  });

  it('a client that hangs up while it waits leaves no entry in `approvals`', async () => {
    const signer = signWithKeygen(f);
    await waitForApprovals(f.k, 1);
    signer.proc.kill('SIGKILL');
    await waitForApprovals(f.k, 0, 3_000);
    await waitFor(() => lastSign(f.k)?.reason === 'withdrawn', 3_000, 'the withdrawal in the audit log');
  });

  it('approve --watch asks y/n for each new request, reading lines from a pipe, and ends at end of input', async () => {
    const watcher = spawnWaiting(process.execPath, [join(import.meta.dirname, '..', '..', 'bin', 'keyhold'), 'approve', '--watch'], f.k.env);
    const first = signWithKeygen(f);
    await waitFor(() => /approve [a-z2-7]{8}\? \[y\/N\] $/.test(watcher.stdout()), 10_000, 'the question');
    expect(watcher.stdout()).toContain('ssh-keygen signature in namespace git');
    watcher.proc.stdin!.write('y\n');
    expect((await first.done).code).toBe(0);
    const second = signWithKeygen(f);
    await waitFor(() => (watcher.stdout().match(/\[y\/N\] /g) ?? []).length === 2, 10_000, 'the second question');
    watcher.proc.stdin!.write('n\n');
    expect((await second.done).code).not.toBe(0);
    watcher.proc.stdin!.end();
    const ended = await watcher.done;
    expect(ended.code).toBe(0);
    expect(ended.stdout).toMatch(/approved [a-z2-7]{8}\n[^]*denied [a-z2-7]{8}\n/);
  });
});

describe('remember and rate', () => {
  let f: Fixture;
  beforeAll(async () => {
    // No test here waits for the timeout; a long one keeps the flood's "all gone when the clients
    // are" from passing by timing out instead.
    f = await fixture(['--confirm-timeout', '60s']);
  });
  afterAll(() => f.k.cleanup());

  it('remember = "1m": the same process is not asked again (another connection too); another pid is', async () => {
    await setPolicyThroughDaemon(f.k, 'web', { default: 'deny', rules: [{ action: 'confirm', remember: '1m' }] });
    const data = Buffer.from('other data 1');
    const first = await RawConn.connect(f.socket);
    first.send(signRequestFrame(f.blob, data));
    const [pending] = await waitForApprovals(f.k, 1);
    expect(pending!.caller.pid).toBe(process.pid);
    keyholdOk(f.k, ['approve', pending!.id]);
    expect(verifyEd25519(f.blob, data, await first.reply(5_000))).toBe(true);

    const second = await RawConn.connect(f.socket);
    const more = Buffer.from('other data 2');
    second.send(signRequestFrame(f.blob, more));
    expect(verifyEd25519(f.blob, more, await second.reply(5_000))).toBe(true);
    expect(lastSign(f.k)).toMatchObject({ event: 'sign', decision: 'confirm', approved_by: { channel: 'remembered' } });
    first.close();
    second.close();

    const stranger = signWithKeygen(f);
    const [asked] = await waitForApprovals(f.k, 1);
    expect(asked!.caller.pid).toBe(stranger.proc.pid);
    keyholdOk(f.k, ['deny', asked!.id]);
    expect((await stranger.done).code).not.toBe(0);
  });

  it('approve --remember D covers the process even when the rule has no remember', async () => {
    await setPolicyThroughDaemon(f.k, 'web', { default: 'confirm', rules: [] });
    const conn = await RawConn.connect(f.socket);
    conn.send(signRequestFrame(f.blob, Buffer.from('a')));
    const [pending] = await waitForApprovals(f.k, 1);
    keyholdOk(f.k, ['approve', pending!.id, '--remember', '5m']);
    expect((await conn.reply(5_000))[0]).toBe(14);
    conn.send(signRequestFrame(f.blob, Buffer.from('b')));
    expect((await conn.reply(5_000))[0]).toBe(14);
    expect(lastSign(f.k)).toMatchObject({ rule: 'default', approved_by: { channel: 'remembered' } });
    conn.close();
  });

  it('rate = "3/m": the 4th signature of a process within the minute is refused (rate)', async () => {
    await setPolicyThroughDaemon(f.k, 'web', { default: 'deny', rules: [{ action: 'allow', rate: '3/m' }] });
    const conn = await RawConn.connect(f.socket);
    const types: number[] = [];
    for (let i = 0; i < 4; i++) {
      conn.send(signRequestFrame(f.blob, Buffer.from(`rate ${i}`)));
      types.push((await conn.reply(5_000))[0]!);
    }
    expect(types).toEqual([14, 14, 14, 5]);
    expect(lastSign(f.k)).toMatchObject({ event: 'sign-refused', reason: 'rate', decision: 'allow', rule: 1 });
    conn.close();
  });

  it('a scope without a policy writes exactly the audit fields it always did', async () => {
    const plainPub = join(f.k.dir, 'plain.pub');
    writeFileSync(plainPub, keyholdOk(f.k, ['key', 'pub', 'plain']));
    const msg = join(f.k.dir, 'plain-message');
    writeFileSync(msg, 'x\n');
    const r = spawnSync('ssh-keygen', ['-Y', 'sign', '-n', 'git', '-f', plainPub, msg], { env: { ...process.env, SSH_AUTH_SOCK: f.serve.socket('plain') }, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(Object.keys(lastSign(f.k)).sort()).toEqual(['algorithm', 'data_sha256', 'event', 'fingerprint', 'mac', 'peer', 'prev', 'scope', 'seq', 'time']);
  });

  it('500 waiting requests from 17 processes: 64 wait, the rest are refused (too-many-pending), the daemon stays small and answers; all gone when the clients are', async () => {
    await setPolicyThroughDaemon(f.k, 'web', { default: 'confirm', rules: [] });
    const pid = daemonPid(f.k.runtime)!;
    const before = residentKiB(pid);
    const frame = signRequestFrame(f.blob, Buffer.from('flood')).toString('base64');
    // Each child opens its connections, sends one request on each and waits (for replies or a kill).
    const script = `
      const net = require('node:net');
      const frame = Buffer.from(${JSON.stringify(frame)}, 'base64');
      let replies = 0;
      for (let i = 0; i < Number(process.argv[1]); i++) {
        const s = net.connect(process.argv[2], () => s.write(frame));
        s.on('data', () => { if (++replies % 10 === 0) process.stdout.write('.'); });
        s.on('error', () => {});
      }
      setInterval(() => {}, 1000);`;
    const children = Array.from({ length: 17 }, (_, i) =>
      spawnWaiting(process.execPath, ['-e', script, String(i < 7 ? 30 : 29), f.socket], process.env),
    );
    await waitForApprovals(f.k, 64, 20_000);
    await waitFor(() => signEntries(f.k).filter((e) => e.reason === 'too-many-pending').length >= 500 - 64, 20_000, 'the refusals');
    expect(sshAddList(f.socket).ms).toBeLessThan(5_000);
    expect(residentKiB(pid) - before).toBeLessThan(64 * 1024);
    await waitFor(() => f.serve.stderr().includes('too many sign requests wait for a confirmation'), 3_000, 'the log line');
    expect(f.serve.stderr().match(/too many sign requests wait for a confirmation/g)).toHaveLength(1);
    for (const child of children) child.proc.kill('SIGKILL');
    await waitForApprovals(f.k, 0, 5_000);
    expect(f.serve.proc.exitCode).toBe(null);
  });
});

describe('a confirm program', () => {
  const home = makeKeyholdEnv('keyhold-askpass-');
  afterAll(() => home.cleanup());
  const scripts = mkdtempSync(join(home.dir, 'bin-'));
  const script = (name: string, body: string) => {
    const path = join(scripts, name);
    writeFileSync(path, `#!/bin/sh\n${body}\n`);
    chmodSync(path, 0o700);
    return path;
  };

  async function withProgram(program: string, test: (f: Fixture) => Promise<void>): Promise<void> {
    // None of these waits for the timeout; it only must not fire before `keyhold approve`.
    const f = await fixture(['--confirm-timeout', '10s', '--confirm-program', program]);
    try {
      await setPolicyThroughDaemon(f.k, 'web', CONFIRM_GIT as never);
      await test(f);
    } finally {
      await f.serve.stop();
      f.k.cleanup();
    }
  }

  it('that prints nothing and exits 0 approves (approved_by program); exits 1 denies', async () => {
    await withProgram(script('yes', 'exit 0'), async (f) => {
      expect((await signWithKeygen(f).done).code).toBe(0);
      expect(lastSign(f.k)).toMatchObject({ event: 'sign', approved_by: { channel: 'program', program: join(scripts, 'yes') } });
    });
    await withProgram(script('no', 'exit 1'), async (f) => {
      expect((await signWithKeygen(f).done).code).not.toBe(0);
      expect(lastSign(f.k)).toMatchObject({ event: 'sign-refused', reason: 'denied', denied_by: { channel: 'program' } });
    });
  });

  it('that hangs is killed once `keyhold approve` answers; one that is missing is logged and approve still works', async () => {
    const pidFile = join(scripts, 'hang.pid');
    await withProgram(script('hang', `echo $$ > '${pidFile}'; exec sleep 60`), async (f) => {
      const signer = signWithKeygen(f);
      const [pending] = await waitForApprovals(f.k, 1);
      await waitFor(() => existsSync(pidFile), 5_000, 'the program to start');
      const programPid = Number(readFileSync(pidFile, 'utf8'));
      keyholdOk(f.k, ['approve', pending!.id]);
      expect((await signer.done).code).toBe(0);
      await waitFor(() => !existsSync(`/proc/${programPid}`) || readFileSync(`/proc/${programPid}/stat`, 'utf8').includes(') Z'), 5_000, 'the program to be killed');
    });
    await withProgram(join(scripts, 'missing'), async (f) => {
      const signer = signWithKeygen(f);
      const [pending] = await waitForApprovals(f.k, 1);
      keyholdOk(f.k, ['approve', pending!.id]);
      expect((await signer.done).code).toBe(0);
      expect(f.serve.stderr()).toContain('cannot run the confirm program');
    });
  });
});

describe('without a daemon', () => {
  it('approvals, approve and deny exit 3', () => {
    const k = makeKeyholdEnv('keyhold-confirm-none-');
    try {
      initVault(k);
      expect(keyhold(k, ['approvals']).status).toBe(3);
      expect(keyhold(k, ['approve', 'abcdefgh']).status).toBe(3);
      expect(keyhold(k, ['deny', 'abcdefgh']).status).toBe(3);
    } finally {
      k.cleanup();
    }
  });
});
