// The policy acceptance tests' world: two real sshd on 127.0.0.1 (hosts A and B, each its own host
// key), a HOME whose ~/.ssh/known_hosts names both (A's entry hashed with `ssh-keygen -H`, as
// HashKnownHosts leaves it), and a keyhold daemon with several keys in scope `web`. The CLI runs
// with that HOME, so `keyhold policy set` resolves host names the way it would for a user.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';
import { completeEntries, type Entry } from './audit.js';
import {
  initVault,
  keyhold,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  startServe,
  waitFor,
  type KeyholdEnv,
  type RunResult,
  type ServeHandle,
} from './keyhold.js';
import { keyFingerprint } from './ssh-agent.js';
import { run, startSshd, type Run, type SshdHandle } from './sshd.js';

export interface LabKey {
  fingerprint: string;
  /** `type base64 comment` */
  pubLine: string;
  /** A file holding pubLine: what `ssh-keygen -Y sign -f` and `ssh-add -T` take to use the agent's key. */
  pubFile: string;
}

export interface LabHost {
  sshd: SshdHandle;
  /** As ssh writes it into known_hosts for a port other than 22: `[127.0.0.1]:PORT`. */
  name: string;
  /** `SHA256:…` of its host key. */
  fingerprint: string;
}

export interface PolicyLab {
  k: KeyholdEnv;
  work: string;
  home: string;
  /** `$HOME/.ssh/known_hosts` of the CLI. */
  knownHosts: string;
  a: LabHost;
  b: LabHost;
  keys: LabKey[];
  scope: string;
  serve: ServeHandle;
  /** The scope socket of `web`. */
  sock: string;
  /** The token listener (`serve --listen unix:…`). */
  tokenListener: string;
  /** Restarts the daemon with other flags (`--confirm-timeout`, `--confirm-program`). */
  restart(serveArgs?: string[]): Promise<void>;
  /** sshd and daemon logs for an assertion message. */
  diagnostics(r?: Run | RunResult): string;
  stop(): Promise<void>;
}

const SCOPE = 'web';

/** Environment for a client tool (ssh, git, ssh-keygen) using `sock` as its agent; nothing of the caller's keyhold or git set-up. */
export function clientEnv(sock: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(env)) if (name.startsWith('KEYHOLD_') || name.startsWith('GIT_')) delete env[name];
  return { ...env, SSH_AUTH_SOCK: sock, ...extra };
}

export async function startPolicyLab(opts: { prefix: string; keyCount: number; serveArgs?: string[] }): Promise<PolicyLab> {
  const k = makeKeyholdEnv(opts.prefix);
  const work = mkdtempSync(join(tmpdir(), `${opts.prefix}work-`));
  const home = join(work, 'home');
  mkdirSync(join(home, '.ssh'), { recursive: true, mode: 0o700 });
  // The CLI reads ~/.ssh/known_hosts of this HOME; no display, so no default confirm program.
  k.env.HOME = home;
  for (const name of ['DISPLAY', 'WAYLAND_DISPLAY', 'SSH_ASKPASS', 'SSH_ASKPASS_REQUIRE', 'XDG_CONFIG_HOME']) delete k.env[name];
  initVault(k);
  const keys: LabKey[] = [];
  for (let i = 0; i < opts.keyCount; i++) {
    const out = JSON.parse(keyholdOk(k, ['key', 'generate', SCOPE, '--type', 'ed25519', '--comment', `policy-lab-${i}`, '--json'])) as {
      fingerprint: string;
      public: string;
    };
    const pubFile = join(work, `key-${i}.pub`);
    writeFileSync(pubFile, `${out.public.trim()}\n`);
    keys.push({ fingerprint: out.fingerprint, pubLine: out.public.trim(), pubFile });
  }
  const sshdOptions = {
    authorizedKeys: keys.map((key) => key.pubLine),
    // git on the far side must not read the machine's or the user's git config.
    extraConfig: ['SetEnv GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null'],
  };
  const [sshdA, sshdB] = await Promise.all([startSshd(sshdOptions), startSshd(sshdOptions)]);
  const host = (sshd: SshdHandle): LabHost => ({
    sshd,
    name: `[127.0.0.1]:${sshd.port}`,
    fingerprint: keyFingerprint(join(sshd.dir, 'ssh_host_ed25519_key.pub')),
  });
  const a = host(sshdA);
  const b = host(sshdB);
  const knownHosts = join(home, '.ssh', 'known_hosts');
  writeKnownHosts(knownHosts, [a], [b]);

  const tokenListener = join(work, 'signer.sock');
  const baseArgs = ['--listen', `unix:${tokenListener}`];
  let serve = await startServe(k, [...baseArgs, ...(opts.serveArgs ?? [])]);
  const lab: PolicyLab = {
    k,
    work,
    home,
    knownHosts,
    a,
    b,
    keys,
    scope: SCOPE,
    get serve() {
      return serve;
    },
    sock: serve.socket(SCOPE),
    tokenListener,
    async restart(serveArgs = []) {
      await serve.stop();
      serve = await startServe(k, [...baseArgs, ...serveArgs]);
    },
    diagnostics(r) {
      return [
        r ? `--- client stdout ---\n${r.stdout}\n--- client stderr ---\n${r.stderr}` : '',
        `--- sshd A stderr (tail) ---\n${a.sshd.stderr().slice(-1500)}`,
        `--- sshd B stderr (tail) ---\n${b.sshd.stderr().slice(-1500)}`,
        `--- keyhold serve stderr (tail) ---\n${serve.stderr().slice(-3000)}`,
      ].join('\n');
    },
    async stop() {
      await Promise.all([serve.stop(), a.sshd.stop(), b.sshd.stop()]);
      k.cleanup();
      rmSync(work, { recursive: true, force: true });
    },
  };
  return lab;
}

