// The runtime dir, its sockets and daemon.pid: modes, refusals, stale leftovers, one daemon per dir.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  frameBytes,
  initVault,
  keyhold,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  RawAgentClient,
  serveExpectingExit,
  startServe,
  stopAllServes,
  waitFor,
  type KeyholdEnv,
} from '../helpers/keyhold.js';

const envs: KeyholdEnv[] = [];
const clients: RawAgentClient[] = [];

function vaultWith(scopes: string[]): KeyholdEnv {
  const k = makeKeyholdEnv('keyhold-daemon-rt-');
  envs.push(k);
  initVault(k);
  for (const scope of scopes) keyholdOk(k, ['key', 'generate', scope, '--comment', `${scope}-key`]);
  return k;
}


async function identitiesComments(path: string): Promise<string[]> {
  const c = await RawAgentClient.connect(path);
  clients.push(c);
  c.send(frameBytes(Buffer.of(11)));
  const reply = await c.reply();
  c.close();
  expect(reply[0]).toBe(12);
  const comments: string[] = [];
  let off = 5;
  for (let i = 0; i < reply.readUInt32BE(1); i++) {
    off += 4 + reply.readUInt32BE(off);
    const len = reply.readUInt32BE(off);
    comments.push(reply.subarray(off + 4, off + 4 + len).toString());
    off += 4 + len;
  }
  return comments;
}

/** Leaves a real, dead socket file at `path`: a process listens there and is SIGKILLed. */
function leaveStaleSocket(path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const script = `require('node:net').createServer().listen(process.argv[1], () => process.kill(process.pid, 'SIGKILL'))`;
    const child = spawn(process.execPath, ['-e', script, path], { stdio: 'ignore' });
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('exit', () => {
      clearTimeout(timer);
      if (existsSync(path) && lstatSync(path).isSocket()) resolve();
      else reject(new Error(`no stale socket left at ${path}`));
    });
  });
}

const mode = (path: string) => lstatSync(path).mode & 0o777;
const requireRoot = (what: string) => {
  if (process.getuid!() !== 0) throw new Error(`${what} needs root (uid 0); this run is uid ${process.getuid!()}. CI runs as root.`);
};

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await stopAllServes();
  for (const k of envs.splice(0)) k.cleanup();
});

describe('runtime dir', () => {
  it('is created 0700 with 0700 scopes dir, 0600 sockets and daemon.pid holding the pid', async () => {
    const k = vaultWith(['web', 'api']);
    expect(existsSync(k.runtime)).toBe(false);
    const serve = await startServe(k);
    expect(mode(k.runtime)).toBe(0o700);
    expect(mode(join(k.runtime, 'scopes'))).toBe(0o700);
    for (const scope of ['web', 'api']) {
      const sock = serve.socket(scope);
      expect(lstatSync(sock).isSocket()).toBe(true);
      expect(mode(sock)).toBe(0o600);
    }
    const pidFile = join(k.runtime, 'daemon.pid');
    expect(readFileSync(pidFile, 'utf8').trim()).toBe(String(serve.proc.pid));
    expect(mode(pidFile) & 0o077).toBe(0);
    expect(await identitiesComments(serve.socket('api'))).toEqual(['api-key']);
  });

  it('a runtime dir open to others (0755) is refused, naming the dir', async () => {
    const k = vaultWith(['web']);
    mkdirSync(k.runtime, { mode: 0o755 });
    chmodSync(k.runtime, 0o755);
    const { code, stderr } = await serveExpectingExit(k, [], 10_000);
    expect(code).toBe(1);
    expect(stderr).toContain(k.runtime);
    expect(stderr).toMatch(/^keyhold: .+ \(.+\)$/m);
    expect(stderr).not.toMatch(/^\s+at /m);
    expect(existsSync(join(k.runtime, 'scopes', 'web.sock'))).toBe(false);
    expect(mode(k.runtime)).toBe(0o755); // not silently "fixed"
  });

  it('a runtime dir with group access only (0710) is refused too', async () => {
    const k = vaultWith(['web']);
    mkdirSync(k.runtime, { mode: 0o700 });
    chmodSync(k.runtime, 0o710);
    const { code, stderr } = await serveExpectingExit(k, [], 10_000);
    expect(code).toBe(1);
    expect(stderr).toContain(k.runtime);
  });

  it('a runtime dir owned by another user is refused, naming the dir', async () => {
    requireRoot('chowning the runtime dir to another user');
    const k = vaultWith(['web']);
    mkdirSync(k.runtime, { mode: 0o700 });
    chownSync(k.runtime, 65534, 65534);
    const { code, stderr } = await serveExpectingExit(k, [], 10_000);
    expect(code).toBe(1);
    expect(stderr).toContain(k.runtime);
    expect(stderr).toMatch(/owned/);
    expect(existsSync(join(k.runtime, 'daemon.pid'))).toBe(false);
  });

  it('a scopes dir open to others is refused', async () => {
    const k = vaultWith(['web']);
    mkdirSync(join(k.runtime, 'scopes'), { recursive: true, mode: 0o700 });
    chmodSync(join(k.runtime, 'scopes'), 0o777);
    const { code, stderr } = await serveExpectingExit(k, [], 10_000);
    expect(code).toBe(1);
    expect(stderr).toContain(join(k.runtime, 'scopes'));
  });
});

