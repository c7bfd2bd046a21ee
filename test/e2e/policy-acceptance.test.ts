// Issue 12's acceptance with real clients: a scope's policy decides which host `ssh` and `git push`
// reach (named through known_hosts, or by fingerprint), which `ssh-keygen -Y sign` namespaces sign,
// which executable may ask, which key ssh is offered for a host, which container subject signs, and
// what an agent forwarded with `ssh -A` may do; every decision is in the audit log.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { existsSync, realpathSync } from 'node:fs';
import { keyhold } from '../helpers/keyhold.js';
import { identitiesFrame, parseIdentities, RawConn, signRequestFrame, tokenHandshake, verifyEd25519 } from '../helpers/raw-wire.js';
import { run, type Run } from '../helpers/sshd.js';
import {
  checkPolicy,
  clientEnv,
  decisions,
  gitPush,
  gitRepoWithCommit,
  lastSeq,
  messageFile,
  setPolicy,
  shellQuote,
  sshsign,
  startPolicyLab,
  verifySshsig,
  waitForApproval,
  waitForDecision,
  type LabHost,
  type LabKey,
  type PolicyLab,
} from '../helpers/policy-lab.js';
import { completeEntries } from '../helpers/audit.js';

let lab: PolicyLab;
/** The key the routing test allows for host A; five more keys sit in the same scope. */
let routed: LabKey;
let first: LabKey;

beforeAll(async () => {
  lab = await startPolicyLab({ prefix: 'keyhold-policy-acc-', keyCount: 6 });
  first = lab.keys[0]!;
  routed = lab.keys[5]!;
}, 90_000);

afterAll(async () => {
  await lab?.stop();
}, 30_000);

function login(host: LabHost, extraOptions: string[] = [], sock = lab.sock): Promise<Run> {
  return run('ssh', [...host.sshd.sshArgs(extraOptions), 'echo', 'logged-in'], { env: clientEnv(sock) });
}

function expectLoggedIn(r: Run, what: string): void {
  expect(r.code, `${what}\n${lab.diagnostics(r)}`).toBe(0);
  expect(r.stdout).toBe('logged-in\n');
}

function expectRefusedLogin(r: Run, what: string): void {
  expect(r.code, `${what}\n${lab.diagnostics(r)}`).toBe(255);
  expect(r.stdout).toBe('');
  expect(r.stderr).toMatch(/Permission denied/);
}

describe('the fixture', () => {
  it('without a policy, both hosts let every key of the scope in (so a refusal below is the policy)', async () => {
    expect(lab.a.fingerprint).not.toBe(lab.b.fingerprint);
    expectLoggedIn(await login(lab.a), 'ssh to A, no policy');
    expectLoggedIn(await login(lab.b), 'ssh to B, no policy');
    // A scope without a policy writes what it always wrote: no decision fields.
    const signs = completeEntries(lab.k).filter((e) => e.event === 'sign');
    expect(signs.length).toBeGreaterThanOrEqual(2);
    for (const e of signs) expect(e).not.toHaveProperty('decision');
  });
});

