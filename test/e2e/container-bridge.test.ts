// The container side: `keyhold bridge` (and a socat bridge built from the wire description) turns
// the token-gated signer into a plain SSH_AUTH_SOCK that unmodified `ssh-add`, `ssh` and `git` use;
// also from inside a fresh network namespace that reaches the signer only through its Unix socket.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  initVault,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  startServe,
  stopAllServes,
  waitFor,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';
import { freePort } from '../helpers/raw-wire.js';
import { run, startSshd, stopAllSshd, type Run, type SshdHandle } from '../helpers/sshd.js';

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A clean environment for client tools: no keyhold or git settings of the caller. */
function cleanEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(env)) {
    if (name.startsWith('KEYHOLD_') || name.startsWith('GIT_') || name === 'SSH_AUTH_SOCK') delete env[name];
  }
  return { ...env, ...extra };
}

interface Spawned {
  proc: ChildProcess;
  stdout(): string;
  stderr(): string;
  stop(): Promise<void>;
}

const processes = new Set<Spawned>();

/** Spawns a long-running helper in its own process group; stop() ends the group. */
function spawnTracked(cmd: string, args: string[], env: NodeJS.ProcessEnv): Spawned {
  const proc = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) resolve();
    proc.once('exit', () => resolve());
    proc.once('error', () => resolve());
  });
  const signal = (sig: NodeJS.Signals) => {
    try {
      process.kill(-proc.pid!, sig);
    } catch {
      /* already gone */
    }
  };
  const handle: Spawned = {
    proc,
    stdout: () => stdout,
    stderr: () => stderr,
    async stop() {
      processes.delete(handle);
      if (proc.pid === undefined) return;
      if (proc.exitCode === null && proc.signalCode === null) {
        signal('SIGTERM');
        const timer = setTimeout(() => signal('SIGKILL'), 3000);
        await exited;
        clearTimeout(timer);
      }
      signal('SIGKILL'); // children (socat forks) that outlived the parent
    },
  };
  processes.add(handle);
  return handle;
}

/** Starts `keyhold bridge` and waits for its `SSH_AUTH_SOCK=` line (or its exit). */
async function startBridge(args: string[], env: NodeJS.ProcessEnv): Promise<Spawned> {
  const bridge = spawnTracked(process.execPath, [KEYHOLD_BIN, 'bridge', ...args], cleanEnv(env));
  await waitFor(
    () => bridge.stdout().includes('SSH_AUTH_SOCK=') || bridge.proc.exitCode !== null,
    10_000,
    'keyhold bridge to print SSH_AUTH_SOCK=',
  );
  if (bridge.proc.exitCode !== null) throw new Error(`keyhold bridge exited ${bridge.proc.exitCode}: ${bridge.stderr()}`);
  return bridge;
}

/** `ssh-add -l` with SSH_AUTH_SOCK = sock: exit code and the listed fingerprints (sorted). */
async function sshAddList(sock: string, timeoutMs = 20_000): Promise<{ r: Run; fingerprints: string[] }> {
  const r = await run('ssh-add', ['-l'], { env: cleanEnv({ SSH_AUTH_SOCK: sock }), timeoutMs });
  return { r, fingerprints: fingerprintsOf(r.stdout) };
}

function fingerprintsOf(sshAddOutput: string): string[] {
  return sshAddOutput
    .split('\n')
    .map((l) => /^\d+ (SHA256:[A-Za-z0-9+/]{43}) /.exec(l)?.[1])
    .filter((x): x is string => x !== undefined)
    .sort();
}

// ---------------------------------------------------------------------------------------------
// Fixture: one daemon with TCP and Unix token listeners; scopes web (2 keys) and other (1 key)
// ---------------------------------------------------------------------------------------------

let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
let port: number;
let signerPath: string;
let webFps: string[];
let otherFps: string[];
let webToken: string;
let otherToken: string;
let sshd: SshdHandle | undefined;
let counter = 0;
const sockPath = (name: string) => join(work, `${name}-${counter++}.sock`);