/** known_hosts with `hashed` entries hashed by `ssh-keygen -H` and `plain` ones as written. */
export function writeKnownHosts(path: string, hashed: LabHost[], plain: LabHost[], aliases: Array<{ name: string; host: LabHost }> = []): void {
  const line = (name: string, h: LabHost) => `${name} ${h.sshd.hostKeyPub}\n`;
  const scratch = `${path}.to-hash`;
  writeFileSync(scratch, hashed.map((h) => line(h.name, h)).join(''));
  execFileSync('ssh-keygen', ['-H', '-f', scratch], { stdio: 'ignore', timeout: 10_000 });
  const hashedText = readFileSync(scratch, 'utf8');
  rmSync(scratch, { force: true });
  rmSync(`${scratch}.old`, { force: true });
  for (const l of hashedText.split('\n').filter(Boolean)) expect(l, 'ssh-keygen -H hashes the entry').toMatch(/^\|1\|/);
  writeFileSync(path, hashedText + plain.map((h) => line(h.name, h)).join('') + aliases.map((x) => line(x.name, x.host)).join(''));
}

/** `keyhold policy set SCOPE -` with the TOML on stdin; fails the test unless it exits 0. */
export function setPolicy(lab: PolicyLab, toml: string, scope = lab.scope): void {
  const r = keyhold(lab.k, ['policy', 'set', scope, '-'], { input: toml });
  expect(r.status, `keyhold policy set ${scope} exited ${r.status}\n${r.stderr}\n--- policy ---\n${toml}`).toBe(0);
}

/** `keyhold policy check SCOPE ARGS`: exit code and output. */
export function checkPolicy(lab: PolicyLab, args: string[], scope = lab.scope): RunResult {
  return keyhold(lab.k, ['policy', 'check', scope, ...args]);
}

/** A message file to sign, unique per call. */
let messages = 0;
export function messageFile(lab: PolicyLab, text = `message ${messages}`): string {
  const path = join(lab.work, `msg-${messages++}.txt`);
  writeFileSync(path, `${text}\n`);
  return path;
}

/** `ssh-keygen -Y sign -n NS -f PUBFILE MSG` through `sock` (waits for it). */
export function sshsign(sock: string, key: LabKey, namespace: string, msg: string, timeoutMs = 20_000): Promise<Run> {
  return run('ssh-keygen', ['-Y', 'sign', '-n', namespace, '-f', key.pubFile, msg], { env: clientEnv(sock), timeoutMs });
}

