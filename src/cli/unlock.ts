// `keyhold unlock`, `lock` and `status`: the daemon holds the unlocked vault; these talk to it over
// the control socket, starting it in the background when none runs.
import { spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { readCapped } from '../read-capped.js';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Argv } from 'yargs';
import { ControlClient } from '../control/client.js';
import type { DaemonStatus } from '../control/protocol.js';
import { EXIT, KeyholdError, QuietExit } from '../errors.js';
import { ensurePrivateDir, runtimeDir, scopesDir } from '../runtime-dir.js';
import { setenvLine } from '../shell-quote.js';
import { scopeSocketPath } from '../signer/scope-sockets.js';
import { readKeyring, zeroKeks, type Keyring } from '../vault/keyring.js';
import { vaultPaths, type VaultPaths } from '../vault/paths.js';
import { checkScopeName } from '../vault/vault.js';
import { RememberedKey } from '../daemon/remembered-unlock.js';
import { printJson, type GlobalArgs } from './common.js';
import { optionalDuration } from './serve.js';
import { FACTOR_TYPES, type FactorType } from '../unlock/kinds.js';
import { collectKeks } from '../unlock/prove.js';

const BIN = fileURLToPath(new URL('../../bin/keyhold', import.meta.url));
const START_TIMEOUT_MS = 15_000;

export const daemonLogPath = (runtime: string) => join(runtime, 'daemon.log');

/**
 * Starts `keyhold serve --locked` detached from this terminal, its log in the runtime dir, and
 * waits until its control socket answers. Two racing starts are fine: the loser exits on the
 * pid lock and we talk to the winner.
 */
