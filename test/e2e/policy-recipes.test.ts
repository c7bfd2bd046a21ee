// The README's "Policy" recipes, run as written: each TOML block marked `<!-- policy-recipe: NAME -->`
// is taken from README.md, stored with `keyhold policy set`, and then does what its paragraph
// promises, with real git, ssh, ssh-keygen, sshd and `keyhold bridge`.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { keyhold, keyholdOk, REPO, waitFor } from '../helpers/keyhold.js';
import { run, type Run } from '../helpers/sshd.js';
import {
  checkPolicy,
  clientEnv,
  gitEnv,
  gitOk,
  gitPush,
  gitRepoWithCommit,
  keyholdAsync,
  lastSeq,
  launchClient,
  listApprovals,
  messageFile,
  shellQuote,
  sshsign,
  startBridge,
  startPolicyLab,
  waitForApproval,
  waitForDecision,
  writeKnownHosts,
  type LabBridge,
  type LabHost,
  type LabKey,
  type PolicyLab,
  type Waiting,
} from '../helpers/policy-lab.js';

/** The TOML of every `<!-- policy-recipe: NAME -->` block in README.md, by name. */
function readmeRecipes(): Map<string, string> {
  const readme = readFileSync(join(REPO, 'README.md'), 'utf8');
  const recipes = new Map<string, string>();
  for (const m of readme.matchAll(/<!-- policy-recipe: ([a-z0-9-]+) -->\n```toml\n([\s\S]*?)```\n/g)) recipes.set(m[1]!, m[2]!);
  return recipes;
}

const recipes = readmeRecipes();
function recipe(name: string): string {
  const toml = recipes.get(name);
  if (toml === undefined) throw new Error(`README.md has no <!-- policy-recipe: ${name} --> block before a toml fence`);
  return toml;
}

/** `keyhold policy set SCOPE NAME.toml`, the file holding the README's block, as the recipe's commands say. */
function setRecipe(name: string, scope: string): void {
  expect(readFileSync(join(REPO, 'README.md'), 'utf8'), 'the recipe tells its reader this command').toContain(`keyhold policy set ${scope} ${name}.toml`);
  const file = join(lab.work, `${name}.toml`);
  writeFileSync(file, recipe(name));
  const r = keyhold(lab.k, ['policy', 'set', scope, file]);
  expect(r.status, `keyhold policy set ${scope} ${name}.toml: ${r.stderr}`).toBe(0);
}

let lab: PolicyLab;
let key: LabKey;
const bridges: LabBridge[] = [];
const waiting: Waiting[] = [];
/** The name the CI recipe gives its git host; this test's known_hosts gives it host A's key. */
const GIT_HOST = 'git.example.com';

beforeAll(async () => {
  lab = await startPolicyLab({ prefix: 'keyhold-policy-recipes-', keyCount: 1 });
  key = lab.keys[0]!;
  // As `ssh-keyscan git.example.com >> ~/.ssh/known_hosts` would leave it, here for host A.
  writeKnownHosts(lab.knownHosts, [lab.a], [lab.b], [{ name: GIT_HOST, host: lab.a }]);
}, 90_000);

afterAll(async () => {
  for (const w of waiting) if (!w.exited()) w.proc.kill('SIGKILL');
  await Promise.all([...bridges.map((b) => b.stop()), ...waiting.map((w) => w.done)]);
  await lab?.stop();
}, 30_000);

/** The scope socket of `scope`, once the daemon has opened it (a scope that got its first key). */
async function scopeSocket(scope: string): Promise<string> {
  const sock = lab.serve.socket(scope);
  await waitFor(() => existsSync(sock), 5000, `the socket of scope ${scope}`);
  return sock;
}

function assignKey(scope: string): void {
  keyholdOk(lab.k, ['key', 'assign', scope, key.fingerprint]);
}

function login(host: LabHost, sock: string, extra: string[] = [], command = ['echo', 'logged-in']): Promise<Run> {
  return run('ssh', [...host.sshd.sshArgs(extra), ...command], { env: clientEnv(sock) });
}

function expectLoggedIn(r: Run, what: string): void {
  expect(r.code, `${what}\n${lab.diagnostics(r)}`).toBe(0);
  expect(r.stdout).toBe('logged-in\n');
}

function expectRefusedLogin(r: Run, what: string): void {
  expect(r.code, `${what}\n${lab.diagnostics(r)}`).toBe(255);
  expect(r.stderr).toMatch(/Permission denied/);
}

async function git(args: string[], env: NodeJS.ProcessEnv, cwd?: string): Promise<Run> {
  return run('git', args, { env, cwd });
}

it('README.md marks the three recipes', () => {
  expect([...recipes.keys()].sort()).toEqual(['ci-one-host', 'confirm-forwarded', 'git-signing']);
});

