// The vault's files under hostile modes, types and sizes, and under kill -9 of a key-file rewrite
// (PRODUCT.md, "Guarantees"; issue 11, item 5): an unprotected vault file is refused naming the
// chmod; vault.db.keys is read through a cap whatever it points at; a rewrite's temp file does not
// outlive the writer that died; a rewrap that took effect has its audit line.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  closeSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  truncateSync,
  watch,
  writeFileSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import {
  keyhold,
  KEYHOLD_BIN,
  keyholdOk,
  makeKeyholdEnv,
  processAlive,
  serveExpectingExit,
  startServe,
  stopAllServes,
  waitFor,
  type KeyholdEnv,
} from '../helpers/keyhold.js';

const envs: KeyholdEnv[] = [];
const children = new Set<ChildProcess>();

function newEnv(prefix: string): KeyholdEnv {
  const k = makeKeyholdEnv(prefix);
  envs.push(k);
  return k;
}

afterEach(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  children.clear();
  await stopAllServes();
});

afterAll(() => {
  for (const k of envs.splice(0)) k.cleanup();
});

/** Every file in the vault directory: its mode and a hash of its bytes (or what it is, if not a file). */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    const st = lstatSync(path);
    const body = st.isFile() ? createHash('sha256').update(readFileSync(path)).digest('hex') : st.isSymbolicLink() ? 'symlink' : 'other';
    out[name] = `${(st.mode & 0o7777).toString(8)} ${st.size} ${body}`;
  }
  return out;
}

interface Watched {
  status: number | null;
  stderr: string;
  ms: number;
  /** The highest resident set size seen while it ran, in KiB. */
  peakRssKiB: number;
}