async function startBackgroundDaemon(paths: VaultPaths, runtime: string): Promise<ControlClient> {
  ensurePrivateDir(runtime);
  const logFd = openSync(daemonLogPath(runtime), 'a', 0o600);
  const env = { ...process.env };
  // The daemon starts locked and is unlocked over the control socket; it needs no secret.
  for (const name of ['KEYHOLD_PASSPHRASE', 'KEYHOLD_PASSPHRASE_FILE', 'CREDENTIALS_DIRECTORY', 'SSH_AUTH_SOCK']) delete env[name];
  env.KEYHOLD_RUNTIME_DIR = runtime;
  const child = spawn(process.execPath, [BIN, 'serve', '--locked', '--vault', paths.db], {
    detached: true,
    stdio: ['ignore', logFd, logFd],
    env,
    cwd: '/',
  });
  closeSync(logFd);
  let exited: number | null = null;
  child.once('exit', (code, signal) => {
    exited = code ?? 128 + (signal ? 15 : 0);
  });
  child.unref();
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    const client = await ControlClient.connect(runtime).catch(() => null);
    if (client) return client;
    if (exited !== null || Date.now() > deadline) {
      const last = lastLogLine(runtime);
      throw new KeyholdError(
        exited !== null ? `the daemon exited at start (code ${exited})` : 'the daemon did not start in time',
        last ? `its log says: ${last}` : `see ${daemonLogPath(runtime)}`,
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

function lastLogLine(runtime: string): string | null {
  try {
    // The log grows across restarts; its last line is in its last few KiB.
    const lines = readCapped(daemonLogPath(runtime), 64 * 1024, 'daemon log', { regularFile: true, tail: true }).toString('utf8').trim().split('\n');
    const last = lines[lines.length - 1];
    if (!last) return null;
    try {
      const entry = JSON.parse(last) as { msg?: string; err?: string };
      return [entry.msg, entry.err].filter(Boolean).join(': ').slice(0, 300);
    } catch {
      return last.slice(0, 300);
    }
  } catch {
    return null;
  }
}

/** Starts the background daemon for this vault (see startBackgroundDaemon) and checks it serves it. */
async function startDaemonFor(paths: VaultPaths, runtime: string, keyring: Keyring): Promise<{ client: ControlClient; status: DaemonStatus }> {
  const client = await startBackgroundDaemon(paths, runtime);
  try {
    const status = await client.status();
    if (status.vault_id !== keyring.vault_id) {
      throw new KeyholdError(`the daemon in ${runtime} serves another vault, ${status.vault}`, 'set KEYHOLD_RUNTIME_DIR');
    }
    return { client, status };
  } catch (err) {
    client.close();
    throw err;
  }
}

/** The daemon for this vault: null when none runs; an error when it serves another vault. */
async function connectDaemon(runtime: string, keyring: Keyring): Promise<{ client: ControlClient; status: DaemonStatus } | null> {
  const client = await ControlClient.connect(runtime);
  if (!client) return null;
  try {
    const status = await client.status();
    if (status.vault_id !== keyring.vault_id) {
      throw new KeyholdError(
        `the daemon in ${runtime} (pid ${status.pid}) serves another vault, ${status.vault}`,
        'stop it, or set KEYHOLD_RUNTIME_DIR to run another daemon',
      );
    }
    return { client, status };
  } catch (err) {
    client.close();
    throw err;
  }
}

const MEMORY_WORDS: Record<string, string> = {
  secret: 'memfd_secret',
  locked: "mlock'ed, non-dumpable (no memfd_secret)",
  plain: 'ordinary (swappable, dumpable)',
};

function describeStatus(status: DaemonStatus): string[] {
  const lines = [`${status.locked ? 'locked' : 'unlocked'}: ${status.vault} (daemon pid ${status.pid})`];
  if (!status.locked) {
    if (status.lock_at) lines.push(`locks at ${status.lock_at}`);
    if (status.idle_ms !== null) lines.push(`locks after ${Math.round(status.idle_ms / 1000)}s without requests (next: ${status.idle_lock_at})`);
    if (status.remembered_until) lines.push(`a restarted daemon comes back unlocked until ${status.remembered_until} (kernel keyring)`);
  }
  for (const socket of status.sockets) lines.push(`socket ${socket}`);
  if (status.memory) lines.push(`keys in ${MEMORY_WORDS[status.memory] ?? status.memory} memory`);
  return lines;
}

export function unlockCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'unlock',
    'unlock the vault in the daemon (starting it if none runs); with --scope, print the export line for eval',
    (c) =>
      c
        .option('factor', { choices: FACTOR_TYPES, describe: 'unlock with this factor only' })
        .option('ttl', { type: 'string', describe: 'lock again after this long, whatever the activity (90s, 30m, 8h, 7d)' })
        .option('idle', { type: 'string', describe: 'lock again after this long without requests' })
        .option('remember', {
          type: 'string',
          describe: 'for this long (at most --ttl), a restarted daemon comes back unlocked without a factor (kernel keyring); lock and stop end it',
        })
        .option('scope', { type: 'string', describe: "print `export SSH_AUTH_SOCK=…` for this scope's socket" })
        .option('c', { type: 'boolean', describe: 'with --scope: print csh syntax (`setenv SSH_AUTH_SOCK …;`), as ssh-agent -c' })
        .option('s', { type: 'boolean', describe: 'with --scope: print Bourne shell syntax, as ssh-agent -s (the default unless $SHELL ends in csh)' })
        .conflicts('c', 's')
        .example('eval "$(keyhold unlock --scope web --ttl 8h)"', '')
        .example('keyhold unlock --remember 8h', 'systemd restarting the daemon keeps it unlocked for 8 h')
        .example('eval "`keyhold unlock --scope web -c`"', 'csh, tcsh')
        .example('ssh -A host keyhold unlock --factor ssh-agent', ''),
    async (args) => {
      const scope = args.scope === undefined ? undefined : checkScopeName(args.scope);
      const ttlMs = optionalDuration(args.ttl, '--ttl');
      const idleMs = optionalDuration(args.idle, '--idle');
      const rememberMs = optionalDuration(args.remember, '--remember');
      if (rememberMs !== null && ttlMs !== null && rememberMs > ttlMs) {
        process.stderr.write('keyhold: note: --remember ends with --ttl: a restart after the lock stays locked\n');
      }
      const paths = vaultPaths(args.vault);
      const keyring = readKeyring(paths.keys);
      const runtime = runtimeDir();
      const socket = scope === undefined ? undefined : scopeSocketPath(scopesDir(runtime), scope);
      // Made before unlocking: a path the shell cannot take fails with nothing done.
      const exportLine = socket === undefined ? undefined : setenvLine('SSH_AUTH_SOCK', socket, wantsCsh(args));
      let daemon = await connectDaemon(runtime, keyring);
      let status = daemon?.status;
      try {
        // A remembered unlock (`--remember`) in the kernel keyring: the daemon comes back unlocked
        // by itself, no factor asked.
        let startedLocked = false;
        if (!daemon && new RememberedKey(keyring.vault_id).present()) {
          daemon = await startDaemonFor(paths, runtime, keyring);
          status = daemon.status;
          // Locked: the remembered unlock was unusable (its log says why); the factors are asked as usual.
          startedLocked = status.locked;
          if (!status.locked) process.stderr.write('keyhold: unlocked from the remembered unlock (kernel keyring); no factor asked\n');
        }
        if (daemon && !daemon.status.locked) {
          if (ttlMs !== null || idleMs !== null || rememberMs !== null) {
            process.stderr.write('keyhold: already unlocked; its lock times are unchanged (lock first to set new ones)\n');
          }
        } else {
          // Prove the factors first: a failure then leaves no daemon behind.
          const keks = await collectKeks(keyring, { file: args['passphrase-file'], factor: args.factor as FactorType | undefined }).catch(async (err: unknown) => {
            if (startedLocked) await daemon!.client.call({ op: 'stop' }).catch(() => undefined);
            throw err;
          });
          try {
            daemon ??= await startDaemonFor(paths, runtime, keyring);
            status = await daemon.client.call<DaemonStatus>({ op: 'unlock', vaultId: keyring.vault_id, keks: Object.fromEntries(keks), idleMs, ttlMs, rememberMs });
          } finally {
            zeroKeks(keks);
          }
        }
      } finally {
        daemon?.client.close();
      }
      status = status!;
      if (scope !== undefined && !status.sockets.includes(socket!)) {
        process.stderr.write(`keyhold: warning: scope ${scope} has no keys, so its socket is not open\n`);
      }
      if (args.json) return printJson({ ...status, ...(socket ? { socket } : {}) });
      if (exportLine) process.stdout.write(`${exportLine}\n`);
      else process.stderr.write(`keyhold: unlocked (daemon pid ${status.pid})\n`);
      if (rememberMs !== null && status.remembered_until) process.stderr.write(`keyhold: a restarted daemon comes back unlocked until ${status.remembered_until}\n`);
    },
  );
}

/** As ssh-agent: `-c` csh, `-s` Bourne shell, else csh when the login shell ($SHELL) is a csh. */
function wantsCsh(args: { c?: boolean | undefined; s?: boolean | undefined }): boolean {
  if (args.c) return true;
  if (args.s) return false;
  return (process.env.SHELL ?? '').endsWith('csh');
}

/**
 * `lock` and `stop` revoke a remembered unlock even when no daemon runs (it crashed, or was
 * killed): otherwise the next start would come back unlocked after the user asked to lock.
 * Answers whether there was one to remove.
 */
function forgetRememberedWithoutDaemon(vaultId: string, json: boolean): boolean {
  if (!new RememberedKey(vaultId).forget()) return false;
  if (json) printJson({ running: false, locked: true, remembered_until: null });
  else process.stderr.write('keyhold: no daemon was running; removed its remembered unlock from the kernel keyring, so a restart starts locked\n');
  return true;
}

/** The vault id of the vault in use, or null when there is none to read (stop needs no vault). */
function vaultIdIfAny(vault: string | undefined): string | null {
  try {
    return readKeyring(vaultPaths(vault).keys).vault_id;
  } catch {
    return null;
  }
}

export function lockCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'lock',
    "lock the daemon's vault: keys and master key dropped, sockets stay and answer no identities",
    (c) => c,
    async (args) => {
      const keyring = readKeyring(vaultPaths(args.vault).keys);
      const daemon = await connectDaemon(runtimeDir(), keyring);
      if (!daemon) {
        if (!forgetRememberedWithoutDaemon(keyring.vault_id, Boolean(args.json))) throw new KeyholdError('no daemon is running', 'nothing to lock', EXIT.LOCKED);
        return;
      }
      let status: DaemonStatus;
      try {
        status = await daemon.client.call<DaemonStatus>({ op: 'lock' });
      } finally {
        daemon.client.close();
      }
      if (args.json) printJson(status);
      else process.stderr.write(`keyhold: locked (daemon pid ${status.pid}): keys and master key dropped\n`);
    },
  );
}