describe('leftovers and concurrency', () => {
  it('a stale socket file at scopes/web.sock is replaced on start', async () => {
    const k = vaultWith(['web']);
    mkdirSync(join(k.runtime, 'scopes'), { recursive: true, mode: 0o700 });
    const sock = join(k.runtime, 'scopes', 'web.sock');
    await leaveStaleSocket(sock);
    await expect(RawAgentClient.connect(sock)).rejects.toThrow(/ECONNREFUSED/);
    const serve = await startServe(k);
    expect(await identitiesComments(serve.socket('web'))).toEqual(['web-key']);
    expect(mode(sock)).toBe(0o600);
  });

  it('a regular file at scopes/web.sock is left alone and that scope refused, while other scopes are served', async () => {
    const k = vaultWith(['web', 'api']);
    mkdirSync(join(k.runtime, 'scopes'), { recursive: true, mode: 0o700 });
    const sock = join(k.runtime, 'scopes', 'web.sock');
    writeFileSync(sock, 'not a socket\n', { mode: 0o600 });
    const serve = await startServe(k);
    expect(await identitiesComments(serve.socket('api'))).toEqual(['api-key']);
    expect(lstatSync(sock).isFile()).toBe(true);
    expect(readFileSync(sock, 'utf8')).toBe('not a socket\n');
    const errors = serve
      .stderr()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { level: number; scope?: string; msg: string })
      .filter((e) => e.level >= 50);
    expect(errors.some((e) => e.scope === 'web')).toBe(true);
    expect(serve.proc.exitCode).toBeNull();
  });

  it('a second serve on the same runtime dir exits 1 naming the running pid', async () => {
    const k = vaultWith(['web']);
    const first = await startServe(k);
    const { code, stderr } = await serveExpectingExit(k, [], 10_000);
    expect(code).toBe(1);
    expect(stderr).toContain(`pid ${first.proc.pid}`);
    expect(stderr).not.toMatch(/^\s+at /m);
    // the first one is unharmed: pid file and sockets intact
    expect(readFileSync(join(k.runtime, 'daemon.pid'), 'utf8').trim()).toBe(String(first.proc.pid));
    expect(await identitiesComments(first.socket('web'))).toEqual(['web-key']);
  });

  it('after kill -9 of the daemon a new serve starts fine over the stale pid file and sockets', async () => {
    const k = vaultWith(['web']);
    const first = await startServe(k);
    const exited = new Promise((r) => first.proc.once('exit', r));
    first.proc.kill('SIGKILL');
    await exited;
    expect(existsSync(join(k.runtime, 'daemon.pid'))).toBe(true);
    expect(lstatSync(first.socket('web')).isSocket()).toBe(true);
    const second = await startServe(k);
    expect(readFileSync(join(k.runtime, 'daemon.pid'), 'utf8').trim()).toBe(String(second.proc.pid));
    expect(await identitiesComments(second.socket('web'))).toEqual(['web-key']);
  });

  it('the runtime dir removed under a running daemon is put back: dir 0700, daemon.pid, control and scope sockets; a second serve is refused', async () => {
    const k = vaultWith(['web']);
    const serve = await startServe(k);
    rmSync(k.runtime, { recursive: true, force: true });
    await waitFor(() => existsSync(join(k.runtime, 'control.sock')) && existsSync(serve.socket('web')), 5_000, 'the runtime dir to be put back');
    expect(mode(k.runtime)).toBe(0o700);
    expect(mode(serve.socket('web'))).toBe(0o600);
    expect(readFileSync(join(k.runtime, 'daemon.pid'), 'utf8').trim()).toBe(String(serve.proc.pid));
    expect(keyhold(k, ['status', '--quiet']).status).toBe(0);
    expect(await identitiesComments(serve.socket('web'))).toEqual(['web-key']);
    const second = await serveExpectingExit(k, [], 10_000);
    expect(second.code).toBe(1);
    expect(second.stderr).toContain(`already running (pid ${serve.proc.pid})`);
    // Only the control socket removed: put back too (the daemon keeps the pid lock it holds).
    rmSync(join(k.runtime, 'control.sock'));
    await waitFor(() => existsSync(join(k.runtime, 'control.sock')), 5_000, 'the control socket to be put back');
    expect(keyhold(k, ['status', '--quiet']).status).toBe(0);
    expect(readFileSync(join(k.runtime, 'daemon.pid'), 'utf8').trim()).toBe(String(serve.proc.pid));
    expect(serve.proc.exitCode).toBeNull();
  });

  it('SIGTERM removes the sockets and daemon.pid and exits 0', async () => {
    const k = vaultWith(['web', 'api']);
    const serve = await startServe(k);
    expect(existsSync(serve.socket('web'))).toBe(true);
    const code = await serve.stop();
    expect(code).toBe(0);
    expect(existsSync(serve.socket('web'))).toBe(false);
    expect(existsSync(serve.socket('api'))).toBe(false);
    expect(existsSync(join(k.runtime, 'daemon.pid'))).toBe(false);
  });

  it('SIGTERM exits promptly even while a client keeps a connection open', async () => {
    const k = vaultWith(['web']);
    const serve = await startServe(k);
    const idle = await RawAgentClient.connect(serve.socket('web'));
    clients.push(idle);
    idle.send(frameBytes(Buffer.of(11)));
    expect((await idle.reply())[0]).toBe(12);
    const exited = new Promise<number | null>((r) => serve.proc.once('exit', (c) => r(c)));
    const start = Date.now();
    serve.proc.kill('SIGTERM');
    const code = await Promise.race([exited, new Promise<'hung'>((r) => setTimeout(() => r('hung'), 3000))]);
    expect(code, `daemon still running ${Date.now() - start} ms after SIGTERM with one idle client`).toBe(0);
    expect(existsSync(serve.socket('web'))).toBe(false);
    expect(existsSync(join(k.runtime, 'daemon.pid'))).toBe(false);
  });
});
