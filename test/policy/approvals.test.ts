// The approvals registry on its own: answers, deadlines (fake timers), bounds, withdrawal, the
// long-poll, channels that race; and the confirm program run for real (small scripts).
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { Approvals, describeQuestion, type ApprovalQuestion, type ConfirmChannel } from '../../src/policy/approvals.js';
import { ConfirmProgram, confirmProgramFor } from '../../src/policy/confirm-program.js';
import { recordingLogger } from '../helpers/policy-daemon.js';

const question: ApprovalQuestion = {
  scope: 'web',
  key: { fingerprint: 'SHA256:' + 'A'.repeat(43), comment: 'deploy key' },
  purpose: 'sshsig',
  namespace: 'git',
  rule: 2,
  caller: { pid: 4242, uid: 1000, exe: '/usr/bin/ssh-keygen' },
};
const control = { channel: 'control', pid: 1, uid: 1000 } as const;

function registry(options: Partial<ConstructorParameters<typeof Approvals>[0]> = {}) {
  const { log, lines } = recordingLogger();
  return { approvals: new Approvals({ timeoutMs: 30_000, log, ...options }), lines };
}

afterEach(() => {
  vi.useRealTimers();
});

describe('Approvals', () => {
  it('lists a waiting request with an 8-character id, its question and deadline; approve answers it once', async () => {
    const { approvals } = registry();
    const answer = approvals.ask(question, 'process:4242:1');
    const { approvals: list, version } = approvals.list();
    expect(list).toHaveLength(1);
    const pending = list[0]!;
    expect(pending.id).toMatch(/^[a-z2-7]{8}$/);
    expect(pending).toMatchObject({ scope: 'web', purpose: 'sshsig', namespace: 'git', rule: 2, caller: { pid: 4242 } });
    expect(Date.parse(pending.deadline) - Date.parse(pending.created)).toBe(30_000);
    expect(approvals.approve(pending.id, control, 60_000)).toBe(true);
    await expect(answer).resolves.toEqual({ approved: true, by: control, rememberMs: 60_000 });
    expect(approvals.approve(pending.id, control)).toBe(false);
    expect(approvals.deny(pending.id, control)).toBe(false);
    expect(approvals.list()).toEqual({ version: version + 1, approvals: [] });
  });

  it('deny answers with who denied', async () => {
    const { approvals } = registry();
    const answer = approvals.ask(question, 'p');
    approvals.deny(approvals.list().approvals[0]!.id, control);
    await expect(answer).resolves.toEqual({ approved: false, reason: 'denied', by: control });
  });

  it('refuses at the deadline and leaves nothing listed', async () => {
    vi.useFakeTimers();
    const { approvals } = registry({ timeoutMs: 5_000 });
    const answer = approvals.ask(question, 'p');
    await vi.advanceTimersByTimeAsync(4_999);
    expect(approvals.size).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    await expect(answer).resolves.toEqual({ approved: false, reason: 'confirm-timeout' });
    expect(approvals.size).toBe(0);
  });

  it('withdraws a request whose client hung up, and never lists one whose client is already gone', async () => {
    const { approvals } = registry();
    const hangup = new AbortController();
    const answer = approvals.ask(question, 'p', hangup.signal);
    expect(approvals.size).toBe(1);
    hangup.abort();
    await expect(answer).resolves.toEqual({ approved: false, reason: 'withdrawn' });
    expect(approvals.size).toBe(0);
    await expect(approvals.ask(question, 'p', hangup.signal)).resolves.toEqual({ approved: false, reason: 'withdrawn' });
    expect(approvals.size).toBe(0);
  });

  it('bounds requests per peer and in total, says so once in the log, and takes more once some are answered', async () => {
    const { approvals, lines } = registry({ maxPerPeer: 4, maxTotal: 10 });
    const answers = Array.from({ length: 5 }, () => approvals.ask(question, 'one'));
    await expect(answers[4]).resolves.toEqual({ approved: false, reason: 'too-many-pending' });
    for (let i = 0; i < 6; i++) void approvals.ask(question, `peer-${i}`);
    expect(approvals.size).toBe(10);
    await expect(approvals.ask(question, 'another')).resolves.toEqual({ approved: false, reason: 'too-many-pending' });
    await expect(approvals.ask(question, 'yet another')).resolves.toEqual({ approved: false, reason: 'too-many-pending' });
    expect(lines.filter((l) => String(l.msg).includes('too many sign requests'))).toHaveLength(1);
    approvals.deny(approvals.list().approvals[0]!.id, control);
    await answers[0];
    const more = approvals.ask(question, 'one');
    expect(approvals.size).toBe(10);
    approvals.refuseAll('locked');
    await expect(more).resolves.toEqual({ approved: false, reason: 'locked' });
    expect(approvals.size).toBe(0);
  });

  it('long-poll: returns at once when the list moved past `after`, else when it changes or the wait ends', async () => {
    const { approvals } = registry();
    const first = approvals.list();
    void approvals.ask(question, 'p');
    const moved = await approvals.wait(first.version, 10_000);
    expect(moved.approvals).toHaveLength(1);
    const waiting = approvals.wait(moved.version, 10_000);
    let settled = false;
    void waiting.then(() => (settled = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(settled).toBe(false);
    approvals.deny(moved.approvals[0]!.id, control);
    expect((await waiting).approvals).toHaveLength(0);
    vi.useFakeTimers();
    const idle = approvals.wait(approvals.list().version, 1_000);
    await vi.advanceTimersByTimeAsync(1_000);
    expect((await idle).approvals).toHaveLength(0);
  });

  it('the first channel to answer wins; a program that answers later changes nothing and is cancelled', async () => {
    let cancelled: AbortSignal | null = null;
    let answerLater: (yes: boolean) => void = () => {};
    const program: ConfirmChannel = {
      approver: { channel: 'program', program: '/bin/askpass' },
      ask: (_q, signal) => {
        cancelled = signal;
        return new Promise((resolve) => (answerLater = resolve));
      },
    };
    const { approvals } = registry({ program });
    const answer = approvals.ask(question, 'p');
    approvals.approve(approvals.list().approvals[0]!.id, control);
    expect(cancelled!.aborted).toBe(true);
    answerLater(false);
    await expect(answer).resolves.toEqual({ approved: true, by: control });
  });

  it('a program that abstains (cannot run) leaves the request to the other channels', async () => {
    const program: ConfirmChannel = { approver: { channel: 'program', program: '/nope' }, ask: async () => null };
    const { approvals } = registry({ program });
    const answer = approvals.ask(question, 'p');
    await new Promise((r) => setTimeout(r, 10));
    expect(approvals.size).toBe(1);
    approvals.deny(approvals.list().approvals[0]!.id, control);
    await expect(answer).resolves.toMatchObject({ approved: false, reason: 'denied' });
  });

  it('the question names scope, key, purpose, namespace or host, the caller and the rule, on one line', () => {
    expect(describeQuestion({ ...question, id: 'abcdefgh' })).toBe(
      `keyhold: allow /usr/bin/ssh-keygen (pid 4242) to sign an ssh-keygen signature in namespace git with key ${question.key.fingerprint} (deploy key) of scope web? (rule 2, request abcdefgh)`,
    );
    const login = describeQuestion({ ...question, purpose: 'ssh-login', user: 'git\nevil', host: 'SHA256:h', rule: 'default', caller: { subject: 'ci-42', token_id: 'tok1' } });
    expect(login).toContain('container token tok1 subject ci-42');
    expect(login).toContain('an SSH login as git\\nevil to host SHA256:h');
    expect(login).toContain('the policy default');
    expect(login).not.toContain('\n');
  });
});

describe('ConfirmProgram (real programs)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-confirm-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const script = (name: string, body: string) => {
    const path = join(dir, name);
    writeFileSync(path, `#!/bin/sh\n${body}\n`);
    chmodSync(path, 0o700);
    return path;
  };

  it('exit 0 approves, exit 1 denies; argv[1] is the question, SSH_ASKPASS_PROMPT=confirm, no passphrase in its environment', async () => {
    const seen = join(dir, 'seen');
    const yes = script('yes', `printf '%s\\n%s\\n%s\\n' "$1" "$SSH_ASKPASS_PROMPT" "\${KEYHOLD_PASSPHRASE:-none}" > '${seen}'; exit 0`);
    const { log } = recordingLogger();
    process.env.KEYHOLD_PASSPHRASE = 'must-not-leak';
    try {
      await expect(new ConfirmProgram(yes, log).ask('is it you?', new AbortController().signal)).resolves.toBe(true);
    } finally {
      delete process.env.KEYHOLD_PASSPHRASE;
    }
    expect(readFileSync(seen, 'utf8')).toBe('is it you?\nconfirm\nnone\n');
    await expect(new ConfirmProgram(script('no', 'exit 1'), log).ask('q', new AbortController().signal)).resolves.toBe(false);
  });

  it('the program gets the request in KEYHOLD_CONFIRM_*: the caller as pkcheck names a process (pid,start-time,uid), or the daemon itself for a token or another uid; nothing inherited', async () => {
    const seen = join(dir, 'seen-env');
    const dump = script('dump-env', `env | grep '^KEYHOLD_CONFIRM_' | sort > '${seen}'; exit 0`);
    const uid = process.getuid!();
    const stat = readFileSync('/proc/self/stat', 'latin1');
    const daemonStart = stat.slice(stat.lastIndexOf(') ') + 2).split(' ')[22 - 3];
    const asked = async (q: ApprovalQuestion) => {
      const { log } = recordingLogger();
      const { approvals } = registry({ program: new ConfirmProgram(dump, log) });
      await expect(approvals.ask(q, 'p')).resolves.toMatchObject({ approved: true });
      return Object.fromEntries(
        readFileSync(seen, 'utf8')
          .trim()
          .split('\n')
          .map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]),
      ) as Record<string, string>;
    };
    process.env.KEYHOLD_CONFIRM_PROCESS = '1,1,0';
    process.env.KEYHOLD_CONFIRM_HOST = 'inherited';
    try {
      const local = await asked({ ...question, namespace: 'git\nevil', caller: { pid: 4242, uid, exe: '/usr/bin/ssh-keygen', start_time: '987' } });
      expect(local).toEqual({
        KEYHOLD_CONFIRM_REQUEST: expect.stringMatching(/^[a-z2-7]{8}$/),
        KEYHOLD_CONFIRM_SCOPE: 'web',
        KEYHOLD_CONFIRM_KEY: question.key.fingerprint,
        KEYHOLD_CONFIRM_PURPOSE: 'sshsig',
        KEYHOLD_CONFIRM_NAMESPACE: 'git\\nevil',
        KEYHOLD_CONFIRM_RULE: '2',
        KEYHOLD_CONFIRM_PID: '4242',
        KEYHOLD_CONFIRM_EXE: '/usr/bin/ssh-keygen',
        KEYHOLD_CONFIRM_PROCESS: `4242,987,${uid}`,
      });
      const daemon = `${process.pid},${daemonStart},${uid}`;
      const token = await asked({ ...question, purpose: 'ssh-login', host: 'SHA256:h', user: 'git', caller: { pid: 77, uid, start_time: '5', subject: 'ci-42', token_id: 'tok1' } });
      expect(token).toMatchObject({ KEYHOLD_CONFIRM_SUBJECT: 'ci-42', KEYHOLD_CONFIRM_TOKEN_ID: 'tok1', KEYHOLD_CONFIRM_HOST: 'SHA256:h', KEYHOLD_CONFIRM_USER: 'git', KEYHOLD_CONFIRM_PROCESS: daemon });
      expect(token).not.toHaveProperty('KEYHOLD_CONFIRM_PID');
      const otherUser = await asked({ ...question, caller: { pid: 4242, uid: uid + 1, exe: null, start_time: '987' } });
      expect(otherUser.KEYHOLD_CONFIRM_PROCESS).toBe(daemon);
    } finally {
      delete process.env.KEYHOLD_CONFIRM_PROCESS;
      delete process.env.KEYHOLD_CONFIRM_HOST;
    }
  });

  it('a program that hangs is killed, with what it started, once the request is answered elsewhere', async () => {
    const pidFile = join(dir, 'sleeper.pid');
    const hang = script('hang', `sleep 30 & echo $! > '${pidFile}'; wait`);
    const { log } = recordingLogger();
    const cancel = new AbortController();
    const answer = new ConfirmProgram(hang, log).ask('q', cancel.signal);
    const deadline = Date.now() + 5_000;
    while (!existsSync(pidFile) || readFileSync(pidFile, 'utf8').trim() === '') {
      if (Date.now() > deadline) throw new Error('the script did not start');
      await new Promise((r) => setTimeout(r, 20));
    }
    const sleeper = Number(readFileSync(pidFile, 'utf8'));
    cancel.abort();
    await expect(answer).resolves.toBe(null);
    const gone = Date.now() + 5_000;
    while (existsSync(`/proc/${sleeper}`) && !readFileSync(`/proc/${sleeper}/stat`, 'utf8').includes(') Z')) {
      if (Date.now() > gone) throw new Error('the program’s child was not killed');
      await new Promise((r) => setTimeout(r, 20));
    }
  });

  it('a missing program abstains and is logged once a minute, not once a request', async () => {
    const { log, lines } = recordingLogger();
    const missing = new ConfirmProgram(join(dir, 'missing'), log);
    for (let i = 0; i < 3; i++) await expect(missing.ask('q', new AbortController().signal)).resolves.toBe(null);
    expect(lines.filter((l) => String(l.msg).includes('cannot run the confirm program'))).toHaveLength(1);
  });

  it('runs a bounded number at once; a question whose request ends while it waits for a slot never runs', async () => {
    const count = join(dir, 'count');
    const slow = script('slow', `echo x >> '${count}'; sleep 30`);
    const { log } = recordingLogger();
    const program = new ConfirmProgram(slow, log, 2);
    const cancels = Array.from({ length: 4 }, () => new AbortController());
    const answers = cancels.map((c) => program.ask('q', c.signal));
    const started = () => (existsSync(count) ? readFileSync(count, 'utf8').trim().split('\n').length : 0);
    const until = async (n: number) => {
      const deadline = Date.now() + 5_000;
      while (started() < n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    };
    await until(2);
    await new Promise((r) => setTimeout(r, 200));
    expect(started()).toBe(2);
    cancels[3]!.abort();
    await expect(answers[3]).resolves.toBe(null);
    cancels[0]!.abort();
    await expect(answers[0]).resolves.toBe(null);
    await until(3);
    await new Promise((r) => setTimeout(r, 200));
    expect(started()).toBe(3);
    for (const c of cancels) c.abort();
    await Promise.all(answers);
  });

  it('a program that ignores SIGTERM keeps its slot until it is gone (killed after the grace); close() kills every program at once', async () => {
    const count = join(dir, 'count-stubborn');
    const stubborn = script('stubborn', `trap '' TERM; echo x >> '${count}'; sleep 30`);
    const started = () => (existsSync(count) ? readFileSync(count, 'utf8').trim().split('\n').length : 0);
    const until = async (n: number, ms: number) => {
      const deadline = Date.now() + ms;
      while (started() < n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    };
    const { log } = recordingLogger();
    const program = new ConfirmProgram(stubborn, log, 1);
    const first = new AbortController();
    const firstAnswer = program.ask('q', first.signal);
    await until(1, 5_000);
    first.abort();
    await expect(firstAnswer).resolves.toBe(null);
    const secondAnswer = program.ask('q', new AbortController().signal);
    await new Promise((r) => setTimeout(r, 500));
    expect(started()).toBe(1); // the first still runs (it ignored SIGTERM): no second slot
    await until(2, 6_000); // SIGKILL after the grace frees the slot
    expect(started()).toBe(2);
    const closedAt = Date.now();
    program.close();
    await expect(secondAnswer).resolves.not.toBe(true);
    expect(Date.now() - closedAt).toBeLessThan(1_500);
  });

  it('the program to use: configured, else $SSH_ASKPASS with a display, else none', () => {
    expect(confirmProgramFor('/x', {})).toBe('/x');
    expect(confirmProgramFor(undefined, { SSH_ASKPASS: '/a', DISPLAY: ':0' })).toBe('/a');
    expect(confirmProgramFor(undefined, { SSH_ASKPASS: '/a', WAYLAND_DISPLAY: 'w' })).toBe('/a');
    expect(confirmProgramFor(undefined, { SSH_ASKPASS: '/a' })).toBe(null);
  });
});
