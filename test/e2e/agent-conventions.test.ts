// OpenSSH conventions on a real daemon: a scope socket outlives its scope's last key, `query`
// answers as OpenSSH's agent does, session-bind is taken while locked, `keyhold stop` is
// `ssh-agent -k`, and `keyhold unlock -c` speaks csh.
import { createHash } from 'node:crypto';
import { existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { completeEntries } from '../helpers/audit.js';
import {
  daemonPid,
  initVault,
  keyhold,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  processAlive,
  startServe,
  stopAllServes,
  stopBackgroundDaemon,
  waitFor,
  type KeyholdEnv,
} from '../helpers/keyhold.js';
import { frame, identitiesFrame, parseIdentities, RawConn, readString, signRequestFrame, sshString, u32, verifyEd25519 } from '../helpers/raw-wire.js';
import { run } from '../helpers/sshd.js';
import { fixture, parseLine, payloadOf } from '../agent-protocol/golden-fixture.js';

const envs: KeyholdEnv[] = [];
const conns: RawConn[] = [];
function freshEnv(prefix: string): KeyholdEnv {
  const k = makeKeyholdEnv(prefix);
  envs.push(k);
  initVault(k);
  return k;
}
async function connect(path: string): Promise<RawConn> {
  const c = await RawConn.connect(path);
  conns.push(c);
  return c;
}

afterEach(async () => {
  for (const c of conns.splice(0)) c.close();
  await stopAllServes();
  for (const k of envs.splice(0)) {
    await stopBackgroundDaemon(k.runtime);
    k.cleanup();
  }
});

const blobOf = (line: string) => Buffer.from(line.trim().split(' ')[1]!, 'base64');
const fingerprintOfLine = (k: KeyholdEnv, line: string): string => {
  const keys = JSON.parse(keyholdOk(k, ['key', 'list', '--json'])) as { fingerprint: string; public: string }[];
  return keys.find((key) => key.public.split(' ')[1] === line.trim().split(' ')[1])!.fingerprint;
};
const sshAddList = (socket: string) => run('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: socket }, timeoutMs: 10_000 });

describe('a scope socket while its scope has no keys', () => {
  it('`ssh-add -l` exits 1 "The agent has no identities." after the last key was unassigned, and lists it again once assigned', async () => {
    const k = freshEnv('keyhold-conv-empty-');
    const line = keyholdOk(k, ['key', 'generate', 'web', '--comment', 'only-key']);
    const fp = fingerprintOfLine(k, line);
    const serve = await startServe(k);
    const socket = serve.socket('web');
    expect((await sshAddList(socket)).stdout).toContain('only-key');

    keyholdOk(k, ['key', 'unassign', 'web', fp]);
    const empty = await sshAddList(socket);
    expect(empty.code, empty.stderr).toBe(1);
    expect(empty.stdout + empty.stderr).toContain('The agent has no identities.');
    // Still there after several of the daemon's scope syncs, and still in its status.
    await new Promise((r) => setTimeout(r, 750));
    expect(existsSync(socket)).toBe(true);
    expect((JSON.parse(keyholdOk(k, ['status', '--json'])) as { sockets: string[] }).sockets).toContain(socket);
    expect((await sshAddList(socket)).code).toBe(1);

    keyholdOk(k, ['key', 'assign', 'web', fp]);
    const back = await sshAddList(socket);
    expect(back.code, back.stderr).toBe(0);
    expect(back.stdout).toContain('only-key');
  });
});

describe('scope sockets when the runtime dir is removed under the daemon', () => {
  it('an emptied scope and, while locked, a scope with keys get their sockets back', async () => {
    const k = freshEnv('keyhold-conv-restore-');
    keyholdOk(k, ['key', 'generate', 'web']);
    const line = keyholdOk(k, ['key', 'generate', 'old']);
    const serve = await startServe(k);
    await waitFor(() => existsSync(serve.socket('old')), 5000, 'old.sock');
    keyholdOk(k, ['key', 'rm', fingerprintOfLine(k, line)]);
    keyholdOk(k, ['lock']);
    rmSync(k.runtime, { recursive: true, force: true });
    await waitFor(() => existsSync(serve.socket('web')) && existsSync(serve.socket('old')), 5000, 'both scope sockets back');
    for (const scope of ['web', 'old']) {
      const listed = await sshAddList(serve.socket(scope));
      expect(listed.code, `${scope}: ${listed.stderr}`).toBe(1);
      expect(listed.stdout + listed.stderr).toContain('The agent has no identities.');
    }
  });
});

// What OpenSSH's ssh-agent (10.3 and later, process_ext_query in ssh-agent.c) writes for `query`:
// SSH_AGENT_EXTENSION_RESPONSE, the name "query" echoed, then one string per extension it
// supports beyond query itself. Written out by hand from that format, not from keyhold's codec.
const OPENSSH_QUERY_REPLY = Buffer.from(
  [
    '00000026', // frame length: 38
    '1d', // SSH_AGENT_EXTENSION_RESPONSE (29)
    '00000005', Buffer.from('query').toString('hex'),
    '00000018', Buffer.from('session-bind@openssh.com').toString('hex'),
  ].join(''),
  'hex',
);
const QUERY = frame(Buffer.concat([Buffer.of(27), sshString('query')]));

/** A session-bind that real ssh sent for a real sshd's host key (test/fixtures/agent-frames.json). */
function capturedSessionBind(): { payload: Buffer; sessionId: Buffer; hostKey: Buffer } {
  const captured = fixture.frames.find((f) => f.direction === 'request' && f.msgType === 27 && f.client !== 'manual-query')!;
  const payload = Buffer.from(payloadOf(captured));
  const [name, afterName] = readString(payload, 1);
  expect(name.toString()).toBe('session-bind@openssh.com');
  const [hostKey, afterKey] = readString(payload, afterName);
  const [sessionId] = readString(payload, afterKey);
  expect(hostKey.equals(parseLine(fixture.sshdHostKey).blob)).toBe(true);
  return { payload, sessionId: Buffer.from(sessionId), hostKey: Buffer.from(hostKey) };
}

/** What ssh asks the agent to sign to log in as `user` with `keyBlob` (RFC 4252 §7). */
function userauthData(sessionId: Buffer, user: string, keyBlob: Buffer): Buffer {
  return Buffer.concat([
    sshString(sessionId),
    Buffer.of(50),
    sshString(user),
    sshString('ssh-connection'),
    sshString('publickey'),
    Buffer.of(1),
    sshString('ssh-ed25519'),
    sshString(keyBlob),
  ]);
}

describe('extensions', () => {
  it('`query` is answered with the bytes OpenSSH\'s agent sends, unlocked and locked', async () => {
    const k = freshEnv('keyhold-conv-query-');
    keyholdOk(k, ['key', 'generate', 'web']);
    const serve = await startServe(k);
    const c = await connect(serve.socket('web'));
    c.send(QUERY);
    expect(Buffer.concat([u32((await c.reply()).length), c.frames[0]!]).toString('hex')).toBe(OPENSSH_QUERY_REPLY.toString('hex'));
    expect(c.received).toBe(OPENSSH_QUERY_REPLY.length);

    keyholdOk(k, ['lock']);
    c.send(QUERY);
    expect((await c.reply()).equals(OPENSSH_QUERY_REPLY.subarray(4))).toBe(true);
  });

  it('session-bind is verified and recorded while locked: a forged one gets 28, and after unlock a login sign names the bound host key', async () => {
    const k = freshEnv('keyhold-conv-bind-');
    const line = keyholdOk(k, ['key', 'generate', 'web', '--comment', 'bind-key']);
    const keyBlob = blobOf(line);
    const serve = await startServe(k);
    keyholdOk(k, ['lock']);
    const bind = capturedSessionBind();
    const c = await connect(serve.socket('web'));
    c.send(identitiesFrame());
    expect(parseIdentities(await c.reply())).toEqual([]);

    // A bind whose signature does not cover its session id: EXTENSION_FAILURE, as unlocked.
    const forged = Buffer.from(bind.payload);
    const at = bind.payload.indexOf(bind.sessionId);
    forged[at] = forged[at]! ^ 1;
    c.send(frame(forged));
    expect([...(await c.reply())]).toEqual([28]);
    // The real one: SUCCESS while locked (OpenSSH 10.5 accepts it too).
    c.send(frame(bind.payload));
    expect([...(await c.reply())]).toEqual([6]);
    const data = userauthData(bind.sessionId, 'git', keyBlob);
    c.send(signRequestFrame(keyBlob, data));
    expect([...(await c.reply())]).toEqual([5]);

    // Unlocked, the same connection still carries its binding: the login's audit line names the host.
    keyholdOk(k, ['unlock']);
    c.send(signRequestFrame(keyBlob, data));
    expect(verifyEd25519(keyBlob, data, await c.reply())).toBe(true);
    const hostFingerprint = `SHA256:${createHash('sha256').update(bind.hostKey).digest('base64').replace(/=+$/, '')}`;
    await waitFor(() => completeEntries(k).some((e) => e.event === 'sign'), 5000, 'the sign audit line');
    const sign = completeEntries(k).filter((e) => e.event === 'sign').pop()!;
    expect(sign.user).toBe('git');
    expect(sign.host_key).toBe(hostFingerprint);
  });
});

describe('keyhold stop', () => {
  it('stops a running daemon as on SIGTERM (sockets and pid file gone, lock audited), then says no daemon (exit 3)', async () => {
    const k = freshEnv('keyhold-conv-stop-');
    keyholdOk(k, ['key', 'generate', 'web']);
    const serve = await startServe(k);
    const exited = new Promise<number | null>((resolve) => serve.proc.once('exit', (code) => resolve(code)));
    const control = join(k.runtime, 'control.sock');
    expect(existsSync(serve.socket('web')) && existsSync(control)).toBe(true);

    const stopped = keyhold(k, ['stop']);
    expect(stopped.status, stopped.stderr).toBe(0);
    expect(stopped.stdout).toBe(`keyhold daemon (pid ${serve.proc.pid}) stopped\n`);
    // `stop` returned once the process was gone.
    expect(processAlive(serve.proc.pid!)).toBe(false);
    expect(await exited).toBe(0);
    for (const path of [serve.socket('web'), control, join(k.runtime, 'daemon.pid')]) expect(existsSync(path), path).toBe(false);
    const lock = completeEntries(k).filter((e) => e.event === 'lock').pop();
    expect(lock?.reason).toBe('keyhold stop');
    expect((lock?.peer as { pid?: number } | undefined)?.pid).toBeGreaterThan(0);
    expect(serve.stderr()).toContain('keyhold daemon stopped');

    const again = keyhold(k, ['stop']);
    expect(again.status).toBe(3);
    expect(again.stderr).toMatch(/^keyhold: no daemon is running in .* \(nothing to stop\)\n$/);
    expect(keyhold(k, ['status', '--quiet']).status).toBe(3);
  });

  it('stops the daemon `keyhold unlock` started in the background (--json)', async () => {
    const k = freshEnv('keyhold-conv-stop-bg-');
    keyholdOk(k, ['key', 'generate', 'web']);
    keyholdOk(k, ['unlock']);
    const pid = daemonPid(k.runtime)!;
    expect(processAlive(pid)).toBe(true);
    const stopped = JSON.parse(keyholdOk(k, ['stop', '--json'])) as { stopped: boolean; pid: number };
    expect(stopped).toEqual({ stopped: true, pid });
    expect(processAlive(pid)).toBe(false);
    expect(existsSync(join(k.runtime, 'scopes', 'web.sock'))).toBe(false);
  });
});

describe('keyhold unlock --scope S -c', () => {
  /** A runtime dir whose path needs quoting in both shells, `!` included (csh history). */
  function oddRuntime(k: KeyholdEnv): NodeJS.ProcessEnv {
    return { KEYHOLD_RUNTIME_DIR: join(k.dir, "run dir it's !1 $HOME") };
  }

  it('prints `setenv SSH_AUTH_SOCK …;` that tcsh evaluates to the scope socket: ssh-add -l lists the key', async () => {
    const k = freshEnv('keyhold-conv-csh-');
    keyholdOk(k, ['key', 'generate', 'web', '--comment', 'csh-key']);
    const env = oddRuntime(k);
    const socket = join(env.KEYHOLD_RUNTIME_DIR!, 'scopes', 'web.sock');
    try {
      const printed = keyhold(k, ['unlock', '--scope', 'web', '-c'], { env });
      expect(printed.status, printed.stderr).toBe(0);
      expect(printed.stdout).toBe(`setenv SSH_AUTH_SOCK '${socket.replace("'", `'\\''`).replace('!', `'\\!'`)}';\n`);

      const tcsh = ['/usr/bin/tcsh', '/bin/tcsh', '/bin/csh'].find((p) => existsSync(p));
      // scripts/test.sh installs tcsh: a machine without it is not set up for the suite.
      if (!tcsh) throw new Error('no tcsh or csh on this machine (scripts/test.sh installs tcsh)');
      const script = `eval "\`${process.execPath} ${KEYHOLD_BIN} unlock --scope web -c\`"; printf '%s\\n' "$SSH_AUTH_SOCK:q"; ssh-add -l`;
      const result = await run(tcsh, ['-fc', script], { env: { ...k.env, ...env }, timeoutMs: 20_000 });
      expect(result.code, result.stderr).toBe(0);
      const [shown, listed] = result.stdout.split('\n');
      expect(shown).toBe(socket);
      expect(listed).toContain('csh-key');
    } finally {
      // `unlock` started a daemon in this odd runtime dir, which afterEach does not know.
      await stopBackgroundDaemon(env.KEYHOLD_RUNTIME_DIR!);
    }
  });

  it('picks csh when $SHELL ends in csh, as ssh-agent does; -s forces Bourne syntax; -c with -s is a usage error', () => {
    const k = freshEnv('keyhold-conv-shell-');
    keyholdOk(k, ['key', 'generate', 'web']);
    const socket = join(k.runtime, 'scopes', 'web.sock');
    const line = (args: string[], shell: string) => keyhold(k, ['unlock', ...args], { env: { SHELL: shell } });
    expect(line(['--scope', 'web'], '/bin/tcsh').stdout).toBe(`setenv SSH_AUTH_SOCK ${socket};\n`);
    expect(line(['--scope', 'web', '-s'], '/bin/tcsh').stdout).toBe(`export SSH_AUTH_SOCK=${socket}\n`);
    expect(line(['-s', '--scope', 'web'], '/bin/csh').stdout).toBe(`export SSH_AUTH_SOCK=${socket}\n`);
    expect(line(['--scope', 'web'], '/bin/bash').stdout).toBe(`export SSH_AUTH_SOCK=${socket}\n`);
    expect(line(['--scope', 'web', '-c'], '/bin/bash').stdout).toBe(`setenv SSH_AUTH_SOCK ${socket};\n`);
    const both = line(['--scope', 'web', '-c', '-s'], '/bin/bash');
    expect(both.status).toBe(2);
    expect(both.stderr).toMatch(/^keyhold: .*mutually exclusive/);
  });
});