function scopeFingerprints(env: KeyholdEnv, scope: string): string[] {
  return (JSON.parse(keyholdOk(env, ['key', 'list', '--scope', scope, '--json'])) as { fingerprint: string }[])
    .map((x) => x.fingerprint)
    .sort();
}

function diagnostics(r?: Run, bridge?: Spawned): string {
  return [
    r ? `--- client stdout ---\n${r.stdout}\n--- client stderr ---\n${r.stderr}` : '',
    bridge ? `--- bridge stderr ---\n${bridge.stderr().slice(-2000)}` : '',
    `--- keyhold serve stderr (tail) ---\n${serve?.stderr().slice(-2000) ?? ''}`,
    sshd ? `--- sshd stderr (tail) ---\n${sshd.stderr().slice(-2000)}` : '',
  ].join('\n');
}

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-container-bridge-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-cb-'));
  signerPath = join(work, 'signer.sock');
  initVault(k);
  keyholdOk(k, ['key', 'generate', 'web', '--type', 'ed25519', '--comment', 'bridge-web-ed25519']);
  keyholdOk(k, ['key', 'generate', 'web', '--type', 'ecdsa', '--comment', 'bridge-web-ecdsa']);
  keyholdOk(k, ['key', 'generate', 'other', '--type', 'ed25519', '--comment', 'bridge-other']);
  webFps = scopeFingerprints(k, 'web');
  otherFps = scopeFingerprints(k, 'other');
  webToken = keyholdOk(k, ['token', 'issue', 'web', '--subject', 'container-1']).trim();
  otherToken = keyholdOk(k, ['token', 'issue', 'other', '--subject', 'container-2']).trim();
  port = await freePort();
  serve = await startServe(k, ['--listen', `tcp:127.0.0.1:${port}`, '--listen', `unix:${signerPath}`]);
}, 60_000);

afterAll(async () => {
  await Promise.all([...processes].map((p) => p.stop()));
  await stopAllSshd();
  await stopAllServes();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
}, 30_000);

// ---------------------------------------------------------------------------------------------
// keyhold bridge
// ---------------------------------------------------------------------------------------------