describe('recipe: git signing only', () => {
  it('git commit -S signs with gpg.format=ssh and git verify-commit accepts it; other namespaces and logins are refused', async () => {
    assignKey('signing');
    const sock = await scopeSocket('signing');
    setRecipe('git-signing', 'signing');
    const pub = join(lab.work, 'signing.pub');
    writeFileSync(pub, keyholdOk(lab.k, ['key', 'pub', 'signing']));

    const repo = join(mkdtempSync(join(lab.work, 'signing-')), 'repo');
    const env = gitEnv(sock);
    await gitOk(lab, ['init', '-q', '-b', 'main', repo], env);
    await gitOk(lab, ['config', 'gpg.format', 'ssh'], env, repo);
    await gitOk(lab, ['config', 'user.signingkey', pub], env, repo);
    writeFileSync(join(repo, 'README'), `signed ${randomBytes(4).toString('hex')}\n`);
    await gitOk(lab, ['add', 'README'], env, repo);
    const seq = lastSeq(lab);
    await gitOk(lab, ['commit', '-q', '-S', '-m', 'signed through keyhold'], env, repo);

    const allowedSigners = join(lab.work, 'allowed_signers');
    writeFileSync(allowedSigners, `signer@example.test ${readFileSync(pub, 'utf8').trim()}\n`);
    const verified = await git(['-c', `gpg.ssh.allowedSignersFile=${allowedSigners}`, 'verify-commit', 'HEAD'], env, repo);
    expect(verified.code, verified.stdout + verified.stderr).toBe(0);
    expect(verified.stderr).toMatch(/Good "git" signature for signer@example.test/);
    await waitForDecision(lab, seq, { event: 'sign', scope: 'signing', decision: 'allow', rule: 1, purpose: 'sshsig', namespace: 'git' });

    const fileMsg = messageFile(lab);
    const other = await sshsign(sock, key, 'file', fileMsg);
    expect(other.code, lab.diagnostics(other)).not.toBe(0);
    expect(existsSync(`${fileMsg}.sig`)).toBe(false);
    expectRefusedLogin(await login(lab.a, sock), 'ssh login through the signing scope');
    // The same key logs in through a scope without a policy: the refusal above is the recipe's.
    expectLoggedIn(await login(lab.a, lab.sock), 'ssh login through web (no policy yet)');
  });
});

describe('recipe: a CI container that may only log in to one git host', () => {
  it('the ci-42 token pushes to git.example.com (host A) through keyhold bridge; host B, another subject and the host socket are refused', async () => {
    assignKey('ci');
    const hostSock = await scopeSocket('ci');
    setRecipe('ci-one-host', 'ci');
    const show = keyhold(lab.k, ['policy', 'show', 'ci']);
    expect(show.status, show.stderr).toBe(0);
    expect(show.stdout).toContain(GIT_HOST);
    expect(show.stdout).toContain(lab.a.fingerprint);
    const check = checkPolicy(lab, ['--subject', 'ci-42', '--purpose', 'ssh-login', '--host', GIT_HOST], 'ci');
    expect(check.status, check.stdout + check.stderr).toBe(0);

    const issue = (subject: string) => JSON.parse(keyholdOk(lab.k, ['token', 'issue', 'ci', '--subject', subject, '--ttl', '24h', '--json'])) as { token: string };
    const ci = await startBridge(lab, issue('ci-42').token);
    bridges.push(ci);

    // git push over ssh to host A, from "inside the container" (the bridge's socket).
    const g = await gitRepoWithCommit(lab);
    const seq = lastSeq(lab);
    const push = await gitPush(g, lab.a, ci.sock);
    expect(push.code, `git push to git.example.com (A) with the ci-42 token\n${lab.diagnostics(push)}`).toBe(0);
    const pushed = await waitForDecision(lab, seq, { event: 'sign', scope: 'ci', decision: 'allow', rule: 1, purpose: 'ssh-login' });
    expect(pushed.host_key).toBe(lab.a.fingerprint);

    expectRefusedLogin(await login(lab.b, ci.sock), 'the ci-42 token to host B');
    const dev = await startBridge(lab, issue('dev-laptop').token);
    bridges.push(dev);
    expectRefusedLogin(await login(lab.a, dev.sock), 'a token of another subject to host A');
    expectRefusedLogin(await login(lab.a, hostSock), 'the scope socket (no token, no subject) to host A');
  });
});

describe('recipe: confirm anything forwarded', () => {
  it('a login from the far side of ssh -A waits for `keyhold approve ID`; the same login from here asks nobody', async () => {
    setRecipe('confirm-forwarded', 'web');
    let seq = lastSeq(lab);
    expectLoggedIn(await login(lab.b, lab.sock), 'ssh to B directly');
    expect(listApprovals(lab)).toEqual([]);
    await waitForDecision(lab, seq, { event: 'sign', scope: 'web', decision: 'allow', rule: 'default' });

    seq = lastSeq(lab);
    const hop = [...['ssh', ...lab.b.sshd.sshArgs()], 'echo', 'hop2'].map(shellQuote).join(' ');
    const w = launchClient('ssh', [...lab.a.sshd.sshArgs(['-o', 'ForwardAgent=yes']), hop], clientEnv(lab.sock));
    waiting.push(w);
    // The forwarded agent's connections come from this ssh process.
    const pending = await waitForApproval(lab, w.proc.pid!);
    expect(w.exited()).toBe(false);
    const approved = await keyholdAsync(lab, ['approve', pending.id]);
    expect(approved.code, approved.stderr).toBe(0);
    const r = await w.done;
    expect(r.code, lab.diagnostics(r)).toBe(0);
    expect(r.stdout).toBe('hop2\n');
    const entry = await waitForDecision(lab, seq, { event: 'sign', scope: 'web', decision: 'confirm', rule: 1, purpose: 'ssh-login' });
    expect(entry.host_key).toBe(lab.b.fingerprint);
    expect((entry.approved_by as { channel?: string }).channel).toBe('control');
  });
});
