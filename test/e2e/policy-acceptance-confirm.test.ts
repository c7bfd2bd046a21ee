// Issue 12's acceptance for `confirm` with real clients: a waiting `ssh-keygen -Y sign` is approved
// or denied by `keyhold approve/deny ID` from another process, or times out; other clients are
// served meanwhile; a confirm program (SSH_ASKPASS-style) answers by its exit code; `remember`
// covers the same process's next request and not another pid's. Each decision is audited with who
// approved it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { keyhold, KEYHOLD_BIN, waitFor } from '../helpers/keyhold.js';
import { RawConn, signRequestFrame, verifyEd25519 } from '../helpers/raw-wire.js';
import { run } from '../helpers/sshd.js';
import {
  clientEnv,
  decisions,
  keyholdAsync,
  lastSeq,
  launchClient,
  listApprovals,
  messageFile,
  setPolicy,
  shellQuote,
  startPolicyLab,
  verifySshsig,
  waitForApproval,
  waitForDecision,
  type LabKey,
  type PolicyLab,
  type Waiting,
} from '../helpers/policy-lab.js';

let lab: PolicyLab;
let key: LabKey;
const waiting: Waiting[] = [];

const CONFIRM_SSHSIG = `default = "deny"

[[rule]]
action = "confirm"
purpose = "sshsig"
`;

beforeAll(async () => {
  lab = await startPolicyLab({ prefix: 'keyhold-policy-confirm-', keyCount: 2, serveArgs: ['--confirm-timeout', '30s'] });
  key = lab.keys[0]!;
  setPolicy(lab, CONFIRM_SSHSIG);
}, 90_000);

afterAll(async () => {
  for (const w of waiting) if (!w.exited()) w.proc.kill('SIGKILL');
  await Promise.all(waiting.map((w) => w.done));
  await lab?.stop();
}, 30_000);

/** Starts `ssh-keygen -Y sign -n NS` through the scope socket without waiting for it. */
function startSign(namespace = 'git', signer: LabKey = key): { w: Waiting; msg: string } {
  const msg = messageFile(lab);
  const w = launchClient('ssh-keygen', ['-Y', 'sign', '-n', namespace, '-f', signer.pubFile, msg], clientEnv(lab.sock));
  waiting.push(w);
  return { w, msg };
}

/** The "data to be signed" of `ssh-keygen -Y sign -n NAMESPACE` (PROTOCOL.sshsig), for a raw client. */
function sshsigBlob(namespace: string): Buffer {
  const str = (b: Buffer | string) => {
    const bytes = Buffer.from(b);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(bytes.length);
    return Buffer.concat([len, bytes]);
  };
  return Buffer.concat([Buffer.from('SSHSIG'), str(namespace), str(''), str('sha512'), str(randomBytes(64))]);
}

function approvedBy(entry: Record<string, unknown>, field: 'approved_by' | 'denied_by'): Record<string, unknown> {
  const who = entry[field];
  expect(who, `${field} in ${JSON.stringify(entry)}`).toBeTypeOf('object');
  return who as Record<string, unknown>;
}