describe('keyhold bridge', () => {
  const combos = [
    { connect: 'unix', tokenFrom: 'env' },
    { connect: 'unix', tokenFrom: 'file' },
    { connect: 'tcp', tokenFrom: 'env' },
    { connect: 'tcp', tokenFrom: 'file' },
  ] as const;

  for (const { connect: via, tokenFrom } of combos) {
    it(`--connect ${via}, token from ${tokenFrom === 'env' ? 'KEYHOLD_TOKEN' : '--token-file'}: prints SSH_AUTH_SOCK=<path>; ssh-add -l lists the scope's keys`, async () => {
      const listen = sockPath(`bridge-${via}-${tokenFrom}`);
      const target = via === 'unix' ? `unix:${signerPath}` : `tcp:127.0.0.1:${port}`;
      const args = ['--connect', target, '--listen', listen];
      const env: NodeJS.ProcessEnv = {};
      if (tokenFrom === 'env') env.KEYHOLD_TOKEN = webToken;
      else {
        const file = join(work, `token-${counter++}`);
        writeFileSync(file, `${webToken}\n`, { mode: 0o600 }); // as `keyhold token issue > file` leaves it
        args.push('--token-file', file);
      }
      const bridge = await startBridge(args, env);
      try {
        expect(bridge.stdout().split('\n')[0]).toBe(`SSH_AUTH_SOCK=${listen}`);
        expect(statSync(listen).isSocket()).toBe(true);
        // The token is not in the bridge's argv.
        const cmdline = readFileSync(`/proc/${bridge.proc.pid}/cmdline`, 'utf8');
        expect(cmdline.includes(webToken), 'token in the bridge argv').toBe(false);

        const { r, fingerprints } = await sshAddList(listen);
        expect(r.code, diagnostics(r, bridge)).toBe(0);
        expect(fingerprints).toEqual(webFps);
        for (const fp of otherFps) expect(fingerprints).not.toContain(fp);
        // A second client on the same bridge is served too.
        const again = await sshAddList(listen);
        expect(again.r.code, diagnostics(again.r, bridge)).toBe(0);
        expect(again.fingerprints).toEqual(webFps);
        expect(bridge.stderr().includes(webToken), 'token in the bridge log').toBe(false);
      } finally {
        await bridge.stop();
      }
    });
  }

  it('another scope\'s token through a bridge lists only that scope\'s key', async () => {
    const listen = sockPath('bridge-other');
    const bridge = await startBridge(['--connect', `unix:${signerPath}`, '--listen', listen], { KEYHOLD_TOKEN: otherToken });
    try {
      const { r, fingerprints } = await sshAddList(listen);
      expect(r.code, diagnostics(r, bridge)).toBe(0);
      expect(fingerprints).toEqual(otherFps);
    } finally {
      await bridge.stop();
    }
  });

  it('with an unknown token the bridge never listens: exit 4 (see bridge-feedback.test.ts)', async () => {
    const listen = sockPath('bridge-bad');
    const bad = 'khp_' + randomBytes(32).toString('base64url');
    const r = await run(process.execPath, [KEYHOLD_BIN, 'bridge', '--connect', `tcp:127.0.0.1:${port}`, '--listen', listen], {
      env: cleanEnv({ KEYHOLD_TOKEN: bad }),
      timeoutMs: 20_000,
    });
    expect(r.code, diagnostics(r)).toBe(4);
    expect(r.stdout).not.toContain('SSH_AUTH_SOCK=');
    expect(existsSync(listen)).toBe(false);
  });

  it('--token on argv is refused with exit 2 (both spellings), without echoing it and without creating the socket', async () => {
    // A valid token is also offered the allowed ways, so --token itself is the only thing to refuse.
    const file = join(work, `token-${counter++}`);
    writeFileSync(file, webToken, { mode: 0o600 });
    for (const form of [['--token', webToken], [`--token=${webToken}`]]) {
      for (const allowed of [['--token-file', file], []]) {
        const listen = sockPath('bridge-argv');
        const r = await run(process.execPath, [KEYHOLD_BIN, 'bridge', '--connect', `unix:${signerPath}`, '--listen', listen, ...form, ...allowed], {
          env: cleanEnv({ KEYHOLD_TOKEN: webToken }),
          timeoutMs: 5000,
        });
        const what = `${form[0]!.slice(0, 8)} ${allowed.join(' ')}: ${r.stderr}`;
        expect(r.code, what).toBe(2);
        expect(r.stderr, what).toMatch(/^keyhold: .*--token(?!-file)/);
        expect(r.stderr.includes(webToken), what).toBe(false);
        expect(r.stdout, what).not.toContain('SSH_AUTH_SOCK=');
        expect(existsSync(listen), what).toBe(false);
      }
    }
  });

  it('no token at all (no --token-file, no KEYHOLD_TOKEN) is a usage error (exit 2)', async () => {
    const listen = sockPath('bridge-none');
    const r = await run(process.execPath, [KEYHOLD_BIN, 'bridge', '--connect', `unix:${signerPath}`, '--listen', listen], {
      env: cleanEnv(),
      timeoutMs: 5000,
    });
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/^keyhold: /);
    expect(existsSync(listen)).toBe(false);
  });

  it('started before the daemon: retries, says ready once the daemon is up, and serves (Unix and TCP)', async () => {
    const k2 = makeKeyholdEnv('keyhold-container-late-');
    try {
      initVault(k2);
      keyholdOk(k2, ['key', 'generate', 'late', '--type', 'ed25519', '--comment', 'late-key']);
      const lateFps = scopeFingerprints(k2, 'late');
      const token = keyholdOk(k2, ['token', 'issue', 'late']).trim();
      const lateSigner = join(work, 'late-signer.sock');
      const latePort = await freePort();
      const unixListen = sockPath('late-unix');
      const tcpListen = sockPath('late-tcp');
      const started = Date.now();
      // The bridges check their token before they say ready, so they wait for the signer.
      const ready = Promise.all([
        startBridge(['--connect', `unix:${lateSigner}`, '--listen', unixListen], { KEYHOLD_TOKEN: token }),
        startBridge(['--connect', `tcp:127.0.0.1:${latePort}`, '--listen', tcpListen], { KEYHOLD_TOKEN: token }),
      ]);
      let settled = false;
      void ready.finally(() => (settled = true)).catch(() => {});
      await sleep(Math.max(300, started + 900 - Date.now()));
      expect(existsSync(lateSigner)).toBe(false);
      expect(settled, 'a bridge said ready (or gave up) before the daemon was started').toBe(false);
      expect(existsSync(unixListen) || existsSync(tcpListen), 'a bridge socket before the token was checked').toBe(false);
      const late = await startServe(k2, ['--listen', `tcp:127.0.0.1:${latePort}`, '--listen', `unix:${lateSigner}`]);
      try {
        const started2 = await ready;
        try {
          for (const listen of [unixListen, tcpListen]) {
            const { r, fingerprints } = await sshAddList(listen);
            expect(r.code, `${r.stderr}\n${late.stderr().slice(-2000)}`).toBe(0);
            expect(fingerprints).toEqual(lateFps);
          }
        } finally {
          await Promise.all(started2.map((b) => b.stop()));
        }
      } finally {
        await late.stop();
      }
    } finally {
      k2.cleanup();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// A fresh network namespace
// ---------------------------------------------------------------------------------------------

describe('from a fresh network namespace (unshare --net)', () => {
  it('ssh-add -l through a bridge started inside the namespace reaches the signer over the Unix socket; TCP 127.0.0.1 is not reachable there', async () => {
    if (process.getuid?.() !== 0) {
      throw new Error('this test needs root: `unshare --net` creates a network namespace (run the suite as root)');
    }
    const dir = mkdtempSync(join(work, 'netns-'));
    const sock = join(dir, 'agent.sock');
    const script = join(dir, 'inside.sh');
    const probe = `
      const s = require('node:net').connect({ host: '127.0.0.1', port: Number(process.env.PORT) });
      const done = (what) => { console.log('tcp=' + what); s.destroy(); process.exit(0); };
      s.on('connect', () => done('connected'));
      s.on('error', (e) => done(e.code));
      setTimeout(() => done('timeout'), 3000);
    `;
    writeFileSync(
      script,
      `set -u
ip link set lo up 2>/dev/null && echo "lo=up" || echo "lo=down"
"$NODE" "$KEYHOLD" bridge --connect "unix:$SIGNER" --listen "$SOCK" >"$DIR/bridge.out" 2>"$DIR/bridge.err" &
bp=$!
i=0
while [ ! -S "$SOCK" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
SSH_AUTH_SOCK="$SOCK" ssh-add -l
echo "ssh-add-exit=$?"
"$NODE" -e "$PROBE"
kill $bp
wait $bp
echo "bridge-exit=$?"
`,
    );
    // Its own process group, so a hang cannot leave the bridge started inside running.
    const inside = spawnTracked(
      'unshare',
      ['--net', 'sh', script],
      cleanEnv({
        NODE: process.execPath,
        KEYHOLD: KEYHOLD_BIN,
        SIGNER: signerPath,
        SOCK: sock,
        DIR: dir,
        PORT: String(port),
        PROBE: probe,
        KEYHOLD_TOKEN: webToken,
      }),
    );
    let r: Run;
    try {
      await waitFor(() => inside.proc.exitCode !== null || inside.proc.signalCode !== null, 30_000, 'the namespace script');
      // Let the pipes drain.
      await Promise.race([
        new Promise<void>((resolve) => (inside.proc.stdout!.readableEnded ? resolve() : inside.proc.stdout!.once('end', () => resolve()))),
        sleep(2000),
      ]);
      r = { code: inside.proc.exitCode, stdout: inside.stdout(), stderr: inside.stderr() };
    } finally {
      await inside.stop();
    }
    const bridgeErr = existsSync(join(dir, 'bridge.err')) ? readFileSync(join(dir, 'bridge.err'), 'utf8') : '';
    const why = `${diagnostics(r)}\n--- bridge (inside) stderr ---\n${bridgeErr}`;
    expect(r.code, why).toBe(0);
    expect(r.stdout, why).toMatch(/^ssh-add-exit=0$/m);
    expect(fingerprintsOf(r.stdout), why).toEqual(webFps);
    expect(readFileSync(join(dir, 'bridge.out'), 'utf8')).toContain(`SSH_AUTH_SOCK=${sock}`);
    // Isolation: the daemon's TCP listener does not exist in there.
    const tcp = /^tcp=(\S+)$/m.exec(r.stdout)?.[1];
    expect(tcp, why).toBeDefined();
    expect(tcp, 'TCP 127.0.0.1 reachable from inside the namespace').not.toBe('connected');
    expect(['ECONNREFUSED', 'ENETUNREACH', 'EHOSTUNREACH', 'timeout']).toContain(tcp);

    // Control: from the test's own namespace the same TCP port is listening.
    const outside = await new Promise<string>((resolve) => {
      const s = connect({ host: '127.0.0.1', port });
      s.on('connect', () => {
        s.destroy();
        resolve('connected');
      });
      s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
    });
    expect(outside).toBe('connected');
  });
});

// ---------------------------------------------------------------------------------------------
// A socat bridge from the wire description
// ---------------------------------------------------------------------------------------------

describe('a socat bridge (uint32 length + token, then a plain relay)', () => {
  // The EXEC helper: 4-byte big-endian length, the token, then stdin/stdout relayed to the signer.
  const helper = String.raw`#!/bin/sh
tok=$(cat "$TOKEN_FILE")
n=$(printf %s "$tok" | wc -c)
{ printf "\000\000\000\\$(printf %03o "$n")"; printf %s "$tok"; exec cat; } | exec socat - "$SIGNER_ADDR"
`;

  for (const via of ['unix', 'tcp'] as const) {
    it(`socat UNIX-LISTEN,fork EXEC:helper → ${via === 'unix' ? 'UNIX-CONNECT' : 'TCP:127.0.0.1'}: ssh-add -l lists the keys`, async () => {
      const dir = mkdtempSync(join(work, 'socat-'));
      const script = join(dir, 'handshake.sh');
      writeFileSync(script, helper, { mode: 0o700 });
      const tokenFile = join(dir, 'token');
      writeFileSync(tokenFile, webToken, { mode: 0o600 });
      const sock = join(dir, 'agent.sock');
      const socat = spawnTracked('socat', [`UNIX-LISTEN:${sock},fork`, `EXEC:${script}`], {
        ...cleanEnv(),
        TOKEN_FILE: tokenFile,
        SIGNER_ADDR: via === 'unix' ? `UNIX-CONNECT:${signerPath}` : `TCP:127.0.0.1:${port}`,
      });
      try {
        await waitFor(() => existsSync(sock) || socat.proc.exitCode !== null, 10_000, 'socat to listen');
        expect(socat.proc.exitCode, socat.stderr()).toBeNull();
        for (let i = 0; i < 2; i++) {
          const { r, fingerprints } = await sshAddList(sock);
          expect(r.code, `${diagnostics(r)}\n--- socat stderr ---\n${socat.stderr()}`).toBe(0);
          expect(fingerprints).toEqual(webFps);
        }
      } finally {
        await socat.stop();
      }
    });
  }
});

// ---------------------------------------------------------------------------------------------
// git push through the bridge
// ---------------------------------------------------------------------------------------------

describe('git push over ssh through the bridge', () => {
  it('pushes to a test sshd on 127.0.0.1 with SSH_AUTH_SOCK = the bridge socket; another scope\'s token is refused', async () => {
    const pubLines = keyholdOk(k, ['key', 'pub', 'web'])
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean);
    expect(pubLines).toHaveLength(2);
    sshd = await startSshd({
      authorizedKeys: pubLines,
      extraConfig: ['SetEnv GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null'],
    });
    const webSock = sockPath('git-web');
    const otherSock = sockPath('git-other');
    const webBridge = await startBridge(['--connect', `unix:${signerPath}`, '--listen', webSock], { KEYHOLD_TOKEN: webToken });
    const otherBridge = await startBridge(['--connect', `tcp:127.0.0.1:${port}`, '--listen', otherSock], { KEYHOLD_TOKEN: otherToken });
    try {
      const dir = mkdtempSync(join(work, 'git-'));
      const bare = join(dir, 'remote.git');
      const repo = join(dir, 'work');
      const gitEnv = cleanEnv({
        SSH_AUTH_SOCK: webSock,
        GIT_CONFIG_NOSYSTEM: '1',
        GIT_CONFIG_GLOBAL: '/dev/null',
        GIT_TERMINAL_PROMPT: '0',
        GIT_AUTHOR_NAME: 'keyhold e2e',
        GIT_AUTHOR_EMAIL: 'e2e@example.test',
        GIT_COMMITTER_NAME: 'keyhold e2e',
        GIT_COMMITTER_EMAIL: 'e2e@example.test',
        GIT_SSH_COMMAND: sshd.sshCommand(),
      });
      const git = (args: string[], env = gitEnv) => run('git', args, { env, cwd: existsSync(repo) ? repo : dir });
      const ok = async (args: string[]) => {
        const r = await git(args);
        if (r.code !== 0) throw new Error(`git ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
        return r.stdout.trim();
      };
      await ok(['init', '-q', '--bare', bare]);
      await ok(['init', '-q', '-b', 'main', repo]);
      writeFileSync(join(repo, 'README'), `container ${randomBytes(6).toString('hex')}\n`);
      await ok(['add', 'README']);
      await ok(['commit', '-q', '-m', 'from a container']);
      const head = await ok(['rev-parse', 'HEAD']);
      const url = `ssh://${sshd.user}@127.0.0.1:${sshd.port}${bare}`;

      // Through a bridge whose token's scope has no authorized key: refused, nothing pushed.
      const refused = await git(['push', '-q', url, 'main'], { ...gitEnv, SSH_AUTH_SOCK: otherSock });
      expect(refused.code, diagnostics(refused, otherBridge)).not.toBe(0);
      expect(refused.stderr).toMatch(/Permission denied/);
      const none = await run('git', ['--git-dir', bare, 'rev-parse', '--verify', '-q', 'refs/heads/main'], { env: gitEnv });
      expect(none.code).not.toBe(0);

      const push = await git(['push', '-q', url, 'main']);
      expect(push.code, diagnostics(push, webBridge)).toBe(0);
      const remote = await run('git', ['--git-dir', bare, 'rev-parse', 'refs/heads/main'], { env: gitEnv });
      expect(remote.code, remote.stderr).toBe(0);
      expect(remote.stdout.trim()).toBe(head);
      // sshd accepted one of the web keys.
      expect(sshd.stderr()).toMatch(new RegExp(`Accepted publickey for ${sshd.user} from 127\\.0\\.0\\.1`));
    } finally {
      await webBridge.stop();
      await otherBridge.stop();
      await sshd.stop();
    }
  });
});
