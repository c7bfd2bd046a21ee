// contrib/polkit with a real polkitd: our own dbus-daemon as a private system bus (never the
// machine's), the action installed into /usr/share/polkit-1/actions and a rules file into
// /etc/polkit-1/rules.d for the length of the file (both removed after). The rule answers for
// org.keyhold.sign by the namespace detail (git: yes, else no), so no agent is needed, and logs
// what it saw. polkit authorizes root for anything, so the asking processes, and keyhold serve,
// run as uid 65534.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { completeEntries } from '../helpers/audit.js';
import { initVault, KEYHOLD_BIN, keyholdOk, makeKeyholdEnv, REPO, startServe, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';

const POLKITD = '/usr/lib/polkit-1/polkitd';
const ACTION_SOURCE = join(REPO, 'contrib', 'polkit', 'org.keyhold.policy');
const PROGRAM = join(REPO, 'contrib', 'polkit', 'keyhold-confirm-polkit');
const ACTION_INSTALLED = '/usr/share/polkit-1/actions/org.keyhold.policy';
const RULES_INSTALLED = `/etc/polkit-1/rules.d/49-keyhold-test-${process.pid}.rules`;
const NOBODY = { uid: 65534, gid: 65534 };

const RULES = `// keyhold's polkit test (test/platform/polkit.test.ts); removed when it ends.
polkit.addRule(function (action, subject) {
  if (action.id !== "org.keyhold.sign") return polkit.Result.NOT_HANDLED;
  var namespace = action.lookup("keyhold.namespace");
  polkit.log("keyhold-test: user " + subject.user + " pid " + subject.pid + " namespace " + namespace + " message " + action.lookup("polkit.message"));
  if (namespace === undefined) return polkit.Result.YES;
  return namespace === "git" ? polkit.Result.YES : polkit.Result.NO;
});
`;

/** The shipped action, with uid 65534 made an owner as the file's comment tells an admin to do. */
const actionWithOwner = () =>
  readFileSync(ACTION_SOURCE, 'utf8').replace('  </action>', '    <annotate key="org.freedesktop.policykit.owner">unix-user:nobody</annotate>\n  </action>');

let dir: string;
let busAddress: string;
let bus: ChildProcess | undefined;
let polkitd: ChildProcess | undefined;
const polkitLog = () => (dir && existsSync(join(dir, 'polkitd.log')) ? readFileSync(join(dir, 'polkitd.log'), 'utf8') : '');
let actionBefore: Buffer | null = null;

const busEnv = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({ PATH: process.env.PATH, DBUS_SYSTEM_BUS_ADDRESS: busAddress, ...extra });

function pkaction(): { status: number | null; out: string } {
  const r = spawnSync('pkaction', ['--action-id', 'org.keyhold.sign', '--verbose'], { env: busEnv(), encoding: 'utf8', timeout: 10_000 });
  return { status: r.status, out: r.stdout + r.stderr };
}

/** Installs `text` as the action and waits until polkitd has read it (it watches the directory). */
async function installAction(text: string, loaded: (listing: string) => boolean): Promise<void> {
  writeFileSync(ACTION_INSTALLED, text, { mode: 0o644 });
  await waitFor(() => loaded(pkaction().out), 10_000, `polkitd to load ${ACTION_INSTALLED}\n${pkaction().out}`);
}

/** `pid,start-time,uid` of a live process, as pkcheck --process takes it. */
function processName(pid: number): string {
  const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  const start = stat.slice(stat.lastIndexOf(') ') + 2).split(' ')[22 - 3];
  const uid = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'latin1'))![1];
  return `${pid},${start},${uid}`;
}

/** The confirm program as uid 65534, as keyhold runs it. */
function confirm(question: string, env: NodeJS.ProcessEnv): { status: number | null; stderr: string } {
  const r = spawnSync(PROGRAM, [question], { env: busEnv({ SSH_ASKPASS_PROMPT: 'confirm', ...env }), encoding: 'utf8', timeout: 15_000, ...NOBODY });
  return { status: r.status, stderr: r.stderr };
}

const ruleSaw = () => polkitLog().split('\n').filter((l) => l.includes('keyhold-test:'));

async function stopChild(child: ChildProcess | undefined): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 3_000);
  await gone;
  clearTimeout(timer);
}