describe('keyhold approve / deny from another process', () => {
  it('a waiting ssh-keygen -Y sign is approved by `keyhold approve ID` and succeeds; ssh-add -l is answered meanwhile', async () => {
    const seq = lastSeq(lab);
    const { w, msg } = startSign();
    const pending = await waitForApproval(lab, w.proc.pid!);
    expect(pending.id).toMatch(/^[a-z2-7]{8}$/i);
    // The question names scope, key, purpose, namespace and the caller.
    const question = JSON.stringify(pending);
    for (const part of [lab.scope, key.fingerprint, 'sshsig', 'git', '/usr/bin/ssh-keygen']) expect(question).toContain(part);

    // Another client is served while the sign request waits.
    const listed = await run('ssh-add', ['-l'], { env: clientEnv(lab.sock), timeoutMs: 10_000 });
    expect(listed.code, lab.diagnostics(listed)).toBe(0);
    expect(listed.stdout).toContain(key.fingerprint);
    expect(w.exited(), 'ssh-keygen must still be waiting for its approval while ssh-add -l returned').toBe(false);

    const approve = await keyholdAsync(lab, ['approve', pending.id]);
    expect(approve.code, `keyhold approve: ${approve.stderr}`).toBe(0);
    const signed = await w.done;
    expect(signed.code, lab.diagnostics(signed)).toBe(0);
    const verified = await verifySshsig(lab, key, 'git', msg);
    expect(verified.code, verified.stdout + verified.stderr).toBe(0);

    const entry = await waitForDecision(lab, seq, { event: 'sign', decision: 'confirm', rule: 1 });
    expect(entry).toMatchObject({ purpose: 'sshsig', namespace: 'git', fingerprint: key.fingerprint });
    const who = approvedBy(entry, 'approved_by');
    expect(who.channel).toBe('control');
    expect(who.uid).toBe(process.getuid!());
    expect(who.pid).toBeTypeOf('number');
    expect(who.pid).not.toBe(w.proc.pid);
    expect(listApprovals(lab).find((p) => p.id === pending.id)).toBeUndefined();
  });

  it('`keyhold approve ID --remember 1m` also covers the same process\'s next request, and not another process', async () => {
    // The grant covers this process, key and rule: the second key keeps it away from the other tests' requests.
    const remembered = lab.keys[1]!;
    const blob = Buffer.from(remembered.pubLine.split(/\s+/)[1]!, 'base64');
    const seq = lastSeq(lab);
    const first = await RawConn.connect(lab.sock);
    const second = await RawConn.connect(lab.sock);
    try {
      first.send(signRequestFrame(blob, sshsigBlob('git')));
      const pending = await waitForApproval(lab, process.pid);
      const approve = await keyholdAsync(lab, ['approve', pending.id, '--remember', '1m']);
      expect(approve.code, approve.stderr).toBe(0);
      expect((await first.reply(10_000))[0], lab.diagnostics()).toBe(14);
      second.send(signRequestFrame(blob, sshsigBlob('git')));
      expect((await second.reply(10_000))[0], `remembered for pid ${process.pid}\n${lab.diagnostics()}`).toBe(14);
    } finally {
      first.close();
      second.close();
    }
    const signs = decisions(lab, seq).filter((e) => e.event === 'sign');
    expect(signs.map((e) => (e.approved_by as { channel?: string } | undefined)?.channel), JSON.stringify(signs)).toEqual(['control', 'remembered']);
    // ssh-keygen is another process: asked again.
    const { w } = startSign('git', remembered);
    const asked = await waitForApproval(lab, w.proc.pid!);
    expect((await keyholdAsync(lab, ['deny', asked.id])).code).toBe(0);
    expect((await w.done).code).not.toBe(0);
  });

  it('denied by `keyhold deny ID`: ssh-keygen fails and no signature is written', async () => {
    const seq = lastSeq(lab);
    const { w, msg } = startSign();
    const pending = await waitForApproval(lab, w.proc.pid!);
    const deny = await keyholdAsync(lab, ['deny', pending.id]);
    expect(deny.code, `keyhold deny: ${deny.stderr}`).toBe(0);
    const signed = await w.done;
    expect(signed.code, lab.diagnostics(signed)).not.toBe(0);
    expect(existsSync(`${msg}.sig`)).toBe(false);
    const entry = await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'confirm', rule: 1, reason: 'denied' });
    const who = approvedBy(entry, 'denied_by');
    expect(who.channel).toBe('control');
    expect(who.uid).toBe(process.getuid!());
  });

  it('`keyhold approve --watch` on a terminal asks y/n for a waiting request; y approves it', async () => {
    // A terminal for the watcher: script(1) gives it a pty whose input is our pipe.
    const watcher = spawn('script', ['-qfec', `${shellQuote(process.execPath)} ${shellQuote(KEYHOLD_BIN)} approve --watch`, '/dev/null'], {
      env: lab.k.env,
      stdio: ['pipe', 'pipe', 'pipe'],
      detached: true,
    });
    let screen = '';
    watcher.stdout!.on('data', (d: Buffer) => (screen += d.toString()));
    watcher.stderr!.on('data', (d: Buffer) => (screen += d.toString()));
    const exited = new Promise<void>((resolve) => watcher.once('exit', () => resolve()));
    try {
      const seq = lastSeq(lab);
      // A `y` typed before any question is shown must not answer the request that comes next.
      await waitFor(() => screen.includes('asking for each request'), 15_000, 'approve --watch to start');
      watcher.stdin!.write('y\n');
      await new Promise((resolve) => setTimeout(resolve, 300));
      const { w, msg } = startSign();
      const pending = await waitForApproval(lab, w.proc.pid!).catch((err: Error) => {
        throw new Error(`${err.message}; the terminal showed: ${JSON.stringify(screen)}`);
      });
      await waitFor(() => screen.includes(pending.id) || screen.includes(String(w.proc.pid)), 15_000, `approve --watch to ask about ${pending.id}`).catch(
        (err: Error) => {
          throw new Error(`${err.message}; the terminal showed: ${JSON.stringify(screen)}`);
        },
      );
      await new Promise((resolve) => setTimeout(resolve, 500));
      expect(JSON.parse(keyhold(lab.k, ['approvals', '--json']).stdout).map((a: { id: string }) => a.id), screen).toContain(pending.id);
      watcher.stdin!.write('y\n');
      const signed = await w.done;
      expect(signed.code, `${lab.diagnostics(signed)}\n--- approve --watch ---\n${screen}`).toBe(0);
      expect((await verifySshsig(lab, key, 'git', msg)).code).toBe(0);
      const entry = await waitForDecision(lab, seq, { event: 'sign', decision: 'confirm', rule: 1 });
      expect(approvedBy(entry, 'approved_by')).toMatchObject({ channel: 'control', uid: process.getuid!() });
    } finally {
      try {
        process.kill(-watcher.pid!, 'SIGTERM');
      } catch {
        /* already gone */
      }
      const timer = setTimeout(() => {
        try {
          process.kill(-watcher.pid!, 'SIGKILL');
        } catch {
          /* already gone */
        }
      }, 3000);
      await exited;
      clearTimeout(timer);
    }
  });

  it('waiting requests are bounded per process (the fifth is refused at once), and withdrawn when their client hangs up', async () => {
    const blob = Buffer.from(key.pubLine.split(/\s+/)[1]!, 'base64');
    const seq = lastSeq(lab);
    const conns: RawConn[] = [];
    try {
      for (let i = 0; i < 4; i++) {
        const conn = await RawConn.connect(lab.sock);
        conns.push(conn);
        conn.send(signRequestFrame(blob, sshsigBlob('git')));
      }
      await waitFor(() => listApprovals(lab).filter((p) => JSON.stringify(p).includes(String(process.pid))).length === 4, 15_000, 'four waiting requests');
      const fifth = await RawConn.connect(lab.sock);
      conns.push(fifth);
      fifth.send(signRequestFrame(blob, sshsigBlob('git')));
      expect((await fifth.reply(5000))[0], lab.diagnostics()).toBe(5);
      await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'confirm', rule: 1, reason: 'too-many-pending' });
      // Another process is not held up by this one's four.
      const { w } = startSign();
      const pending = await waitForApproval(lab, w.proc.pid!);
      expect((await keyholdAsync(lab, ['deny', pending.id])).code).toBe(0);
      expect((await w.done).code).not.toBe(0);
      for (const conn of conns) expect(conn.frames.length === 0 || conn === fifth).toBe(true);
    } finally {
      for (const conn of conns) conn.close();
    }
    // Hung up: nothing of this process waits any more, and the daemon goes on.
    await waitFor(() => listApprovals(lab).length === 0, 10_000, 'the hung-up requests to be withdrawn');
    const listed = await run('ssh-add', ['-l'], { env: clientEnv(lab.sock), timeoutMs: 10_000 });
    expect(listed.code, lab.diagnostics(listed)).toBe(0);
  });

  it('an unknown approval id is not found (exit 5)', async () => {
    const r = await keyholdAsync(lab, ['approve', 'aaaaaaaa']);
    expect(r.code, r.stderr).toBe(5);
  });
});