describe('ssh-login to host A only', () => {
  const variants = [
    { how: 'by the name known_hosts gives it (a hashed entry)', hosts: () => [lab.a.name] },
    { how: 'by its host key fingerprint', hosts: () => [lab.a.fingerprint] },
  ];
  for (const v of variants) {
    it(`${v.how}: ssh and git push reach A and are refused at B`, async () => {
      setPolicy(
        lab,
        `default = "deny"

[[rule]]
action = "allow"
purpose = "ssh-login"
hosts = ${JSON.stringify(v.hosts())}
`,
      );
      const show = keyhold(lab.k, ['policy', 'show', lab.scope]);
      expect(show.status, show.stderr).toBe(0);
      // The stored policy names A's host key, whatever the file said.
      expect(show.stdout).toContain(lab.a.fingerprint);
      expect(show.stdout).not.toContain(lab.b.fingerprint);

      const seq = lastSeq(lab);
      expectLoggedIn(await login(lab.a), 'ssh to A');
      const allowed = await waitForDecision(lab, seq, { event: 'sign', decision: 'allow', rule: 1, purpose: 'ssh-login' });
      expect(allowed.host_key).toBe(lab.a.fingerprint);
      expectRefusedLogin(await login(lab.b), 'ssh to B');

      const g = await gitRepoWithCommit(lab);
      const pushedA = await gitPush(g, lab.a, lab.sock);
      expect(pushedA.code, `git push to A\n${lab.diagnostics(pushedA)}`).toBe(0);
      const pushedB = await gitPush(g, lab.b, lab.sock);
      expect(pushedB.code, `git push to B\n${lab.diagnostics(pushedB)}`).not.toBe(0);
      expect(pushedB.stderr).toMatch(/Permission denied/);

      // policy check agrees, by name and by fingerprint.
      for (const [host, code] of [
        [lab.a.name, 0],
        [lab.a.fingerprint, 0],
        [lab.b.name, 4],
        [lab.b.fingerprint, 4],
      ] as const) {
        const checked = checkPolicy(lab, ['--purpose', 'ssh-login', '--host', host, '--key', first.fingerprint]);
        expect(checked.status, `policy check --host ${host}: ${checked.stdout}${checked.stderr}`).toBe(code);
      }
    });
  }

  it('a host name known_hosts does not know is refused at policy set, naming it', () => {
    const r = keyhold(lab.k, ['policy', 'set', lab.scope, '-'], {
      input: `[[rule]]\naction = "allow"\npurpose = "ssh-login"\nhosts = ["unknown-host.example.test"]\n`,
    });
    expect(r.status, r.stderr).not.toBe(0);
    expect(r.stderr).toContain('unknown-host.example.test');
  });
});

describe('namespaces', () => {
  it('ssh-keygen -Y sign -n git is allowed and verifies; -n file is refused', async () => {
    setPolicy(
      lab,
      `default = "deny"

[[rule]]
action = "allow"
purpose = "sshsig"
namespaces = ["git"]
`,
    );
    const seq = lastSeq(lab);
    const gitMsg = messageFile(lab);
    const signed = await sshsign(lab.sock, first, 'git', gitMsg);
    expect(signed.code, `-n git\n${lab.diagnostics(signed)}`).toBe(0);
    const verified = await verifySshsig(lab, first, 'git', gitMsg);
    expect(verified.code, verified.stdout + verified.stderr).toBe(0);
    expect(verified.stdout).toMatch(/Good "git" signature for signer@example.test/);
    const ok = await waitForDecision(lab, seq, { event: 'sign', decision: 'allow', rule: 1 });
    expect(ok).toMatchObject({ purpose: 'sshsig', namespace: 'git' });

    const fileMsg = messageFile(lab);
    const refused = await sshsign(lab.sock, first, 'file', fileMsg);
    expect(refused.code, `-n file\n${lab.diagnostics(refused)}`).not.toBe(0);
    expect(existsSync(`${fileMsg}.sig`)).toBe(false);
    const no = await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'deny', rule: 'default' });
    expect(no).toMatchObject({ purpose: 'sshsig', namespace: 'file', reason: 'policy' });
  });
});

describe('exe', () => {
  it('the same request is signed for /usr/bin/ssh-add and refused for node', async () => {
    setPolicy(
      lab,
      `default = "deny"

[[rule]]
action = "allow"
exe = ["/usr/bin/ssh-add"]
`,
    );
    const seq = lastSeq(lab);
    // ssh-add -T signs random data with the agent's key and verifies the signature.
    const sshAdd = await run('ssh-add', ['-T', first.pubFile], { env: clientEnv(lab.sock) });
    expect(sshAdd.code, `ssh-add -T\n${lab.diagnostics(sshAdd)}`).toBe(0);
    const allowed = await waitForDecision(lab, seq, { event: 'sign', decision: 'allow', rule: 1 });
    expect((allowed.peer as { exe?: string }).exe).toBe('/usr/bin/ssh-add');

    // The same kind of request (random data, same key) from this node process.
    const conn = await RawConn.connect(lab.sock);
    try {
      conn.send(identitiesFrame());
      const ids = parseIdentities(await conn.reply());
      const blob = Buffer.from(first.pubLine.split(/\s+/)[1]!, 'base64');
      expect(ids.some((id) => id.blob.equals(blob))).toBe(true);
      conn.send(signRequestFrame(blob, randomBytes(64)));
      const reply = await conn.reply();
      expect(reply[0], `node's request must get SSH_AGENT_FAILURE\n${lab.diagnostics()}`).toBe(5);
    } finally {
      conn.close();
    }
    const refused = await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'deny', rule: 'default', reason: 'policy' });
    expect((refused.peer as { exe?: string }).exe).toBe(realpathSync(process.execPath));

    expect(checkPolicy(lab, ['--purpose', 'other', '--exe', '/usr/bin/ssh-add', '--key', first.fingerprint]).status).toBe(0);
    expect(checkPolicy(lab, ['--purpose', 'other', '--exe', realpathSync(process.execPath), '--key', first.fingerprint]).status).toBe(4);
  });
});

