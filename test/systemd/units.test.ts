// contrib/systemd: the units pass `systemd-analyze verify`, rate "OK" or better (≤ 3.0) in
// `systemd-analyze security --offline`, work on Debian 12's systemd 252, and the user unit runs
// for real under a systemd user manager: credential in, scope socket out, ssh-keygen -Y sign.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KEYHOLD_BIN, waitFor } from '../helpers/keyhold.js';
import { exposure, installedUnitText, installForService, makeHome, run, SHIPPED_PROGRAM, startUserManager, unitText, type UserManager } from '../helpers/systemd.js';

/** What `systemd-analyze security` calls "OK" at most (its scale: 0 SAFE … 10 UNSAFE). */
const MAX_EXPOSURE = 3.0;

interface UnitCase {
  file: string;
  /** The name systemd-analyze loads: a template needs an instance. */
  name: string;
  user: boolean;
}

const UNITS: UnitCase[] = [
  { file: 'keyhold.service', name: 'keyhold.service', user: true },
  { file: 'keyhold@.service', name: 'keyhold@alice.service', user: false },
];

describe('contrib/systemd units, offline', () => {
  let dir: string;
  let env: NodeJS.ProcessEnv;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'keyhold-units-'));
    // `--user` resolves %t from $XDG_RUNTIME_DIR even offline.
    const runtime = join(dir, 'runtime');
    mkdirSync(runtime, { mode: 0o700 });
    env = { PATH: process.env.PATH, HOME: dir, XDG_RUNTIME_DIR: runtime, LANG: 'C.UTF-8', SYSTEMD_PAGER: 'cat' };
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** The unit as installed (ExecStart = this checkout's bin/keyhold), optionally with drop-ins, in a fresh directory. */
  const install = (unit: UnitCase, dropIns: string[] = []): string => {
    const unitDir = mkdtempSync(join(dir, 'unit-'));
    writeFileSync(join(unitDir, unit.file), installedUnitText(unit.file, KEYHOLD_BIN));
    if (dropIns.length > 0) {
      mkdirSync(join(unitDir, `${unit.file}.d`));
      for (const dropIn of dropIns) writeFileSync(join(unitDir, `${unit.file}.d`, dropIn), unitText(dropIn));
    }
    return join(unitDir, unit.name);
  };
  const analyze = (unit: UnitCase, args: string[]) => run('systemd-analyze', [...(unit.user ? ['--user'] : []), ...args], env);

  it('systemd-analyze is there (Debian package systemd)', () => {
    const version = run('systemd-analyze', ['--version'], env);
    expect(version.status, version.stderr).toBe(0);
    expect(version.stdout).toMatch(/^systemd \d+/);
  });

  for (const unit of UNITS) {
    describe(unit.file, () => {
      it('ExecStart names the program first, and nowhere else (what `keyhold doctor --unit` replaces)', () => {
        const text = unitText(unit.file);
        const execStarts = text.split('\n').filter((line) => line.startsWith('ExecStart='));
        expect(execStarts).toHaveLength(1);
        expect(execStarts[0]).toMatch(new RegExp(`^ExecStart=${SHIPPED_PROGRAM} serve( |$)`));
        expect(text.split(SHIPPED_PROGRAM)).toHaveLength(2);
      });

      it('passes systemd-analyze verify', () => {
        const verified = analyze(unit, ['verify', install(unit)]);
        expect(verified.stderr).toBe('');
        expect(verified.status).toBe(0);
      });

      it('verify would catch a program that is not there (so the check above means something)', () => {
        const unitDir = mkdtempSync(join(dir, 'missing-'));
        writeFileSync(join(unitDir, unit.file), installedUnitText(unit.file, join(dir, 'no-such-keyhold')));
        const verified = analyze(unit, ['verify', join(unitDir, unit.name)]);
        expect(verified.status).not.toBe(0);
        expect(verified.stderr).toContain('is not executable');
      });

      it(`rates ${MAX_EXPOSURE} or better in systemd-analyze security --offline`, () => {
        const rated = analyze(unit, ['security', '--offline=true', `--threshold=${MAX_EXPOSURE * 10}`, '--no-pager', install(unit)]);
        expect(rated.status, rated.stdout + rated.stderr).toBe(0);
        expect(exposure(rated.stdout)).toBeLessThanOrEqual(MAX_EXPOSURE);
      });

      it('keeps node working: W+X memory allowed for V8, the syscalls koffi makes allowed, Unix sockets allowed', () => {
        const text = unitText(unit.file);
        expect(text).toMatch(/^MemoryDenyWriteExecute=no$/m);
        expect(text).toMatch(/^SystemCallFilter=@system-service$/m);
        expect(text).toMatch(/^RestrictAddressFamilies=AF_UNIX$/m);
        // prctl (@process), setrlimit (@resources), flock and keyctl (@keyring) stay callable.
        const filter = run('systemd-analyze', ['syscall-filter', '@system-service'], env).stdout;
        for (const group of ['@process', '@resources', '@keyring']) expect(filter).toContain(`    ${group}\n`);
        expect(filter).toContain('    flock\n');
      });

      it('with the tcp drop-in (token signer on tcp:), still verifies and rates OK', () => {
        const path = install(unit, ['keyhold-tcp.conf']);
        const verified = analyze(unit, ['verify', path]);
        expect(verified.stderr).toBe('');
        expect(verified.status).toBe(0);
        const rated = analyze(unit, ['security', '--offline=true', '--no-pager', path]);
        expect(rated.stdout).toMatch(/✗ RestrictAddressFamilies=~AF_\(INET\|INET6\)/);
        expect(exposure(rated.stdout)).toBeLessThanOrEqual(MAX_EXPOSURE);
      });
    });
  }
});