describe('lock', () => {
  it('`keyhold lock` refuses a request that waits for its approval, and lists nothing after', async () => {
    const seq = lastSeq(lab);
    const { w, msg } = startSign();
    await waitForApproval(lab, w.proc.pid!);
    const locked = await keyholdAsync(lab, ['lock']);
    expect(locked.code, locked.stderr).toBe(0);
    const signed = await w.done;
    expect(signed.code, lab.diagnostics(signed)).not.toBe(0);
    expect(existsSync(`${msg}.sig`)).toBe(false);
    expect(listApprovals(lab)).toEqual([]);
    const unlocked = await keyholdAsync(lab, ['unlock']);
    expect(unlocked.code, unlocked.stderr).toBe(0);
    // Refusals while locked are written at the next unlock.
    await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'confirm', rule: 1 });
  });
});

describe('confirm_timeout', () => {
  it('nobody answers: refused after --confirm-timeout, and the approval is gone', async () => {
    await lab.restart(['--confirm-timeout', '2s']);
    setPolicy(lab, CONFIRM_SSHSIG);
    const seq = lastSeq(lab);
    const { w, msg } = startSign();
    // Not waited for in `keyhold approvals`: on a busy machine the CLI may start after 2 s.
    const signed = await w.done;
    expect(signed.code, lab.diagnostics(signed)).not.toBe(0);
    expect(existsSync(`${msg}.sig`)).toBe(false);
    await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'confirm', rule: 1, reason: 'confirm-timeout' });
    expect(listApprovals(lab)).toEqual([]);
  });
});