/** Runs the CLI, sampling its RSS; killed (and reported) if it runs past `timeoutMs`. */
function runWatched(k: KeyholdEnv, args: string[], timeoutMs = 10_000): Promise<Watched> {
  const started = Date.now();
  const proc = spawn(process.execPath, [KEYHOLD_BIN, ...args], { env: k.env, stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(proc);
  let stderr = '';
  let peak = 0;
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const sample = setInterval(() => {
    try {
      const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${proc.pid}/status`, 'utf8'));
      if (rss) peak = Math.max(peak, Number(rss[1]));
    } catch {
      /* exited */
    }
  }, 10);
  const killer = setTimeout(() => proc.kill('SIGKILL'), timeoutMs);
  return new Promise((resolve) => {
    proc.once('close', (status) => {
      clearInterval(sample);
      clearTimeout(killer);
      children.delete(proc);
      resolve({ status, stderr, ms: Date.now() - started, peakRssKiB: peak });
    });
  });
}

describe('vault files readable or writable by others are refused', () => {
  let k: KeyholdEnv;
  let dataDir: string;
  beforeAll(() => {
    k = newEnv('kh-files-mode-');
    keyholdOk(k, ['init']);
    keyholdOk(k, ['key', 'generate', 'web']);
    dataDir = dirname(k.vault);
  }, 30_000);

  const files = ['vault.db', 'vault.db.keys', 'vault.db-wal', 'vault.db-shm'];
  const modes = [0o644, 0o640, 0o604];

  it.each(files)('%s with mode 0644, 0640 or 0604: exit 1 naming the file and the chmod; nothing else changes', (name) => {
    const path = join(dataDir, name);
    // SQLite removes -wal and -shm at the last close; a leftover pair is what a crash leaves.
    const companion = !existsSync(path);
    if (companion) closeSync(openSync(path, 'w', 0o600));
    try {
      for (const mode of modes) {
        chmodSync(path, mode);
        const before = snapshot(dataDir);
        for (const args of [['key', 'list'], ['secret', 'set', 'web', 'NEVER'], ['passphrase', 'change', '--new-passphrase-file', k.passFile]]) {
          const result = keyhold(k, args, { input: 'value' });
          const shown = `0${mode.toString(8)}`;
          expect(result.status, `${name} ${shown}, ${args.join(' ')}: ${result.stderr}`).toBe(1);
          expect(result.stderr).toContain(`${path} is accessible by others (mode ${shown})`);
          expect(result.stderr).toContain(`chmod 600 ${path}`);
          expect(result.stderr.trim().split('\n')).toHaveLength(1);
        }
        expect(snapshot(dataDir), `${name} ${mode.toString(8)}`).toEqual(before);
      }
    } finally {
      if (companion) rmSync(path);
      else chmodSync(path, 0o600);
    }
    expect(keyhold(k, ['key', 'list']).status).toBe(0);
  });

  it("the daemon refuses too: `serve` unlocking at start, and `unlock` of a locked daemon", async () => {
    for (const name of ['vault.db', 'vault.db.keys']) {
      const path = join(dataDir, name);
      chmodSync(path, 0o640);
      try {
        const served = await serveExpectingExit(k);
        expect(served.code, served.stderr).toBe(1);
        expect(served.stderr).toContain(`${path} is accessible by others (mode 0640)`);
        expect(served.stderr).toContain(`chmod 600 ${path}`);
      } finally {
        chmodSync(path, 0o600);
      }
    }
    const bare = { ...k, env: { ...k.env, KEYHOLD_PASSPHRASE_FILE: undefined } };
    const daemon = await startServe(bare, ['--locked']);
    const path = join(dataDir, 'vault.db');
    chmodSync(path, 0o604);
    try {
      const result = keyhold(k, ['unlock']);
      expect(result.status, result.stderr).toBe(1);
      expect(result.stderr).toContain(`${path} is accessible by others (mode 0604)`);
      expect(result.stderr).toContain(`chmod 600 ${path}`);
      expect(keyhold(bare, ['status']).status, 'still locked').toBe(3);
    } finally {
      chmodSync(path, 0o600);
      await daemon.stop();
    }
  }, 60_000);

  it('files a vault creates are 0600 under umask 000: key file, database, -wal, -shm, audit log', async () => {
    const u = newEnv('kh-files-umask-');
    const underUmask000 = ['-c', 'umask 000; exec "$0" "$@"', process.execPath, KEYHOLD_BIN];
    const init = spawnSync('sh', [...underUmask000, 'init'], { env: u.env, encoding: 'utf8' });
    expect(init.status, init.stderr).toBe(0);
    const dir = dirname(u.vault);
    // -wal and -shm exist while a connection is open: look at them under a running daemon.
    const daemon = spawn('sh', [...underUmask000, 'serve'], { env: u.env, stdio: ['ignore', 'ignore', 'pipe'] });
    children.add(daemon);
    let stderr = '';
    daemon.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    try {
      await waitFor(() => stderr.includes('keyhold daemon ready'), 15_000, 'serve under umask 000');
      await waitFor(() => existsSync(join(dir, 'vault.db-wal')) && existsSync(join(dir, 'vault.db-shm')), 5000, 'the -wal and -shm');
      const changed = spawnSync('sh', [...underUmask000, 'passphrase', 'change', '--new-passphrase-file', u.passFile], { env: u.env, encoding: 'utf8' });
      expect(changed.status, changed.stderr).toBe(0);
      const modes = Object.fromEntries(readdirSync(dir).map((n) => [n, (statSync(join(dir, n)).mode & 0o777).toString(8)]));
      expect(modes).toEqual({
        'vault.db': '600',
        'vault.db-wal': '600',
        'vault.db-shm': '600',
        'vault.db.keys': '600',
        'vault.db.audit.jsonl': '600',
      });
    } finally {
      daemon.kill('SIGTERM');
      await waitFor(() => daemon.exitCode !== null || daemon.signalCode !== null, 5000, 'serve to stop');
    }
  }, 60_000);
});

describe('vault.db.keys is read through a cap, whatever it is', () => {
  let k: KeyholdEnv;
  let keys: string;
  let original: Buffer;
  beforeAll(() => {
    k = newEnv('kh-files-cap-');
    keyholdOk(k, ['init']);
    keys = `${k.vault}.keys`;
    original = readFileSync(keys);
  }, 30_000);

  function restore(): void {
    rmSync(keys, { recursive: true, force: true });
    writeFileSync(keys, original, { mode: 0o600 });
  }

  const cases: { name: string; make: () => void; says: RegExp }[] = [
    { name: 'a symlink to /dev/zero', make: () => symlinkSync('/dev/zero', keys), says: /is a character device, not a regular file/ },
    {
      name: 'a FIFO nobody writes to',
      make: () => {
        const made = spawnSync('mkfifo', ['-m', '600', keys]);
        expect(made.status).toBe(0);
      },
      says: /is a FIFO, not a regular file/,
    },
    { name: 'a directory', make: () => mkdirSync(keys, { mode: 0o700 }), says: /is a directory/ },
    {
      name: 'a 50 MiB file',
      make: () => {
        writeFileSync(keys, original, { mode: 0o600 });
        truncateSync(keys, 50 * 1024 * 1024);
      },
      says: /is over 1048576 bytes/,
    },
    {
      name: 'a symlink to a 50 MiB file',
      make: () => {
        const big = join(k.dir, 'big');
        writeFileSync(big, '', { mode: 0o600 });
        truncateSync(big, 50 * 1024 * 1024);
        symlinkSync(big, keys);
      },
      says: /is over 1048576 bytes/,
    },
  ];

  it.each(cases)('$name: exit 1 at once, naming the file, with bounded memory (CLI and serve)', async ({ make, says }) => {
    rmSync(keys, { force: true });
    make();
    try {
      for (const args of [['key', 'list'], ['serve']]) {
        const result = await runWatched(k, args, 10_000);
        expect(result.status, `${args[0]}: ${result.stderr}`).toBe(1);
        expect(result.stderr).toContain(keys);
        expect(result.stderr).toMatch(says);
        expect(result.ms, 'finishes in seconds').toBeLessThan(5000);
        expect(result.peakRssKiB, 'RSS stays small').toBeLessThan(300 * 1024);
      }
    } finally {
      restore();
    }
    expect(keyhold(k, ['key', 'list']).status).toBe(0);
  }, 30_000);
});

const TEMP = /^\.vault\.db\.keys\..*\.tmp$/;
const temps = (k: KeyholdEnv) => readdirSync(dirname(k.vault)).filter((n) => TEMP.test(n));

describe('temp files of an interrupted key-file rewrite', () => {
  it("are removed at the next open when their writer is dead; a running writer's is left alone", async () => {
    const k = newEnv('kh-files-temp-');
    keyholdOk(k, ['init']);
    const dir = dirname(k.vault);
    const exited = spawnSync(process.execPath, ['-e', 'console.log(process.pid)'], { encoding: 'utf8' });
    const deadPid = Number(exited.stdout.trim());
    expect(processAlive(deadPid)).toBe(false);
    const sleeper = spawn('sleep', ['30'], { stdio: 'ignore' });
    children.add(sleeper);
    const stale = `.vault.db.keys.${deadPid}.0123456789ab.tmp`;
    const live = `.vault.db.keys.${sleeper.pid}.ba9876543210.tmp`;
    for (const name of [stale, live]) writeFileSync(join(dir, name), '{"half": ', { mode: 0o600 });
    keyholdOk(k, ['key', 'list']);
    expect(temps(k).sort()).toEqual([live]);
    sleeper.kill('SIGKILL');
    await waitFor(() => !processAlive(sleeper.pid!), 5000, 'the sleeper to die');
    keyholdOk(k, ['key', 'list']);
    expect(temps(k)).toEqual([]);

    // Under the write lock every key-file writer takes, any temp is stale: a rewrite clears
    // them all, a live pid's (another pid namespace) and an older keyhold's unnamed one too.
    const other = spawn('sleep', ['30'], { stdio: 'ignore' });
    children.add(other);
    const names = [`.vault.db.keys.${other.pid}.00112233aabb.tmp`, '.vault.db.keys.4400b3f0cad5.tmp'];
    for (const name of names) writeFileSync(join(dir, name), '{"half": ', { mode: 0o600 });
    keyholdOk(k, ['key', 'list']);
    expect(temps(k).sort()).toEqual([...names].sort());
    keyholdOk(k, ['passphrase', 'change', '--new-passphrase-file', k.passFile]);
    expect(temps(k)).toEqual([]);
    other.kill('SIGKILL');
  }, 30_000);
});

describe('kill -9 during `passphrase change`', () => {
  it('10 rounds killed at the temp file, at the rename or at random: no temp survives the next open; every rewrap that took effect is audited', async () => {
    const k = newEnv('kh-files-rewrap-');
    keyholdOk(k, ['init']);
    const dir = dirname(k.vault);
    let current = k.passphrase;
    let effective = 0;
    const durations: number[] = [];
    const kills: string[] = [];
    for (let round = 0; round < 10; round++) {
      const next = `rewrap-${round}-${Math.random().toString(36).slice(2)}`;
      const nextFile = join(k.dir, `next-${round}`);
      writeFileSync(nextFile, next + '\n', { mode: 0o600 });
      writeFileSync(k.passFile, current + '\n', { mode: 0o600 });
      // Kill where it hurts: as the temp file appears (a rewrite cut short), as the rename lands
      // (the change took effect, the process has not finished), or at a random moment.
      const mode = (['temp', 'rename', 'random'] as const)[round % 3]!;
      const started = Date.now();
      const proc = spawn(process.execPath, [KEYHOLD_BIN, 'passphrase', 'change', '--new-passphrase-file', nextFile], { env: k.env, stdio: 'ignore' });
      children.add(proc);
      const kill = () => {
        if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      };
      const watcher = watch(dir, (_event, name) => {
        if ((mode === 'temp' && name && TEMP.test(name)) || (mode === 'rename' && name === 'vault.db.keys')) kill();
      });
      const median = durations.length ? [...durations].sort((a, b) => a - b)[Math.floor(durations.length / 2)]! : 800;
      const timer = mode === 'random' ? setTimeout(kill, Math.random() * median) : null;
      const outcome = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
        proc.once('close', (code, signal) => resolve({ code, signal })),
      );
      watcher.close();
      if (timer) clearTimeout(timer);
      children.delete(proc);
      if (outcome.code === 0) durations.push(Date.now() - started);
      kills.push(`${mode}:${outcome.signal ?? outcome.code}`);

      // Which passphrase opens the vault now tells whether the rewrap took effect. The probe is
      // also the next open: it must clear what the killed writer left.
      const withNext = keyhold(k, ['key', 'list', '--passphrase-file', nextFile]);
      if (withNext.status === 0) {
        effective++;
        current = next;
      } else {
        expect(withNext.status, withNext.stderr).toBe(4);
        const withCurrent = keyhold(k, ['key', 'list']);
        expect(withCurrent.status, `the old passphrase must open the vault: ${withCurrent.stderr}`).toBe(0);
      }
      expect(temps(k), `round ${round} (${mode}): no temp file after the next open`).toEqual([]);
    }
    writeFileSync(k.passFile, current + '\n', { mode: 0o600 });
    const verify = keyhold(k, ['audit', 'verify']);
    expect(verify.status, verify.stderr).toBe(0);
    const changed = readFileSync(`${k.vault}.audit.jsonl`, 'utf8')
      .split('\n')
      .filter((l) => l.includes('"event":"factor-changed"')).length;
    expect(changed, `rewraps that took effect: ${effective}; kills: ${kills.join(' ')}`).toBeGreaterThanOrEqual(effective);
    expect(effective, 'some rounds changed the passphrase').toBeGreaterThan(0);
  }, 120_000);
});

describe('other files keyhold reads, swapped for /dev/zero', () => {
  it('the audit log (verify, tail), a public key file (factor add ssh-agent --key), a token file (bridge): exit at once, bounded memory', async () => {
    const k = newEnv('kh-files-zero-');
    keyholdOk(k, ['init']);
    keyholdOk(k, ['key', 'generate', 'web']);
    const audit = `${k.vault}.audit.jsonl`;
    const saved = readFileSync(audit);
    rmSync(audit);
    symlinkSync('/dev/zero', audit);
    try {
      for (const args of [['audit', 'verify'], ['audit', 'tail']]) {
        const result = await runWatched(k, args);
        expect(result.status, `${args.join(' ')}: ${result.stderr}`).toBe(1);
        expect(result.stderr).toContain(`${audit} is a character device, not a regular file`);
        expect(result.ms).toBeLessThan(5000);
        expect(result.peakRssKiB).toBeLessThan(300 * 1024);
      }
    } finally {
      rmSync(audit);
      writeFileSync(audit, saved, { mode: 0o600 });
    }
    const keys = readFileSync(`${k.vault}.keys`);
    const pub = await runWatched(k, ['factor', 'add', 'ssh-agent', '--key', '/dev/zero']);
    expect(pub.status, pub.stderr).toBe(1);
    expect(pub.stderr).toContain('public key file /dev/zero is over');
    expect(pub.peakRssKiB).toBeLessThan(300 * 1024);
    expect(readFileSync(`${k.vault}.keys`).equals(keys)).toBe(true);
    const bridge = await runWatched(k, ['bridge', '--token-file', '/dev/zero', '--connect', 'tcp:127.0.0.1:1', '--listen', `unix:${join(k.dir, 'b.sock')}`]);
    expect(bridge.status, bridge.stderr).toBe(2);
    expect(bridge.stderr).toContain('token file /dev/zero is over');
    expect(bridge.peakRssKiB).toBeLessThan(300 * 1024);
    expect(keyhold(k, ['audit', 'verify']).status).toBe(0);
  }, 60_000);
});