export function statusCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'status',
    'is the vault unlocked in a running daemon? exit 0 unlocked, 3 locked or no daemon',
    (c) => c.option('quiet', { alias: 'q', type: 'boolean', describe: 'print nothing; only the exit code' }),
    async (args) => {
      const keyring = readKeyring(vaultPaths(args.vault).keys);
      let daemon: Awaited<ReturnType<typeof connectDaemon>>;
      try {
        daemon = await connectDaemon(runtimeDir(), keyring);
      } catch (err) {
        if (args.quiet) throw new QuietExit(EXIT.LOCKED);
        throw new KeyholdError((err as Error).message, (err as KeyholdError).hint, EXIT.LOCKED);
      }
      daemon?.client.close();
      const status = daemon?.status;
      if (!args.quiet) {
        if (args.json) printJson(status ? { running: true, ...status } : { running: false, locked: true });
        else if (status) process.stdout.write(describeStatus(status).join('\n') + '\n');
        else process.stdout.write('no daemon running (locked)\n');
      }
      if (!status || status.locked) throw new QuietExit(EXIT.LOCKED);
    },
  );
}

/** How long `keyhold stop` waits for the daemon's process to be gone. */
const STOP_TIMEOUT_MS = 10_000;

/** Whether `pid` still runs (a zombie has exited; its parent just has not collected it). */
function processRuns(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2)[0];
    return state !== 'Z' && state !== 'X';
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  }
}