describe('rate', () => {
  it('rate = "2/m": a third signature of the same process within the minute is refused; another process still signs', async () => {
    setPolicy(
      lab,
      `[[rule]]
action = "allow"
purpose = "other"
rate = "2/m"
`,
    );
    const seq = lastSeq(lab);
    const blob = Buffer.from(first.pubLine.split(/\s+/)[1]!, 'base64');
    const conn = await RawConn.connect(lab.sock);
    const answers: number[] = [];
    try {
      for (let i = 0; i < 3; i++) {
        conn.send(signRequestFrame(blob, randomBytes(32)));
        answers.push((await conn.reply())[0]!);
      }
    } finally {
      conn.close();
    }
    expect(answers, lab.diagnostics()).toEqual([14, 14, 5]);
    await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'allow', rule: 1, reason: 'rate' });
    // The count is per process: ssh-add is a process of its own.
    const other = await run('ssh-add', ['-T', first.pubFile], { env: clientEnv(lab.sock) });
    expect(other.code, lab.diagnostics(other)).toBe(0);
  });
});

describe('routing', () => {
  it('ssh -v to A is offered only the key a rule allows for A, among six, and logs in', async () => {
    setPolicy(
      lab,
      `default = "deny"

[[rule]]
action = "allow"
purpose = "ssh-login"
hosts = ["${lab.a.fingerprint}"]
keys = ["${routed.fingerprint}"]
`,
    );
    // Every key is authorized on A, and the routed key comes last in the scope: only routing
    // explains a single offer.
    const r = await run('ssh', ['-v', ...lab.a.sshd.sshArgs(), 'echo', 'logged-in'], { env: clientEnv(lab.sock) });
    expectLoggedIn(r, 'ssh -v to A');
    const willAttempt = r.stderr.split('\n').filter((l) => /Will attempt key:/.test(l));
    const offering = r.stderr.split('\n').filter((l) => /Offering public key:/.test(l));
    expect(willAttempt, r.stderr).toHaveLength(1);
    expect(offering, r.stderr).toHaveLength(1);
    expect(offering[0]).toContain(routed.fingerprint);

    // The scope still holds six keys for a connection not bound to a host.
    const listed = await run('ssh-add', ['-l'], { env: clientEnv(lab.sock) });
    expect(listed.stdout.trim().split('\n')).toHaveLength(6);

    // To B, no key is offered at all.
    const toB = await run('ssh', ['-v', ...lab.b.sshd.sshArgs(), 'echo', 'logged-in'], { env: clientEnv(lab.sock) });
    expectRefusedLogin(toB, 'ssh -v to B');
    expect(toB.stderr.split('\n').filter((l) => /Offering public key:/.test(l)), toB.stderr).toHaveLength(0);
  });
});