describe('a confirm program', () => {
  let program: string;
  let answerFile: string;
  let questionsFile: string;
  const questions = (): string[] => (existsSync(questionsFile) ? readFileSync(questionsFile, 'utf8').split('\n').filter(Boolean) : []);
  const answer = (code: 0 | 1) => writeFileSync(answerFile, `${code}\n`);

  beforeAll(async () => {
    program = join(lab.work, 'confirm-program');
    answerFile = join(lab.work, 'confirm-answer');
    questionsFile = join(lab.work, 'confirm-questions');
    // Prints nothing; records how it was asked; answers with its exit code.
    writeFileSync(
      program,
      `#!/bin/sh
printf '%s|%s\\n' "$SSH_ASKPASS_PROMPT" "$1" | tr -d '\\n' >> '${questionsFile}'
echo >> '${questionsFile}'
exit "$(cat '${answerFile}')"
`,
    );
    chmodSync(program, 0o755);
    answer(0);
    await lab.restart(['--confirm-program', program, '--confirm-timeout', '20s']);
  }, 30_000);

  it('exit 0 approves, exit 1 denies; it is asked with SSH_ASKPASS_PROMPT=confirm and a question naming the request', async () => {
    setPolicy(lab, CONFIRM_SSHSIG);
    let seq = lastSeq(lab);
    answer(0);
    const yes = startSign();
    const approved = await yes.w.done;
    expect(approved.code, lab.diagnostics(approved)).toBe(0);
    expect((await verifySshsig(lab, key, 'git', yes.msg)).code).toBe(0);
    const asked = questions();
    expect(asked).toHaveLength(1);
    expect(asked[0]).toMatch(/^confirm\|/);
    for (const part of [lab.scope, 'git', 'ssh-keygen', String(yes.w.proc.pid)]) expect(asked[0]).toContain(part);
    const entry = await waitForDecision(lab, seq, { event: 'sign', decision: 'confirm', rule: 1 });
    expect(approvedBy(entry, 'approved_by')).toMatchObject({ channel: 'program', program });

    seq = lastSeq(lab);
    answer(1);
    const no = startSign();
    const denied = await no.w.done;
    expect(denied.code, lab.diagnostics(denied)).not.toBe(0);
    expect(existsSync(`${no.msg}.sig`)).toBe(false);
    expect(questions()).toHaveLength(2);
    const refused = await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'confirm', rule: 1, reason: 'denied' });
    expect(approvedBy(refused, 'denied_by')).toMatchObject({ channel: 'program', program });
  });

  it('remember = "1m": the same process signs again without a question, another pid is asked', async () => {
    setPolicy(
      lab,
      `default = "deny"

[[rule]]
action = "confirm"
remember = "1m"
`,
    );
    const blob = Buffer.from(key.pubLine.split(/\s+/)[1]!, 'base64');
    const signFromThisProcess = async (): Promise<Buffer> => {
      const conn = await RawConn.connect(lab.sock);
      try {
        const data = randomBytes(40);
        conn.send(signRequestFrame(blob, data));
        const reply = await conn.reply(25_000);
        if (reply[0] === 14) expect(verifyEd25519(blob, data, reply)).toBe(true);
        return reply;
      } finally {
        conn.close();
      }
    };
    const seq = lastSeq(lab);
    const before = questions().length;
    answer(0);
    expect((await signFromThisProcess())[0], lab.diagnostics()).toBe(14);
    expect(questions()).toHaveLength(before + 1);

    // From now on the program would say no: only the remembered grant can approve.
    answer(1);
    expect((await signFromThisProcess())[0], `second connection of pid ${process.pid}\n${lab.diagnostics()}`).toBe(14);
    expect(questions(), 'the remembered approval asks nobody').toHaveLength(before + 1);
    const signs = decisions(lab, seq).filter((e) => e.event === 'sign' && e.decision === 'confirm' && e.rule === 1);
    expect(signs.map((e) => (e.approved_by as { channel?: string } | undefined)?.channel), JSON.stringify(signs)).toEqual(['program', 'remembered']);

    // Another process (ssh-keygen, same key, same rule) is asked, and the program says no.
    const other = startSign();
    const r = await other.w.done;
    expect(r.code, lab.diagnostics(r)).not.toBe(0);
    expect(questions()).toHaveLength(before + 2);
  });
});

describe('audit', () => {
  it('keyhold audit tail names who answered each confirm; the log verifies', () => {
    const confirms = decisions(lab).filter((e) => e.decision === 'confirm');
    const channels = new Set(confirms.flatMap((e) => [e.approved_by, e.denied_by]).map((by) => (by as { channel?: string } | undefined)?.channel));
    for (const channel of ['control', 'program', 'remembered']) expect(channels, JSON.stringify(confirms)).toContain(channel);
    const tail = keyhold(lab.k, ['audit', 'tail', '-n', '400']);
    expect(tail.status, tail.stderr).toBe(0);
    const lines = tail.stdout.split('\n');
    for (const e of confirms) {
      const line = lines.find((l) => new RegExp(`^\\S+\\s+${e.seq} `).test(l));
      expect(line, `audit tail line of seq ${e.seq}`).toMatch(/\bdecision=confirm\b/);
      for (const field of ['approved_by', 'denied_by'] as const) {
        const channel = (e[field] as { channel?: string } | undefined)?.channel;
        if (channel) expect(line).toContain(`${field.replace('_', '-')}=${channel}`);
      }
    }
    const verify = keyhold(lab.k, ['audit', 'verify']);
    expect(verify.status, verify.stderr).toBe(0);
  });
});