/** `ssh-keygen -Y verify` of `MSG.sig` against an allowed_signers file naming `key` (the message on stdin, as it wants). */
export function verifySshsig(lab: PolicyLab, key: LabKey, namespace: string, msg: string): Promise<Run> {
  const allowed = join(lab.work, `allowed-signers-${messages++}`);
  writeFileSync(allowed, `signer@example.test ${key.pubLine}\n`);
  const script = 'exec ssh-keygen -Y verify -f "$1" -I signer@example.test -n "$2" -s "$3.sig" < "$3"';
  return run('sh', ['-c', script, 'sh', allowed, namespace, msg], { timeoutMs: 10_000 });
}

/** A child process that runs until stopped; for requests that wait for an approval. */
export interface Waiting {
  proc: ChildProcess;
  done: Promise<Run>;
  exited(): boolean;
}

/** Starts `cmd args` without waiting for it (SIGKILL after `timeoutMs`). */
export function launchClient(cmd: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 60_000): Waiting {
  const proc = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs, killSignal: 'SIGKILL' });
  let stdout = '';
  let stderr = '';
  let exited = false;
  proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<Run>((resolve) => {
    proc.once('close', (code) => {
      exited = true;
      resolve({ code, stdout, stderr });
    });
    proc.once('error', (err) => {
      exited = true;
      resolve({ code: null, stdout, stderr: stderr + String(err) });
    });
  });
  return { proc, done, exited: () => exited };
}

/** One waiting request as `keyhold approvals --json` lists it (the fields the tests read). */
export interface PendingApproval {
  id: string;
  [field: string]: unknown;
}

export function listApprovals(lab: PolicyLab): PendingApproval[] {
  const r = keyhold(lab.k, ['approvals', '--json']);
  if (r.status !== 0) throw new Error(`keyhold approvals --json exited ${r.status}: ${r.stderr}`);
  const parsed = JSON.parse(r.stdout) as unknown;
  if (!Array.isArray(parsed)) throw new Error(`keyhold approvals --json is not an array: ${r.stdout}`);
  return parsed as PendingApproval[];
}

/** Waits until an approval whose JSON mentions `pid` (or a token id) is listed; returns it. */
export async function waitForApproval(lab: PolicyLab, pid: number | string, timeoutMs = 15_000): Promise<PendingApproval> {
  let found: PendingApproval | undefined;
  let last: PendingApproval[] = [];
  try {
    await waitFor(
      () => {
        last = listApprovals(lab);
        found = last.find((p) => JSON.stringify(p).includes(String(pid)));
        return found !== undefined;
      },
      timeoutMs,
      `an approval for pid ${pid}`,
    );
  } catch (err) {
    throw new Error(`${(err as Error).message}; listed: ${JSON.stringify(last)}\n${lab.diagnostics()}`);
  }
  return found!;
}

/** Audit entries of sign decisions under a policy (they carry `decision`), after `afterSeq`. */
export function decisions(lab: PolicyLab, afterSeq = 0): Entry[] {
  return completeEntries(lab.k).filter((e) => e.seq > afterSeq && typeof e.decision === 'string');
}

export function lastSeq(lab: PolicyLab): number {
  return completeEntries(lab.k).reduce((max, e) => Math.max(max, e.seq), 0);
}

/** Waits for an audit entry after `afterSeq` that has every field of `fields` (shallow match); returns it. */
export async function waitForDecision(lab: PolicyLab, afterSeq: number, fields: Record<string, unknown>, timeoutMs = 5000): Promise<Entry> {
  const matches = (e: Entry) => Object.entries(fields).every(([name, value]) => JSON.stringify(e[name]) === JSON.stringify(value));
  let found: Entry | undefined;
  try {
    await waitFor(() => (found = decisions(lab, afterSeq).find(matches)) !== undefined, timeoutMs, `audit entry ${JSON.stringify(fields)}`);
  } catch (err) {
    throw new Error(`${(err as Error).message}; decisions logged: ${JSON.stringify(decisions(lab, afterSeq), null, 1)}`);
  }
  return found!;
}