describe('container tokens', () => {
  it('a subjects rule: the token of ci-42 signs through the token listener, the token of ci-7 is refused', async () => {
    setPolicy(
      lab,
      `default = "deny"

[[rule]]
action = "allow"
subjects = ["ci-42"]
`,
    );
    const issue = (subject: string) =>
      (JSON.parse(keyhold(lab.k, ['token', 'issue', lab.scope, '--subject', subject, '--json']).stdout) as { id: string; token: string });
    const allowedToken = issue('ci-42');
    const otherToken = issue('ci-7');
    const blob = Buffer.from(first.pubLine.split(/\s+/)[1]!, 'base64');
    const seq = lastSeq(lab);

    const signOver = async (token: string): Promise<{ reply: Buffer; data: Buffer }> => {
      const conn = await RawConn.open({ kind: 'unix', path: lab.tokenListener });
      try {
        const data = randomBytes(48);
        conn.send(Buffer.concat([tokenHandshake(token), signRequestFrame(blob, data)]));
        return { reply: await conn.reply(), data };
      } finally {
        conn.close();
      }
    };
    const ok = await signOver(allowedToken.token);
    expect(ok.reply[0], lab.diagnostics()).toBe(14);
    expect(verifyEd25519(blob, ok.data, ok.reply)).toBe(true);
    const no = await signOver(otherToken.token);
    expect(no.reply[0], lab.diagnostics()).toBe(5);
    // And the scope socket itself has no subject: refused too.
    const direct = await run('ssh-add', ['-T', first.pubFile], { env: clientEnv(lab.sock) });
    expect(direct.code, lab.diagnostics(direct)).not.toBe(0);

    const signed = await waitForDecision(lab, seq, { event: 'sign', decision: 'allow', rule: 1, token_id: allowedToken.id });
    expect(signed.fingerprint).toBe(first.fingerprint);
    await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'deny', rule: 'default', token_id: otherToken.id, reason: 'policy' });
    expect(checkPolicy(lab, ['--subject', 'ci-42', '--key', first.fingerprint]).status).toBe(0);
    expect(checkPolicy(lab, ['--subject', 'ci-7', '--key', first.fingerprint]).status).toBe(4);
  });

  it('remember on a confirm rule: an approval covers the same token on a new connection, not another token', async () => {
    setPolicy(
      lab,
      `default = "deny"

[[rule]]
action = "confirm"
subjects = ["ci-*"]
remember = "1m"
`,
    );
    const issue = (subject: string) =>
      JSON.parse(keyhold(lab.k, ['token', 'issue', lab.scope, '--subject', subject, '--json']).stdout) as { id: string; token: string };
    const ci = issue('ci-remembered');
    const other = issue('ci-other');
    const blob = Buffer.from(first.pubLine.split(/\s+/)[1]!, 'base64');
    const open = async (token: string): Promise<RawConn> => {
      const conn = await RawConn.open({ kind: 'unix', path: lab.tokenListener });
      conn.send(Buffer.concat([tokenHandshake(token), signRequestFrame(blob, randomBytes(32))]));
      return conn;
    };
    const seq = lastSeq(lab);
    const conns: RawConn[] = [];
    try {
      conns.push(await open(ci.token));
      const asked = await waitForApproval(lab, ci.id);
      const approve = keyhold(lab.k, ['approve', asked.id]);
      expect(approve.status, approve.stderr).toBe(0);
      expect((await conns[0]!.reply(10_000))[0], lab.diagnostics()).toBe(14);
      // A new connection of the same token: remembered, nobody asked.
      conns.push(await open(ci.token));
      expect((await conns[1]!.reply(10_000))[0], lab.diagnostics()).toBe(14);
      // Another token of the same rule is asked.
      conns.push(await open(other.token));
      const otherAsked = await waitForApproval(lab, other.id);
      expect(keyhold(lab.k, ['deny', otherAsked.id]).status).toBe(0);
      expect((await conns[2]!.reply(10_000))[0]).toBe(5);
    } finally {
      for (const conn of conns) conn.close();
    }
    const channels = decisions(lab, seq)
      .filter((e) => e.decision === 'confirm')
      .map((e) => [e.token_id, (e.approved_by as { channel?: string } | undefined)?.channel ?? (e.denied_by as { channel?: string } | undefined)?.channel]);
    expect(channels).toEqual([
      [ci.id, 'control'],
      [ci.id, 'remembered'],
      [other.id, 'control'],
    ]);
  });

  it('forwarded = true: through ssh -A to A, ssh-keygen -Y sign and a second hop to B are refused; the same directly is allowed', async () => {
    setPolicy(
      lab,
      `[[rule]]
action = "deny"
forwarded = true
`,
    );
    const seq = lastSeq(lab);
    const direct = messageFile(lab);
    const signed = await sshsign(lab.sock, first, 'git', direct);
    expect(signed.code, lab.diagnostics(signed)).toBe(0);
    expectLoggedIn(await login(lab.b), 'ssh to B directly');

    const remoteMsg = messageFile(lab);
    const remote = [
      'echo hop1',
      ['ssh-keygen', '-Y', 'sign', '-n', 'git', '-f', first.pubFile, remoteMsg].map(shellQuote).join(' ') + ' && echo signed-remotely',
      [...['ssh', ...lab.b.sshd.sshArgs()], 'echo', 'hop2'].map(shellQuote).join(' '),
      'true',
    ].join('; ');
    const r = await run('ssh', [...lab.a.sshd.sshArgs(['-o', 'ForwardAgent=yes']), remote], { env: clientEnv(lab.sock) });
    expect(r.code, lab.diagnostics(r)).toBe(0);
    expect(r.stdout, lab.diagnostics(r)).toContain('hop1');
    expect(r.stdout, lab.diagnostics(r)).not.toContain('signed-remotely');
    expect(r.stdout, lab.diagnostics(r)).not.toContain('hop2');
    expect(existsSync(`${remoteMsg}.sig`)).toBe(false);
    expect(r.stderr).toMatch(/Permission denied/);
    // The forwarded sshsig request reached the daemon and was refused by rule 1.
    const refused = await waitForDecision(lab, seq, { event: 'sign-refused', decision: 'deny', rule: 1, purpose: 'sshsig', reason: 'policy' });
    expect(refused.namespace).toBe('git');
    expect(checkPolicy(lab, ['--purpose', 'sshsig', '--namespace', 'git', '--forwarded', '--key', first.fingerprint]).status).toBe(4);
    expect(checkPolicy(lab, ['--purpose', 'sshsig', '--namespace', 'git', '--key', first.fingerprint]).status).toBe(0);
  });
});

