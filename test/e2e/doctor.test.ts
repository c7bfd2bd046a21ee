// `keyhold doctor` through the real CLI: each misconfiguration it claims to detect is provoked and
// must give its ✘ line and exit 1; optional pieces that are absent are notes (exit 0); `--unit`
// prints a unit that runs this install.
import { appendFileSync, chmodSync, existsSync, mkdirSync, readFileSync, realpathSync, statSync, writeFileSync } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { initVault, keyhold, KEYHOLD_BIN, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, waitFor, type KeyholdEnv } from '../helpers/keyhold.js';
import { startGnomeKeyring, stopAllSecretServices } from '../helpers/secret-service.js';
import { startSshAgent, stopAllSshAgents } from '../helpers/ssh-agent.js';

let k: KeyholdEnv | undefined;
const children: ChildProcess[] = [];
afterEach(async () => {
  await stopAllServes();
  await stopAllSshAgents();
  await stopAllSecretServices();
  for (const child of children.splice(0)) child.kill('SIGKILL');
  k?.cleanup();
  k = undefined;
});

interface Check {
  check: string;
  status: 'ok' | 'wrong' | 'note';
  message: string;
  fix?: string;
}

/** An environment doctor sees as the user's: no session bus, no SSH_AUTH_SOCK unless given. */
function doctor(env: KeyholdEnv, args: string[] = [], extra: NodeJS.ProcessEnv = {}) {
  return keyhold(env, ['doctor', ...args], { env: { DBUS_SESSION_BUS_ADDRESS: '', ...extra } });
}

function lines(stdout: string, mark: '✔' | '✘' | '•', check: string): string[] {
  return stdout.split('\n').filter((l) => l.startsWith(`${mark} ${check}: `));
}

/** A vault with a key in scope `web`, served by an unlocked daemon, a valid config and a unit for this install. */
async function healthySetup(): Promise<{ env: KeyholdEnv; webSocket: string }> {
  const env = makeKeyholdEnv('keyhold-doctor-');
  k = env;
  initVault(env);
  mkdirSync(join(env.env.XDG_CONFIG_HOME!, 'keyhold'), { recursive: true });
  writeFileSync(join(env.env.XDG_CONFIG_HOME!, 'keyhold', 'config.toml'), '[serve]\nidle_lock = "30m"\n');
  const unitDir = join(env.env.XDG_CONFIG_HOME!, 'systemd', 'user');
  mkdirSync(unitDir, { recursive: true });
  writeFileSync(join(unitDir, 'keyhold.service'), keyholdOk(env, ['doctor', '--unit']));
  const serve = await startServe(env);
  keyholdOk(env, ['key', 'generate', 'web']);
  const webSocket = serve.socket('web');
  // The daemon opens a scope's socket on the request after the key was added.
  for (let i = 0; i < 200 && !existsSync(webSocket); i++) {
    keyholdOk(env, ['status']);
    await new Promise((r) => setTimeout(r, 25));
  }
  return { env, webSocket };
}

/**
 * A private D-Bus session bus (dbus-daemon) at `dir/bus`; with `withSecrets`, org.freedesktop.secrets
 * is activatable on it (a service file, as a desktop keyring installs one). Returns its address.
 */
async function startSessionBus(dir: string, withSecrets: boolean): Promise<string> {
  mkdirSync(join(dir, 'services'), { recursive: true });
  if (withSecrets) writeFileSync(join(dir, 'services', 'org.freedesktop.secrets.service'), '[D-BUS Service]\nName=org.freedesktop.secrets\nExec=/bin/false\n');
  const config = join(dir, 'session.conf');
  writeFileSync(
    config,
    `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path=${join(dir, 'bus')}</listen><servicedir>${join(dir, 'services')}</servicedir>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>\n`,
  );
  const bus = spawn('dbus-daemon', ['--nofork', `--config-file=${config}`], { stdio: 'ignore' });
  children.push(bus);
  await waitFor(() => existsSync(join(dir, 'bus')), 10_000, 'dbus-daemon');
  return `unix:path=${join(dir, 'bus')}`;
}