/** Runs `keyhold ARGS` as a separate process in the background (another terminal of the user). */
export function keyholdAsync(lab: PolicyLab, args: string[], timeoutMs = 30_000): Promise<Run> {
  return run(process.execPath, [KEYHOLD_BIN, ...args], { env: lab.k.env, timeoutMs });
}

/** Shell-quotes for a remote command line. */
export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** A `keyhold bridge` in front of the lab's token listener, as a container runs it. */
export interface LabBridge {
  sock: string;
  stop(): Promise<void>;
}

let bridges = 0;
export async function startBridge(lab: PolicyLab, token: string): Promise<LabBridge> {
  const sock = join(lab.work, `bridge-${bridges++}.sock`);
  const env = clientEnv('/nonexistent', { KEYHOLD_TOKEN: token });
  delete env.SSH_AUTH_SOCK;
  const w = launchClient(process.execPath, [KEYHOLD_BIN, 'bridge', '--connect', `unix:${lab.tokenListener}`, '--listen', sock], env, 300_000);
  let stdout = '';
  w.proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  const stop = async () => {
    if (!w.exited()) w.proc.kill('SIGTERM');
    const timer = setTimeout(() => w.proc.kill('SIGKILL'), 3000);
    await w.done;
    clearTimeout(timer);
  };
  try {
    await waitFor(() => stdout.includes('SSH_AUTH_SOCK=') || w.exited(), 10_000, 'keyhold bridge to print SSH_AUTH_SOCK=');
  } catch (err) {
    await stop();
    throw err;
  }
  if (w.exited()) {
    const r = await w.done;
    throw new Error(`keyhold bridge exited ${r.code}: ${r.stderr}`);
  }
  return { sock, stop };
}

/** Environment for git using `sock` as its agent: no system or user git config, a fixed author. */
export function gitEnv(sock: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return clientEnv(sock, {
    GIT_CONFIG_NOSYSTEM: '1',
    GIT_CONFIG_GLOBAL: '/dev/null',
    GIT_TERMINAL_PROMPT: '0',
    GIT_AUTHOR_NAME: 'keyhold e2e',
    GIT_AUTHOR_EMAIL: 'signer@example.test',
    GIT_COMMITTER_NAME: 'keyhold e2e',
    GIT_COMMITTER_EMAIL: 'signer@example.test',
    ...extra,
  });
}

/** `git ARGS` in `cwd`; fails the test unless it exits 0. */
export async function gitOk(lab: PolicyLab, args: string[], env: NodeJS.ProcessEnv, cwd?: string): Promise<string> {
  const r = await run('git', args, { env, cwd });
  expect(r.code, `git ${args.join(' ')}\n${lab.diagnostics(r)}`).toBe(0);
  return r.stdout;
}

export interface LabRepo {
  /** A working repository with one commit on main. */
  repo: string;
  /** A bare repository to push to; both sshd run on this machine, so the same path on A and B. */
  bare: string;
}

export async function gitRepoWithCommit(lab: PolicyLab): Promise<LabRepo> {
  const dir = mkdtempSync(join(lab.work, 'git-'));
  const repo = join(dir, 'work');
  const bare = join(dir, 'remote.git');
  const env = gitEnv('/nonexistent');
  await gitOk(lab, ['init', '-q', '--bare', bare], env);
  await gitOk(lab, ['init', '-q', '-b', 'main', repo], env);
  writeFileSync(join(repo, 'README'), `hello ${randomBytes(6).toString('hex')}\n`);
  await gitOk(lab, ['add', 'README'], env, repo);
  await gitOk(lab, ['commit', '-q', '-m', 'first'], env, repo);
  return { repo, bare };
}

/** `git push` of main over ssh to `host`, with `sock` as the agent. */
export function gitPush(g: LabRepo, host: LabHost, sock: string): Promise<Run> {
  const url = `ssh://${host.sshd.user}@127.0.0.1:${host.sshd.port}${g.bare}`;
  return run('git', ['push', '-q', url, 'main'], { env: gitEnv(sock, { GIT_SSH_COMMAND: host.sshd.sshCommand() }), cwd: g.repo });
}