describe('changes on a running daemon', () => {
  it('policy set takes effect on the next request of an already open connection; policy rm restores signing as before, without decision fields', async () => {
    keyhold(lab.k, ['policy', 'rm', lab.scope]);
    const blob = Buffer.from(first.pubLine.split(/\s+/)[1]!, 'base64');
    const conn = await RawConn.connect(lab.sock);
    try {
      const sign = async () => {
        conn.send(signRequestFrame(blob, randomBytes(32)));
        return (await conn.reply())[0];
      };
      expect(await sign(), lab.diagnostics()).toBe(14);
      setPolicy(lab, 'default = "deny"\n');
      expect(await sign(), 'the same connection, after policy set').toBe(5);
      const removed = keyhold(lab.k, ['policy', 'rm', lab.scope]);
      expect(removed.status, removed.stderr).toBe(0);
      const seq = lastSeq(lab);
      expect(await sign(), 'the same connection, after policy rm').toBe(14);
      const after = completeEntries(lab.k).filter((e) => e.seq > seq && e.event === 'sign');
      expect(after).toHaveLength(1);
      expect(after[0]).not.toHaveProperty('decision');
      expect(after[0]).not.toHaveProperty('rule');
    } finally {
      conn.close();
    }
    expect(keyhold(lab.k, ['policy', 'show', lab.scope]).status).toBe(5);
  });
});

describe('audit', () => {
  it('keyhold audit tail shows each decision with its rule', () => {
    const entries = completeEntries(lab.k).filter((e) => typeof e.decision === 'string');
    expect(entries.some((e) => e.decision === 'allow')).toBe(true);
    expect(entries.some((e) => e.decision === 'deny' && e.rule === 'default')).toBe(true);
    expect(entries.some((e) => e.decision === 'deny' && e.rule === 1)).toBe(true);
    for (const e of entries) expect(e.rule === 'default' || (typeof e.rule === 'number' && e.rule >= 1), JSON.stringify(e)).toBe(true);

    const tail = keyhold(lab.k, ['audit', 'tail', '-n', '400']);
    expect(tail.status, tail.stderr).toBe(0);
    const lines = tail.stdout.split('\n');
    for (const e of entries) {
      const line = lines.find((l) => new RegExp(`^\\S+\\s+${e.seq} `).test(l));
      expect(line, `audit tail line of seq ${e.seq}`).toBeDefined();
      expect(line).toMatch(new RegExp(`\\b${e.decision as string}\\b`));
      expect(line).toMatch(new RegExp(`rule[= ]${String(e.rule)}\\b`));
    }
    const json = JSON.parse(keyhold(lab.k, ['audit', 'tail', '-n', '400', '--json']).stdout) as Array<{ seq: number; decision?: string; rule?: unknown }>;
    for (const e of entries) expect(json.find((j) => j.seq === e.seq)).toMatchObject({ decision: e.decision, rule: e.rule });
    const verify = keyhold(lab.k, ['audit', 'verify']);
    expect(verify.status, verify.stderr).toBe(0);
  });
});