describe('keyhold doctor', () => {
  it('all good: ✔ lines for every check that applies, notes for absent optional pieces, exit 0', async () => {
    const { env, webSocket } = await healthySetup();
    const result = doctor(env, [], { SSH_AUTH_SOCK: webSocket });
    expect(result.stderr).toBe('');
    expect(result.status, result.stdout).toBe(0);
    expect(result.stdout).not.toContain('✘');
    for (const check of ['config', 'vault files', 'runtime dir', 'daemon', 'scopes', 'unit', 'clock']) {
      expect(lines(result.stdout, '✔', check), `${check} in\n${result.stdout}`).toHaveLength(1);
    }
    expect(lines(result.stdout, '✔', 'SSH_AUTH_SOCK')[0]).toContain('keyhold scope web: 1 identity');
    expect(lines(result.stdout, '✔', 'daemon')[0]).toContain('unlocked');
    expect(lines(result.stdout, '✔', 'memory')).toEqual(['✔ memory: keys in memfd_secret memory']);
    expect(lines(result.stdout, '✔', 'kernel keyring')).toEqual(['✔ kernel keyring: available; no remembered unlock for this vault']);
    // No session bus: a note, not a failure.
    expect(lines(result.stdout, '•', 'secret service')).toHaveLength(1);
    expect(result.stdout).not.toContain(env.passphrase);
  });

  it('--json: an array of {check, status, message, fix?}, a fix on every wrong line', async () => {
    const { env, webSocket } = await healthySetup();
    chmodSync(env.vault, 0o644);
    const result = doctor(env, ['--json'], { SSH_AUTH_SOCK: webSocket });
    expect(result.status).toBe(1);
    const checks = JSON.parse(result.stdout) as Check[];
    expect(Array.isArray(checks)).toBe(true);
    for (const c of checks) {
      expect(Object.keys(c).every((key) => ['check', 'status', 'message', 'fix'].includes(key))).toBe(true);
      expect(typeof c.check).toBe('string');
      expect(typeof c.message).toBe('string');
      expect(['ok', 'wrong', 'note']).toContain(c.status);
      if (c.status === 'wrong') expect(typeof c.fix).toBe('string');
    }
    expect(checks.filter((c) => c.status === 'wrong')).toEqual([
      { check: 'vault files', status: 'wrong', message: `${env.vault} is accessible by others (mode 0644)`, fix: `chmod 600 ${env.vault}` },
    ]);
    expect(checks.find((c) => c.check === 'daemon')?.status).toBe('ok');
  });

  it('a runtime dir open to others (0755): ✘ with the chmod that fixes it', () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    mkdirSync(k.runtime, { mode: 0o755 });
    chmodSync(k.runtime, 0o755);
    const result = doctor(k);
    expect(result.status).toBe(1);
    expect(lines(result.stdout, '✘', 'runtime dir')).toEqual([`✘ runtime dir: ${k.runtime} is accessible to other users (mode 0755); fix: chmod 700 ${k.runtime}`]);
    // Read-only: the directory is left as it was.
    expect(statSync(k.runtime).mode & 0o777).toBe(0o755);
  });

  it('vault files readable by others (0644): ✘ per file with its chmod; no vault at all: ✘ keyhold init', () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    const missing = doctor(k);
    expect(missing.status).toBe(1);
    expect(lines(missing.stdout, '✘', 'vault files')[0]).toContain(`no vault at ${k.vault}; fix: keyhold init`);
    expect(existsSync(k.vault)).toBe(false);
    expect(existsSync(k.runtime)).toBe(false);
    initVault(k);
    chmodSync(k.vault, 0o644);
    chmodSync(`${k.vault}.keys`, 0o640);
    const result = doctor(k);
    expect(result.status).toBe(1);
    expect(lines(result.stdout, '✘', 'vault files')).toEqual([
      `✘ vault files: ${k.vault} is accessible by others (mode 0644); fix: chmod 600 ${k.vault}`,
      `✘ vault files: ${k.vault}.keys is accessible by others (mode 0640); fix: chmod 600 ${k.vault}.keys`,
    ]);
  });

  it('SSH_AUTH_SOCK at a missing path, a socket that is no agent, a stale socket, a missing scope socket: ✘; at another agent: a note', async () => {
    const { env, webSocket } = await healthySetup();
    const gone = join(env.dir, 'agent.gone');
    const missing = doctor(env, [], { SSH_AUTH_SOCK: gone });
    expect(missing.status).toBe(1);
    expect(lines(missing.stdout, '✘', 'SSH_AUTH_SOCK')[0]).toContain(`${gone} does not exist`);

    // A socket that accepts and hangs up: not an SSH agent. In its own process, since the CLI runs
    // synchronously here.
    const notAgent = join(env.dir, 'not-agent.sock');
    const server = spawn(process.execPath, ['-e', `require('net').createServer((c) => c.destroy()).listen(${JSON.stringify(notAgent)})`], { stdio: 'ignore' });
    children.push(server);
    await waitFor(() => existsSync(notAgent), 10_000, 'the test socket');
    const bogus = doctor(env, [], { SSH_AUTH_SOCK: notAgent });
    expect(bogus.status).toBe(1);
    expect(lines(bogus.stdout, '✘', 'SSH_AUTH_SOCK')[0]).toContain(`${notAgent} does not answer as an SSH agent`);
    // Its process killed, the socket file stays with nothing listening: an agent of a closed session.
    const exited = new Promise((r) => server.once('exit', r));
    server.kill('SIGKILL');
    await exited;
    const stale = doctor(env, [], { SSH_AUTH_SOCK: notAgent });
    expect(stale.status).toBe(1);
    expect(lines(stale.stdout, '✘', 'SSH_AUTH_SOCK')[0]).toContain(`nothing listens on ${notAgent} (a stale socket)`);

    const noScope = join(env.runtime, 'scopes', 'nosuch.sock');
    const scopeGone = doctor(env, [], { SSH_AUTH_SOCK: noScope });
    expect(scopeGone.status).toBe(1);
    expect(lines(scopeGone.stdout, '✘', 'SSH_AUTH_SOCK')[0]).toContain(`(keyhold scope nosuch) does not exist`);

    const agent = await startSshAgent();
    const other = doctor(env, [], { SSH_AUTH_SOCK: agent.sock });
    expect(other.status, other.stdout).toBe(0);
    expect(lines(other.stdout, '•', 'SSH_AUTH_SOCK')[0]).toContain(`${agent.sock} is another agent, not a keyhold scope socket`);
    expect(webSocket).toContain('web.sock');
  });

  it('a scope in use without keys (a live token, the config, SSH_AUTH_SOCK): ✘ with the key command', async () => {
    const { env } = await healthySetup();
    keyholdOk(env, ['token', 'issue', 'ci', '--subject', 'job-1']);
    const result = doctor(env);
    expect(result.status).toBe(1);
    expect(lines(result.stdout, '✘', 'scopes')).toEqual([
      '✘ scopes: scope ci has no keys but is used by 1 live token: its socket offers no identities; fix: keyhold key generate ci, or keyhold key assign ci FINGERPRINT',
    ]);
    const viaSocket = doctor(env, [], { SSH_AUTH_SOCK: join(env.runtime, 'scopes', 'empty.sock') });
    expect(lines(viaSocket.stdout, '✘', 'scopes')).toContain(
      '✘ scopes: scope empty has no keys but is used by SSH_AUTH_SOCK: its socket offers no identities; fix: keyhold key generate empty, or keyhold key assign empty FINGERPRINT',
    );
    expect(lines(viaSocket.stdout, '✘', 'SSH_AUTH_SOCK')[0]).toContain('the daemon has no socket for scope empty (no keys?)');
    writeFileSync(join(env.env.XDG_CONFIG_HOME!, 'keyhold', 'config.toml'), '[serve]\nscopes = ["ops"]\n');
    keyholdOk(env, ['token', 'revoke', '--scope', 'ci']);
    const configured = doctor(env);
    expect(lines(configured.stdout, '✘', 'scopes')).toEqual([
      '✘ scopes: scope ops has no keys but is used by the config ([serve] scopes): its socket offers no identities; fix: keyhold key generate ops, or keyhold key assign ops FINGERPRINT',
    ]);
    // A scope of secrets only needs no key.
    writeFileSync(join(env.env.XDG_CONFIG_HOME!, 'keyhold', 'config.toml'), '');
    keyholdOk(env, ['secret', 'set', 'deploy', 'TOKEN'], { input: 'not-a-real-secret' });
    const secretsOnly = doctor(env);
    expect(secretsOnly.status, secretsOnly.stdout).toBe(0);
    expect(lines(secretsOnly.stdout, '✔', 'scopes')).toHaveLength(1);
    expect(secretsOnly.stdout).not.toContain('not-a-real-secret');
  });

  it('a broken config: ✘ naming file:line:key', () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    const dir = join(k.env.XDG_CONFIG_HOME!, 'keyhold');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'config.toml'), '[serve]\nidle_lock = "30m"\nconfirm_timout = "30s"\n');
    const result = doctor(k);
    expect(result.status).toBe(1);
    expect(lines(result.stdout, '✘', 'config')).toEqual([`✘ config: ${join(dir, 'config.toml')}:3: serve.confirm_timout: unknown key; fix: see "Configuration" in the README`]);
    writeFileSync(join(dir, 'config.toml'), '[serve\n');
    expect(lines(doctor(k).stdout, '✘', 'config')[0]).toContain(`${join(dir, 'config.toml')}:1:`);
  });

  it('a unit whose ExecStart is missing or another program: ✘ with the command that regenerates it; no unit: a note', () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    expect(lines(doctor(k).stdout, '•', 'unit')[0]).toContain('no keyhold systemd unit installed');
    const unitDir = join(k.env.XDG_CONFIG_HOME!, 'systemd', 'user');
    mkdirSync(unitDir, { recursive: true });
    const unit = join(unitDir, 'keyhold.service');
    writeFileSync(unit, '[Service]\nExecStart=/usr/local/nowhere/keyhold serve --idle-lock 8h\n');
    const result = doctor(k);
    expect(result.status).toBe(1);
    expect(lines(result.stdout, '✘', 'unit')).toEqual([
      `✘ unit: ${unit}: ExecStart program /usr/local/nowhere/keyhold does not exist or is not executable; fix: keyhold doctor --unit > ${unit} && systemctl --user daemon-reload`,
    ]);
    writeFileSync(unit, '[Service]\nExecStart=/bin/sleep infinity\n');
    expect(lines(doctor(k).stdout, '✘', 'unit')[0]).toContain(`ExecStart runs ${realpathSync('/bin/sleep')}, not this install (${realpathSync(KEYHOLD_BIN)})`);
    // `node /path/bin/keyhold` runs this install too.
    writeFileSync(unit, `[Service]\nExecStart=${process.execPath} ${KEYHOLD_BIN} serve\n`);
    expect(lines(doctor(k).stdout, '✔', 'unit')).toHaveLength(1);
  });

  it('daemon down: ✘ with how to start it; locked: a note, not a failure', async () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    const down = doctor(k);
    expect(down.status).toBe(1);
    expect(lines(down.stdout, '✘', 'daemon')).toEqual([`✘ daemon: no daemon is running in ${k.runtime}; fix: keyhold unlock (starts one), or systemctl --user start keyhold`]);
    const serve = await startServe(k, ['--locked']);
    const locked = doctor(k);
    expect(locked.status, locked.stdout).toBe(0);
    expect(lines(locked.stdout, '•', 'daemon')).toEqual([`• daemon: running (pid ${serve.proc.pid}), locked; try: keyhold unlock`]);
    expect(lines(locked.stdout, '•', 'scopes')[0]).toContain('needs an unlocked daemon');
  });

  it('a remembered unlock (unlock --remember) is named while the kernel holds it, and gone after lock', async () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    await startServe(k, ['--locked']);
    keyholdOk(k, ['unlock', '--remember', '1m']);
    try {
      const held = lines(doctor(k).stdout, '✔', 'kernel keyring');
      expect(held).toHaveLength(1);
      expect(held[0]).toMatch(/a remembered unlock is held \(keyhold:[A-Za-z0-9_-]{22}, key \d+\)/);
    } finally {
      keyholdOk(k, ['lock']);
    }
    expect(lines(doctor(k).stdout, '✔', 'kernel keyring')).toEqual(['✔ kernel keyring: available; no remembered unlock for this vault']);
  });

  it("a clock earlier than the vault's last audit line: ✘", () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    const audit = `${k.vault}.audit.jsonl`;
    expect(lines(doctor(k).stdout, '✔', 'clock')).toHaveLength(1);
    const future = new Date(Date.now() + 3 * 3_600_000).toISOString();
    appendFileSync(audit, `${JSON.stringify({ seq: 999, time: future, event: 'lock', prev: '0'.repeat(64), mac: '0'.repeat(64) })}\n`);
    const result = doctor(k);
    expect(result.status).toBe(1);
    const [line] = lines(result.stdout, '✘', 'clock');
    expect(line).toContain(`is earlier than the vault's last audit line (${future})`);
    expect(line).toContain('fix: set the clock');
  });

  it('Secret Service: a session bus without org.freedesktop.secrets is a note; one that can start it is ✔; never ✘', async () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    expect(lines(doctor(k).stdout, '•', 'secret service')[0]).toContain('no session bus');
    for (const withSecrets of [false, true]) {
      const address = await startSessionBus(join(k.dir, `bus-${withSecrets}`), withSecrets);
      const result = doctor(k, [], { DBUS_SESSION_BUS_ADDRESS: address });
      expect(lines(result.stdout, '✘', 'secret service')).toEqual([]);
      if (withSecrets) expect(lines(result.stdout, '✔', 'secret service')).toEqual(['✔ secret service: org.freedesktop.secrets can be started on the session bus']);
      else expect(lines(result.stdout, '•', 'secret service')[0]).toContain('no org.freedesktop.secrets on the session bus');
    }
  });

  it('Secret Service: a running gnome-keyring is ✔ while its default collection is unlocked, a note naming the lock once locked', async () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    initVault(k);
    const keyring = await startGnomeKeyring();
    const unlocked = doctor(k, [], { DBUS_SESSION_BUS_ADDRESS: keyring.address });
    expect(lines(unlocked.stdout, '✔', 'secret service')).toEqual(['✔ secret service: org.freedesktop.secrets answers on the session bus']);
    await keyring.lockDefaultCollection();
    const locked = doctor(k, [], { DBUS_SESSION_BUS_ADDRESS: keyring.address });
    expect(lines(locked.stdout, '✘', 'secret service')).toEqual([]);
    expect(lines(locked.stdout, '•', 'secret service')[0]).toMatch(/default collection is locked.*gnome-keyring-daemon --unlock/);
  });

  it('--unit prints the contrib unit with an absolute ExecStart that is this install', () => {
    k = makeKeyholdEnv('keyhold-doctor-');
    const unit = keyholdOk(k, ['doctor', '--unit']);
    const template = readFileSync(join(KEYHOLD_BIN, '..', '..', 'contrib', 'systemd', 'keyhold.service'), 'utf8');
    const execStarts = unit.split('\n').filter((l) => /^ExecStart=/.test(l));
    expect(execStarts.length).toBeGreaterThan(0);
    for (const line of execStarts) {
      // This node, then this install's bin/keyhold: no PATH lookup of node under systemd.
      const [node, program] = line.slice('ExecStart='.length).replace(/^[-@:+!|]+/, '').split(/\s+/);
      expect(node).toBe(process.execPath);
      expect(program!.startsWith('/')).toBe(true);
      expect(existsSync(program!)).toBe(true);
      expect(realpathSync(program!)).toBe(realpathSync(KEYHOLD_BIN));
    }
    // Everything but ExecStart's program is the template's.
    const strip = (text: string) => text.replace(/^(ExecStart=[-@:+!|]*)\S+/gm, '$1');
    expect(strip(unit).replace(/^(ExecStart=) \S+/gm, '$1')).toBe(strip(template));
    // The doctor's own unit check finds such a unit is this install.
    const units = join(k.env.XDG_CONFIG_HOME!, 'systemd', 'user');
    mkdirSync(units, { recursive: true });
    writeFileSync(join(units, 'keyhold.service'), unit);
    expect(keyhold(k, ['doctor']).stdout).toMatch(/✔ unit: .*ExecStart runs this install/);
  });
});