export function stopCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'stop',
    'stop the daemon of this runtime dir, as ssh-agent -k: sockets removed, vault locked; exit 3 when none runs',
    (c) => c,
    async (args) => {
      const runtime = runtimeDir();
      const client = await ControlClient.connect(runtime);
      if (!client) {
        const vaultId = vaultIdIfAny(args.vault);
        if (vaultId === null || !forgetRememberedWithoutDaemon(vaultId, Boolean(args.json))) {
          throw new KeyholdError(`no daemon is running in ${runtime}`, 'nothing to stop', EXIT.LOCKED);
        }
        return;
      }
      let pid: number;
      try {
        ({ pid } = await client.call<{ pid: number }>({ op: 'stop' }));
      } finally {
        client.close();
      }
      const deadline = Date.now() + STOP_TIMEOUT_MS;
      while (processRuns(pid)) {
        if (Date.now() > deadline) {
          throw new KeyholdError(`the daemon (pid ${pid}) did not stop within ${STOP_TIMEOUT_MS / 1000} s`, `see ${daemonLogPath(runtime)}, or kill ${pid}`);
        }
        await new Promise((r) => setTimeout(r, 25));
      }
      if (args.json) printJson({ stopped: true, pid });
      else process.stdout.write(`keyhold daemon (pid ${pid}) stopped\n`);
    },
  );
}