beforeAll(async () => {
  // Root: the action and the rule go into system directories, and polkitd starts as root to switch to its user.
  if (process.getuid!() !== 0) throw new Error('the polkit test runs as root (it installs the action and a rules file, and starts polkitd)');
  for (const need of [POLKITD, '/usr/bin/pkcheck', '/usr/bin/pkaction', '/usr/bin/dbus-daemon']) {
    if (!existsSync(need)) throw new Error(`${need} is missing (scripts/test.sh installs polkitd and dbus-daemon)`);
  }
  dir = mkdtempSync(join(tmpdir(), 'keyhold-polkit-'));
  chmodSync(dir, 0o755); // polkitd (user polkitd) connects to the bus socket in here
  const socket = join(dir, 'system_bus_socket');
  busAddress = `unix:path=${socket}`;
  writeFileSync(
    join(dir, 'bus.conf'),
    `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>${busAddress}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy>
</busconfig>
`,
  );
  bus = spawn('dbus-daemon', ['--config-file', join(dir, 'bus.conf'), '--nofork'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let busErr = '';
  bus.stderr!.on('data', (d: Buffer) => (busErr += d.toString()));
  await waitFor(() => existsSync(socket) || bus!.exitCode !== null, 10_000, 'the private system bus');
  if (!existsSync(socket)) throw new Error(`dbus-daemon exited ${bus.exitCode}: ${busErr}`);

  // A run killed before its afterAll left its rule behind: it must not keep saying yes.
  for (const name of readdirSync('/etc/polkit-1/rules.d')) {
    const pid = /^49-keyhold-test-(\d+)\.rules$/.exec(name)?.[1];
    if (pid && !existsSync(`/proc/${pid}`)) rmSync(join('/etc/polkit-1/rules.d', name), { force: true });
  }
  actionBefore = existsSync(ACTION_INSTALLED) ? readFileSync(ACTION_INSTALLED) : null;
  writeFileSync(RULES_INSTALLED, RULES, { mode: 0o644 });
  // Its output goes to a file, read synchronously: the tests run the asking processes with spawnSync.
  const logFd = openSync(join(dir, 'polkitd.log'), 'w');
  polkitd = spawn(POLKITD, [], { env: busEnv(), stdio: ['ignore', logFd, logFd] });
  closeSync(logFd);
  await waitFor(() => polkitLog().includes('Acquired the name org.freedesktop.PolicyKit1') || polkitd!.exitCode !== null, 15_000, `polkitd on the private bus\n${polkitLog()}`);
  if (polkitd.exitCode !== null) throw new Error(`polkitd cannot run here (exit ${polkitd.exitCode}): ${polkitLog()}`);
}, 30_000);

afterAll(async () => {
  await stopChild(polkitd);
  await stopChild(bus);
  if (actionBefore) writeFileSync(ACTION_INSTALLED, actionBefore);
  else rmSync(ACTION_INSTALLED, { force: true });
  rmSync(RULES_INSTALLED, { force: true });
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('polkit: the org.keyhold.sign action and keyhold-confirm-polkit, with a real polkitd', () => {
  let subject: ChildProcess;
  beforeAll(() => {
    // The process asked about: a process of uid 65534, as ssh-keygen would be.
    subject = spawn('sleep', ['60'], { stdio: 'ignore', ...NOBODY });
  });
  afterAll(() => stopChild(subject));

  it('pkaction lists the action as shipped: its description, auth_self when active, no otherwise', async () => {
    await installAction(readFileSync(ACTION_SOURCE, 'utf8'), (out) => out.includes('implicit active:') && !out.includes('policykit.owner'));
    const { status, out } = pkaction();
    expect(status, out).toBe(0);
    expect(out).toContain('description:       Sign with an SSH key held by keyhold');
    expect(out).toMatch(/message: +A program asks keyhold to sign with one of your SSH keys/);
    expect(out).toMatch(/implicit any: +no\n/);
    expect(out).toMatch(/implicit inactive: +no\n/);
    expect(out).toMatch(/implicit active: +auth_self\n/);
  });

  it('as shipped (no owner): polkit refuses details from uid 65534, so the program asks without them and polkit still decides', () => {
    const before = ruleSaw().length;
    const r = confirm('keyhold: allow it?', { KEYHOLD_CONFIRM_PROCESS: processName(subject.pid!), KEYHOLD_CONFIRM_NAMESPACE: 'file' });
    expect(r.status, r.stderr).toBe(0);
    expect(ruleSaw().slice(before)).toEqual([`keyhold-test: user nobody pid ${subject.pid} namespace undefined message undefined`]);
  });

  it('with the owner annotation: the question and the request go to polkit as details; exit 0 when the rule says yes, 1 when no or when the process is not that one', async () => {
    await installAction(actionWithOwner(), (out) => out.includes('org.freedesktop.policykit.owner -> unix-user:nobody'));
    const process_ = processName(subject.pid!);
    const before = ruleSaw().length;
    const yes = confirm('keyhold: allow ssh-keygen to sign $(keyhold.scope)?', { KEYHOLD_CONFIRM_PROCESS: process_, KEYHOLD_CONFIRM_NAMESPACE: 'git' });
    expect(yes.status, yes.stderr).toBe(0);
    const no = confirm('keyhold: allow it?', { KEYHOLD_CONFIRM_PROCESS: process_, KEYHOLD_CONFIRM_NAMESPACE: 'file' });
    expect(no.status).toBe(1);
    expect(no.stderr).toContain('polkit refused');
    expect(ruleSaw().slice(before)).toEqual([
      // "$(" would be polkit's substitution in the agent's message: the program defuses it.
      `keyhold-test: user nobody pid ${subject.pid} namespace git message keyhold: allow ssh-keygen to sign $ (keyhold.scope)?`,
      `keyhold-test: user nobody pid ${subject.pid} namespace file message keyhold: allow it?`,
    ]);
    // Another start time: the pid now names another process (reused), which polkit refuses to judge.
    const [pid, start, uid] = process_.split(',');
    const reused = confirm('keyhold: allow it?', { KEYHOLD_CONFIRM_PROCESS: `${pid},${Number(start) + 1},${uid}`, KEYHOLD_CONFIRM_NAMESPACE: 'git' });
    expect(reused.status).toBe(1);
    expect(ruleSaw().slice(before)).toHaveLength(2);
    // Run as OpenSSH's ssh-agent runs SSH_ASKPASS (no KEYHOLD_CONFIRM_*): polkit is asked about its parent.
    const agentLike = spawnSync('sh', ['-c', '"$0" "ssh-agent: allow use of key?"; echo "$? $$"', PROGRAM], {
      env: busEnv({ SSH_ASKPASS_PROMPT: 'confirm' }),
      encoding: 'utf8',
      timeout: 15_000,
      ...NOBODY,
    });
    const [answer, parent] = agentLike.stdout.trim().split(' ');
    expect(answer, agentLike.stderr).toBe('0');
    expect(ruleSaw().slice(before).at(-1)).toBe(`keyhold-test: user nobody pid ${parent} namespace undefined message ssh-agent: allow use of key?`);
    // A passphrase prompt (SSH_ASKPASS without SSH_ASKPASS_PROMPT=confirm) is never answered.
    const passphrase = spawnSync(PROGRAM, ['Enter passphrase:'], { env: busEnv(), encoding: 'utf8', timeout: 10_000, ...NOBODY });
    expect(passphrase.status).toBe(1);
    expect(passphrase.stdout).toBe('');
  });

  describe('end to end: keyhold serve with confirm_program = keyhold-confirm-polkit (all as uid 65534)', () => {
    let k: KeyholdEnv;
    let serve: ServeHandle | undefined;
    let pubFile: string;
    let token: string;

    beforeAll(async () => {
      await installAction(actionWithOwner(), (out) => out.includes('unix-user:nobody'));
      k = makeKeyholdEnv('keyhold-polkit-e2e-');
      initVault(k);
      const pub = keyholdOk(k, ['key', 'generate', 'web', '--comment', 'polkit']).trim();
      pubFile = join(k.dir, 'web.pub');
      writeFileSync(pubFile, `${pub}\n`);
      keyholdOk(k, ['policy', 'set', 'web', '-'], { input: 'default = "deny"\n\n[[rule]]\naction = "confirm"\npurpose = "sshsig"\n' });
      token = (JSON.parse(keyholdOk(k, ['token', 'issue', 'web', '--subject', 'ci-polkit', '--json'])) as { token: string }).token;
      // The set-up the README gives: confirm_program in [serve] of the user's config.toml.
      mkdirSync(join(k.env.XDG_CONFIG_HOME!, 'keyhold'), { recursive: true });
      writeFileSync(join(k.env.XDG_CONFIG_HOME!, 'keyhold', 'config.toml'), `[serve]\nconfirm_program = "${PROGRAM}"\nconfirm_timeout = "10s"\n`, { mode: 0o600 });
      chownTree(k.dir, NOBODY);
      k.env.HOME = k.dir;
      serve = await startServe(k, ['--listen', `unix:${join(k.dir, 'signer.sock')}`], { DBUS_SYSTEM_BUS_ADDRESS: busAddress }, NOBODY);
    }, 60_000);

    afterAll(async () => {
      await serve?.stop();
      k?.cleanup();
    });

    /** `ssh-keygen -Y sign -n NAMESPACE` through the scope socket (or `sock`), as uid 65534. */
    function sign(namespace: string, sock = serve!.socket('web')) {
      const msg = join(k.dir, `msg-${namespace}`);
      writeFileSync(msg, `signed in ${namespace}\n`);
      chownSync(msg, NOBODY.uid, NOBODY.gid);
      const env = { PATH: process.env.PATH, HOME: k.dir, SSH_AUTH_SOCK: sock };
      const r = spawnSync('ssh-keygen', ['-Y', 'sign', '-n', namespace, '-f', pubFile, msg], { env, encoding: 'utf8', timeout: 20_000, ...NOBODY });
      return { status: r.status, stderr: r.stderr, pid: r.pid, signed: existsSync(`${msg}.sig`) };
    }

    const lastSign = () => completeEntries(k).filter((e) => e.event === 'sign' || e.event === 'sign-refused').at(-1);

    it('polkit says yes (namespace git): signed, approved_by the program, asked about ssh-keygen itself', () => {
      const before = ruleSaw().length;
      const r = sign('git');
      expect(r.status, `${r.stderr}\n${serve!.stderr().slice(-2000)}\n${polkitLog().slice(-2000)}`).toBe(0);
      expect(r.signed).toBe(true);
      expect(lastSign()).toMatchObject({ event: 'sign', approved_by: { channel: 'program', program: PROGRAM } });
      const saw = ruleSaw().slice(before);
      expect(saw).toHaveLength(1);
      // The subject is the process that asked to sign (KEYHOLD_CONFIRM_PROCESS), not the daemon.
      expect(saw[0]).toMatch(new RegExp(`^keyhold-test: user nobody pid ${r.pid} namespace git message keyhold: allow /usr/bin/ssh-keygen \\(pid ${r.pid}\\) to sign an ssh-keygen signature in namespace git with key SHA256:`));
    });

    it('polkit says no (namespace file): refused, denied_by the program', () => {
      const before = ruleSaw().length;
      const r = sign('file');
      expect(r.status).not.toBe(0);
      expect(r.signed).toBe(false);
      expect(lastSign()).toMatchObject({ event: 'sign-refused', reason: 'denied', denied_by: { channel: 'program', program: PROGRAM } });
      expect(ruleSaw().slice(before)).toEqual([expect.stringContaining(`pid ${r.pid} namespace file`)]);
    });

    it('through a container token there is no local process to ask about: polkit is asked about the daemon, which acts for its user', async () => {
      const bridgeSock = join(k.dir, 'bridge.sock');
      const env = { PATH: process.env.PATH, HOME: k.dir, KEYHOLD_TOKEN: token };
      const bridge = spawn(process.execPath, [KEYHOLD_BIN, 'bridge', '--connect', `unix:${join(k.dir, 'signer.sock')}`, '--listen', bridgeSock], {
        env,
        stdio: ['ignore', 'pipe', 'pipe'],
        ...NOBODY,
      });
      let said = '';
      bridge.stdout!.on('data', (d: Buffer) => (said += d.toString()));
      bridge.stderr!.on('data', (d: Buffer) => (said += d.toString()));
      try {
        await waitFor(() => said.includes('SSH_AUTH_SOCK=') || bridge.exitCode !== null, 10_000, 'keyhold bridge');
        expect(bridge.exitCode, said).toBe(null);
        const before = ruleSaw().length;
        const r = sign('git', bridgeSock);
        expect(r.status, `${r.stderr}\n${serve!.stderr().slice(-2000)}`).toBe(0);
        expect(lastSign()).toMatchObject({ event: 'sign', approved_by: { channel: 'program', program: PROGRAM } });
        expect(ruleSaw().slice(before)).toEqual([
          expect.stringMatching(new RegExp(`^keyhold-test: user nobody pid ${serve!.proc.pid} namespace git message keyhold: allow container token \\S+ subject ci-polkit`)),
        ]);
      } finally {
        await stopChild(bridge);
      }
    });
  });
});

function chownTree(path: string, owner: { uid: number; gid: number }): void {
  chownSync(path, owner.uid, owner.gid);
  if (statSync(path).isDirectory()) for (const name of readdirSync(path)) chownTree(join(path, name), owner);
}