describe('keyhold.service under a real systemd user manager', () => {
  let home: string;
  let manager: UserManager | null = null;
  const passphrase = `unit-test-pass-${Math.random().toString(36).slice(2)}`;
  let cli: NodeJS.ProcessEnv;

  beforeAll(async () => {
    home = makeHome();
    // The vault where the unit looks for it: the default one under this $HOME.
    cli = { PATH: process.env.PATH, HOME: home, LANG: 'C.UTF-8', KEYHOLD_KDF_LOG2N: '14' };
    const credential = join(home, '.config', 'keyhold', 'passphrase');
    mkdirSync(join(home, '.config', 'keyhold'), { recursive: true, mode: 0o700 });
    writeFileSync(credential, `${passphrase}\n`, { mode: 0o600 });
    const init = run(process.execPath, [KEYHOLD_BIN, 'init'], { ...cli, KEYHOLD_PASSPHRASE_FILE: credential });
    expect(init.status, init.stderr).toBe(0);
    const generated = run(process.execPath, [KEYHOLD_BIN, 'key', 'generate', 'default'], { ...cli, KEYHOLD_PASSPHRASE_FILE: credential });
    expect(generated.status, generated.stderr).toBe(0);
    writeFileSync(join(home, 'key.pub'), generated.stdout);

    const unitDir = join(home, '.config', 'systemd', 'user');
    mkdirSync(join(unitDir, 'keyhold.service.d'), { recursive: true });
    // The service runs a copy under this $HOME, as an install would be: the checkout may be under
    // /tmp, which PrivateTmp= hides from it.
    writeFileSync(join(unitDir, 'keyhold.service'), installedUnitText('keyhold.service', installForService(home)));
    // No journal here: the daemon's log goes to a file the test can show.
    writeFileSync(join(unitDir, 'keyhold.service.d', 'test-log.conf'), `[Service]\nStandardError=file:${join(home, 'keyhold.log')}\n`);

    try {
      manager = await startUserManager(home);
    } catch (err) {
      console.error(`keyhold: cannot run a systemd user manager here: ${(err as Error).message}`);
      throw err;
    }
  });

  afterAll(async () => {
    manager?.systemctl(['stop', 'keyhold.service']);
    await manager?.stop();
    rmSync(home, { recursive: true, force: true });
  });

  const daemonLog = () => (existsSync(join(home, 'keyhold.log')) ? readFileSync(join(home, 'keyhold.log'), 'utf8') : '(no log)');

  it('starts unlocked from the LoadCredential= file and signs through its scope socket', async () => {
    const started = manager!.systemctl(['start', 'keyhold.service']);
    expect(started.status, started.stderr).toBe(0);
    const runtime = join(manager!.runtimeDir, 'keyhold');
    const socketOf = run(process.execPath, [KEYHOLD_BIN, 'socket', 'default'], { ...cli, KEYHOLD_RUNTIME_DIR: runtime });
    expect(socketOf.status, socketOf.stderr).toBe(0);
    const socket = socketOf.stdout.trim();
    await waitFor(() => existsSync(socket) || manager!.systemctl(['is-failed', '--quiet', 'keyhold.service']).status === 0, 20_000, 'the scope socket');
    expect(existsSync(socket), `${manager!.systemctl(['status', 'keyhold.service']).stdout}\n${daemonLog()}`).toBe(true);
    expect(daemonLog()).toContain('vault unlocked');
    expect(daemonLog()).not.toContain(passphrase);
    // The unit's system call filter lets memfd_secret through: the keys are in secret memory.
    const status = run(process.execPath, [KEYHOLD_BIN, 'status', '--json'], { ...cli, KEYHOLD_RUNTIME_DIR: runtime });
    expect(status.status, status.stderr).toBe(0);
    expect((JSON.parse(status.stdout) as { memory: string }).memory, daemonLog()).toBe('secret');

    // RuntimeDirectoryMode=0700 and UMask=0077, as ensurePrivateDir wants them.
    const mode = run('stat', ['-c', '%a', runtime]).stdout.trim();
    expect(mode).toBe('700');

    const agent = { ...cli, SSH_AUTH_SOCK: socket };
    const listed = run('ssh-add', ['-l'], agent);
    expect(listed.status, listed.stderr).toBe(0);
    expect(listed.stdout).toContain('ED25519');

    const message = join(home, 'message.txt');
    writeFileSync(message, 'signed through systemd\n');
    const signed = run('ssh-keygen', ['-Y', 'sign', '-n', 'file', '-f', join(home, 'key.pub'), message], agent);
    expect(signed.status, signed.stderr + daemonLog()).toBe(0);
    const allowed = join(home, 'allowed_signers');
    writeFileSync(allowed, `signer ${readFileSync(join(home, 'key.pub'), 'utf8')}`);
    const verified = run('sh', ['-c', 'exec ssh-keygen -Y verify -f "$1" -I signer -n file -s "$2.sig" < "$2"', 'sh', allowed, message]);
    expect(verified.status, verified.stderr).toBe(0);
  });

  it('stops on systemctl stop: daemon gone, its sockets removed', async () => {
    const socket = join(manager!.runtimeDir, 'keyhold', 'scopes', 'default.sock');
    const stopped = manager!.systemctl(['stop', 'keyhold.service']);
    expect(stopped.status, stopped.stderr).toBe(0);
    expect(manager!.systemctl(['is-active', 'keyhold.service']).stdout.trim()).toBe('inactive');
    expect(existsSync(socket)).toBe(false);
    expect(daemonLog()).toContain('keyhold daemon stopped');
  });

  it('without the credential file, the service fails with status 243 (CREDENTIALS): no daemon runs without its passphrase', async () => {
    const credential = join(home, '.config', 'keyhold', 'passphrase');
    rmSync(credential);
    const before = daemonLog();
    const show = (property: string) => manager!.systemctl(['show', '-p', property, '--value', 'keyhold.service']).stdout.trim();
    try {
      // Type=simple: `start` returns once forked; the credential is set up after that.
      manager!.systemctl(['start', 'keyhold.service']);
      await waitFor(() => show('ExecMainStatus') === '243', 15_000, 'exit status 243 (EXIT_CREDENTIALS)');
      expect(daemonLog()).toBe(before);
    } finally {
      manager!.systemctl(['stop', 'keyhold.service']);
      writeFileSync(credential, `${passphrase}\n`, { mode: 0o600 });
    }
  });

  it('with MemoryDenyWriteExecute=yes node dies in V8 at its first compiled code (why the units keep it off)', async () => {
    const dropIn = join(home, '.config', 'systemd', 'user', 'keyhold.service.d', 'mdwe.conf');
    writeFileSync(dropIn, '[Service]\nMemoryDenyWriteExecute=yes\n');
    const show = (property: string) => manager!.systemctl(['show', '-p', property, '--value', 'keyhold.service']).stdout.trim();
    try {
      expect(manager!.systemctl(['daemon-reload']).status).toBe(0);
      const before = daemonLog().length;
      manager!.systemctl(['start', 'keyhold.service']);
      await waitFor(() => show('NRestarts') !== '0' || show('ActiveState') === 'failed', 20_000, 'the daemon to die');
      const log = daemonLog().slice(before);
      expect(log).not.toContain('keyhold daemon ready');
      expect(log).toContain('v8::internal');
    } finally {
      manager!.systemctl(['stop', 'keyhold.service']);
      rmSync(dropIn);
      manager!.systemctl(['daemon-reload']);
    }
  });
});
