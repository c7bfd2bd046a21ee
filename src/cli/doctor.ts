// `keyhold doctor`: checks the pieces a working setup needs and says, one line each, what is
// wrong and the command that fixes it. Read-only: it creates no runtime dir or vault, unlocks
// nothing, and prints no secret (it reads the key file's metadata and the audit log's last time).
// `keyhold doctor --unit` prints the systemd user unit with ExecStart set to this install.
import { accessSync, constants, lstatSync, readdirSync, realpathSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { homedir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Argv } from 'yargs';
import { AgentClient } from '../agent-client.js';
import { defaultConfigPath, loadConfig, type KeyholdConfig } from '../config/config.js';
import { ControlClient } from '../control/client.js';
import type { DaemonStatus } from '../control/protocol.js';
import { remoteVaultApi } from '../control/remote-vault.js';
import { EXIT, KeyholdError, oneLine, QuietExit } from '../errors.js';
import { probeSecretService, SecretServiceError, type SecretServicePresence } from '../platform/secret-service.js';
import { checkPrivateMode, readCapped } from '../read-capped.js';
import { runtimeDir, scopesDir } from '../runtime-dir.js';
import { checkDatabaseFile } from '../vault/database.js';
import { readKeyring, type Keyring } from '../vault/keyring.js';
import { describeKey, describeKeyError, searchUserKey } from '../platform/kernel-keyring.js';
import { rememberedKeyDescription } from '../daemon/remembered-unlock.js';
import { vaultPaths, type VaultPaths } from '../vault/paths.js';
import { SCOPE_PATTERN, type ScopeSummary } from '../vault/vault.js';
import { printJson, type GlobalArgs } from './common.js';

export type CheckStatus = 'ok' | 'wrong' | 'note';

export interface CheckResult {
  check: string;
  status: CheckStatus;
  message: string;
  fix?: string;
}

const PACKAGE_ROOT = fileURLToPath(new URL('../../', import.meta.url));
const UNIT_TEMPLATE = join(PACKAGE_ROOT, 'contrib', 'systemd', 'keyhold.service');
const BIN = join(PACKAGE_ROOT, 'bin', 'keyhold');
const MARK: Record<CheckStatus, string> = { ok: '✔', wrong: '✘', note: '•' };
/** A clock this far behind the last audit line is wrong; less is NTP slewing, not a broken clock. */
const CLOCK_TOLERANCE_MS = 60_000;
/** Before this, the clock is unset (an RTC without battery starts at 1970 or 2000). */
const EARLIEST_SANE_TIME = Date.parse('2024-01-01T00:00:00Z');
const LATEST_SANE_TIME = Date.parse('2100-01-01T00:00:00Z');
const PROBE_TIMEOUT_MS = 3_000;

const ok = (check: string, message: string): CheckResult => ({ check, status: 'ok', message });
const note = (check: string, message: string, fix?: string): CheckResult => ({ check, status: 'note', message, ...(fix ? { fix } : {}) });
const wrong = (check: string, message: string, fix: string): CheckResult => ({ check, status: 'wrong', message, fix });

/** The realpath of this install's `keyhold` (the bin a unit should run). */
export function thisInstall(): string {
  return realpathSync(BIN);
}

// ---- the checks ----

function checkConfig(explicit: string | undefined): { result: CheckResult; config: KeyholdConfig | null } {
  try {
    const config = loadConfig(explicit);
    if (config.file === null) return { result: note('config', `no config file at ${defaultConfigPath()}; the defaults apply`), config };
    const keys = Object.keys(config.serve).length;
    return { result: ok('config', `${config.file} parses (${keys} setting${keys === 1 ? '' : 's'} in [serve])`), config };
  } catch (err) {
    const e = err as KeyholdError;
    return { result: wrong('config', e.message, e.hint ?? 'fix the config file'), config: null };
  }
}

/** Each vault file a user can see: present ones must be private; vault.db and its key file must exist. */
function checkVaultFiles(paths: VaultPaths): { results: CheckResult[]; keyring: Keyring | null } {
  const results: CheckResult[] = [];
  const files: [path: string, required: boolean][] = [
    [paths.db, true],
    [paths.keys, true],
    [`${paths.db}-wal`, false],
    [`${paths.db}-shm`, false],
    [paths.audit, false],
  ];
  let missing = false;
  for (const [path, required] of files) {
    let stat;
    try {
      // Followed, as the vault follows a symlinked vault.db (a link's own mode is always 0777).
      stat = statSync(path);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT') results.push(wrong('vault files', `cannot stat ${path}: ${code ?? 'error'}`, `check ${dirname(path)} and its permissions`));
      else if (required) missing = true;
      continue;
    }
    try {
      checkPrivateMode(stat, path);
    } catch (err) {
      const e = err as KeyholdError;
      results.push(wrong('vault files', e.message, (e.hint ?? '').replace(/^run: /, '')));
      continue;
    }
    const uid = process.getuid?.();
    if (uid !== undefined && stat.uid !== uid) results.push(wrong('vault files', `${path} is owned by uid ${stat.uid}`, `chown ${uid} ${path}`));
  }
  if (missing) {
    results.push(wrong('vault files', `no vault at ${paths.db}`, 'keyhold init (or point --vault / KEYHOLD_VAULT at your vault)'));
    return { results, keyring: null };
  }
  let keyring: Keyring | null = null;
  if (results.length === 0) {
    // What opening the vault would refuse besides modes: a non-file, an empty file, no write access.
    try {
      checkDatabaseFile(paths.db);
      keyring = readKeyring(paths.keys);
    } catch (err) {
      const e = err as KeyholdError;
      results.push(wrong('vault files', e.message, e.hint ?? 'restore the vault from a backup'));
    }
  }
  if (results.length === 0) results.push(ok('vault files', `${paths.db}, its key file and companions are yours and private`));
  return { results, keyring };
}

/** The runtime dir: absent is fine (the daemon makes it); present, it must be ours and 0700. */
function checkRuntimeDir(runtime: string): CheckResult {
  let stat;
  try {
    stat = lstatSync(runtime);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return note('runtime dir', `${runtime} does not exist yet (the daemon creates it, mode 0700)`);
    return wrong('runtime dir', `cannot stat ${runtime}: ${code ?? 'error'}`, `check ${dirname(runtime)}, or set KEYHOLD_RUNTIME_DIR`);
  }
  const uid = process.getuid!();
  if (stat.isSymbolicLink()) return wrong('runtime dir', `${runtime} is a symlink`, `rm ${runtime} (the daemon creates the directory), or set KEYHOLD_RUNTIME_DIR`);
  if (!stat.isDirectory()) return wrong('runtime dir', `${runtime} is not a directory`, `rm ${runtime} (the daemon creates the directory), or set KEYHOLD_RUNTIME_DIR`);
  if (stat.uid !== uid) return wrong('runtime dir', `${runtime} is owned by uid ${stat.uid}, not you (uid ${uid})`, `set KEYHOLD_RUNTIME_DIR to a directory of your own`);
  const mode = (stat.mode & 0o7777).toString(8).padStart(4, '0');
  if ((stat.mode & 0o077) !== 0) return wrong('runtime dir', `${runtime} is accessible to other users (mode ${mode})`, `chmod 700 ${runtime}`);
  return ok('runtime dir', `${runtime} is yours, mode ${mode}`);
}

interface DaemonState {
  client: ControlClient | null;
  status: DaemonStatus | null;
}

async function checkDaemon(runtime: string, runtimeOk: boolean, keyring: Keyring | null): Promise<{ result: CheckResult; daemon: DaemonState }> {
  const none: DaemonState = { client: null, status: null };
  if (!runtimeOk) return { result: note('daemon', 'not checked: the runtime dir is not usable (see above)'), daemon: none };
  let client: ControlClient | null;
  try {
    client = await ControlClient.connect(runtime);
  } catch (err) {
    return { result: wrong('daemon', (err as Error).message, (err as KeyholdError).hint ?? 'check the runtime dir'), daemon: none };
  }
  if (!client) return { result: wrong('daemon', `no daemon is running in ${runtime}`, 'keyhold unlock (starts one), or systemctl --user start keyhold'), daemon: none };
  let status: DaemonStatus;
  try {
    status = await client.status();
  } catch (err) {
    client.close();
    return { result: wrong('daemon', `the daemon in ${runtime} does not answer: ${(err as Error).message}`, 'keyhold stop, then start it again'), daemon: none };
  }
  if (keyring && status.vault_id !== keyring.vault_id) {
    client.close();
    return {
      result: wrong('daemon', `the daemon (pid ${status.pid}) serves another vault, ${status.vault}`, 'keyhold stop, or set KEYHOLD_VAULT / --vault to its vault'),
      daemon: none,
    };
  }
  const daemon = { client, status };
  if (status.locked) return { result: note('daemon', `running (pid ${status.pid}), locked`, 'keyhold unlock'), daemon };
  return { result: ok('daemon', `running (pid ${status.pid}), unlocked`), daemon };
}

/**
 * A scope something points at (a live token, a policy, the config's [serve] scopes, SSH_AUTH_SOCK)
 * but that holds no key: its socket answers "no identities". A scope of secrets only is fine.
 */
async function checkScopes(daemon: DaemonState, configScopes: string[], envScope: string | null): Promise<CheckResult[]> {
  if (!daemon.client || !daemon.status || daemon.status.locked) {
    return [note('scopes', 'not checked: it needs an unlocked daemon (doctor unlocks nothing)', 'keyhold unlock, then keyhold doctor again')];
  }
  let scopes: ScopeSummary[];
  try {
    scopes = await remoteVaultApi(daemon.client, daemon.status.vault_id).scopes();
  } catch (err) {
    return [note('scopes', `not checked: ${(err as Error).message}`)];
  }
  const byName = new Map(scopes.map((s) => [s.name, s]));
  const names = new Set([...scopes.map((s) => s.name), ...configScopes, ...(envScope ? [envScope] : [])]);
  const results: CheckResult[] = [];
  for (const name of [...names].sort()) {
    const scope = byName.get(name);
    if (scope && scope.keys > 0) continue;
    const uses = [
      scope && scope.tokens > 0 ? `${scope.tokens} live token${scope.tokens === 1 ? '' : 's'}` : null,
      scope?.policy ? 'a policy' : null,
      configScopes.includes(name) ? 'the config ([serve] scopes)' : null,
      envScope === name ? 'SSH_AUTH_SOCK' : null,
    ].filter((use): use is string => use !== null);
    if (uses.length === 0) continue;
    results.push(
      wrong('scopes', `scope ${name} has no keys but is used by ${uses.join(', ')}: its socket offers no identities`, `keyhold key generate ${name}, or keyhold key assign ${name} FINGERPRINT`),
    );
  }
  if (results.length === 0) {
    const withKeys = scopes.filter((s) => s.keys > 0).length;
    results.push(ok('scopes', `${withKeys} scope${withKeys === 1 ? '' : 's'} with keys; none in use without keys`));
  }
  return results;
}

/** The scope whose socket `sock` is (in this runtime dir), or null. */
function scopeOfSocket(sock: string, runtime: string): string | null {
  const dir = scopesDir(runtime);
  const canonical = (path: string) => {
    try {
      return realpathSync(path);
    } catch {
      return resolve(path);
    }
  };
  const name = basename(sock);
  if (!name.endsWith('.sock') || canonical(dirname(sock)) !== canonical(dir)) return null;
  const scope = name.slice(0, -'.sock'.length);
  return SCOPE_PATTERN.test(scope) ? scope : null;
}

/** Whether something accepts connections at the socket `path`. */
function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolvePromise) => {
    const socket = connect(path);
    const timer = setTimeout(() => {
      socket.destroy();
      resolvePromise(false);
    }, PROBE_TIMEOUT_MS);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolvePromise(true);
    });
    socket.once('error', () => {
      clearTimeout(timer);
      resolvePromise(false);
    });
  });
}

/** How many identities the agent at `path` offers, or the reason it does not answer as an agent. */
async function agentIdentities(path: string): Promise<number | string> {
  let client: AgentClient;
  try {
    client = await AgentClient.connect(path, PROBE_TIMEOUT_MS);
  } catch (err) {
    return (err as Error).message;
  }
  try {
    // Listing keys needs no confirmation: an agent that takes longer is not answering.
    const response = await client.request({ type: 'request-identities' }, PROBE_TIMEOUT_MS);
    return response.type === 'identities' ? response.identities.length : `it answered a key listing with ${response.type}`;
  } catch (err) {
    return (err as Error).message;
  } finally {
    client.close();
  }
}

async function checkAuthSock(runtime: string, daemon: DaemonState): Promise<{ result: CheckResult; scope: string | null }> {
  const sock = process.env.SSH_AUTH_SOCK;
  const useFix = 'eval "$(keyhold unlock --scope SCOPE)", or export SSH_AUTH_SOCK="$(keyhold socket SCOPE)"';
  if (!sock) return { result: note('SSH_AUTH_SOCK', 'not set: ssh uses no agent in this shell', useFix), scope: null };
  const scope = scopeOfSocket(sock, runtime);
  let stat;
  try {
    stat = statSync(sock);
  } catch {
    if (scope !== null) {
      const why = daemon.status ? `the daemon has no socket for scope ${scope} (no keys?)` : 'no daemon is running';
      const fix = daemon.status ? `keyhold key generate ${scope} (or key assign), or pick a scope with keys` : 'keyhold unlock, or systemctl --user start keyhold';
      return { result: wrong('SSH_AUTH_SOCK', `${sock} (keyhold scope ${scope}) does not exist: ${why}`, fix), scope };
    }
    return { result: wrong('SSH_AUTH_SOCK', `${sock} does not exist (an agent of an earlier session?)`, useFix), scope: null };
  }
  if (!stat.isSocket()) return { result: wrong('SSH_AUTH_SOCK', `${sock} is not a socket`, useFix), scope };
  if (scope !== null) {
    const identities = await agentIdentities(sock);
    if (typeof identities === 'string') return { result: wrong('SSH_AUTH_SOCK', `keyhold scope ${scope}: ${identities}`, 'keyhold stop, then start the daemon again'), scope };
    const locked = daemon.status?.locked ? ' (the vault is locked)' : '';
    return { result: ok('SSH_AUTH_SOCK', `keyhold scope ${scope}: ${identities} identit${identities === 1 ? 'y' : 'ies'}${locked}`), scope };
  }
  if (!(await socketAnswers(sock))) return { result: wrong('SSH_AUTH_SOCK', `nothing listens on ${sock} (a stale socket)`, useFix), scope: null };
  const identities = await agentIdentities(sock);
  if (typeof identities === 'string') return { result: wrong('SSH_AUTH_SOCK', `${sock} does not answer as an SSH agent: ${identities}`, useFix), scope: null };
  return {
    result: note('SSH_AUTH_SOCK', `${sock} is another agent, not a keyhold scope socket (${identities} identit${identities === 1 ? 'y' : 'ies'})`, useFix),
    scope: null,
  };
}

// ---- systemd units ----

function unitDirs(): { dir: string; system: boolean }[] {
  const config = process.env.XDG_CONFIG_HOME || join(homedir(), '.config');
  return [
    { dir: join(config, 'systemd', 'user'), system: false },
    { dir: '/etc/systemd/user', system: false },
    { dir: '/etc/systemd/system', system: true },
  ];
}

/** The words of ExecStart's command line: prefixes (-@:+!|) dropped, quotes honoured, %h and %% expanded. */
export function execStartWords(unitText: string): string[] | null {
  const text = unitText.replace(/\\\n/g, ' ');
  let value: string | null = null;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    const match = /^ExecStart\s*=\s*(.*)$/.exec(line);
    // An empty ExecStart= resets the list (a drop-in's idiom); the last non-empty one counts.
    if (match) value = match[1]!.trim() === '' ? null : match[1]!.trim();
  }
  if (value === null) return null;
  const words: string[] = [];
  const pattern = /"((?:[^"\\]|\\.)*)"|'([^']*)'|(\S+)/g;
  for (const m of value.replace(/^[-@:+!|]+/, '').matchAll(pattern)) words.push(m[1] ?? m[2] ?? m[3]!);
  return words.map((w) => w.replace(/%[h%]/g, (s) => (s === '%h' ? homedir() : '%')));
}

/** Where systemd looks up a program named without a path (systemd >= 239). */
const SYSTEMD_SEARCH_PATH = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin'];

function resolveProgram(program: string): string | null {
  const candidates = program.startsWith('/') ? [program] : SYSTEMD_SEARCH_PATH.map((dir) => join(dir, program));
  for (const candidate of candidates) {
    try {
      accessSync(candidate, constants.X_OK);
      if (statSync(candidate).isFile()) return realpathSync(candidate);
    } catch {
      /* next */
    }
  }
  return null;
}

function checkUnit(unit: string, system: boolean, install: string): CheckResult {
  const check = 'unit';
  const regenerate = system
    ? `keyhold doctor --unit | sudo tee ${unit} >/dev/null && sudo systemctl daemon-reload`
    : `keyhold doctor --unit > ${unit} && systemctl --user daemon-reload`;
  let text: string;
  try {
    text = readCapped(unit, 64 * 1024, 'unit file', { regularFile: true }).toString('utf8');
  } catch (err) {
    return wrong(check, (err as Error).message, `check ${unit}`);
  }
  const words = execStartWords(text);
  if (!words || words.length === 0) return wrong(check, `${unit} has no ExecStart`, regenerate);
  const program = words[0]!;
  if (program.includes('%')) return note(check, `${unit}: cannot resolve ExecStart ${program} (a systemd specifier)`);
  const resolved = resolveProgram(program);
  if (resolved === null) return wrong(check, `${unit}: ExecStart program ${program} does not exist or is not executable`, regenerate);
  // `node /path/to/bin/keyhold …` runs this install as well.
  const runs = /^node(js)?$/.test(basename(resolved)) && words[1] ? (resolveProgram(words[1]) ?? resolved) : resolved;
  if (runs !== install) return wrong(check, `${unit}: ExecStart runs ${runs}, not this install (${install})`, regenerate);
  return ok(check, `${unit}: ExecStart runs this install (${program})`);
}

function checkUnits(): CheckResult[] {
  let install: string;
  try {
    install = thisInstall();
  } catch {
    return [note('unit', `cannot find this install's bin/keyhold (${BIN}); units not checked`)];
  }
  const results: CheckResult[] = [];
  for (const { dir, system } of unitDirs()) {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      continue;
    }
    for (const name of names.sort()) {
      if (name.startsWith('keyhold') && name.endsWith('.service')) results.push(checkUnit(join(dir, name), system, install));
    }
  }
  if (results.length === 0) {
    const userDir = unitDirs()[0]!.dir;
    return [
      note('unit', 'no keyhold systemd unit installed (optional)', `mkdir -p ${userDir} && keyhold doctor --unit > ${join(userDir, 'keyhold.service')} && systemctl --user daemon-reload`),
    ];
  }
  return results;
}

// ---- optional pieces of the desktop and kernel ----

/**
 * Whether `org.freedesktop.secrets` runs (and its default collection is unlocked, as the
 * secret-service factor needs) or can be activated, asked over D-Bus by the factor's own client.
 */
async function checkSecretService(): Promise<CheckResult> {
  const check = 'secret service';
  if (!process.env.DBUS_SESSION_BUS_ADDRESS) return note(check, 'no session bus (DBUS_SESSION_BUS_ADDRESS is not set): no Secret Service here (optional)');
  let presence: SecretServicePresence;
  try {
    presence = await probeSecretService({ env: process.env });
  } catch (err) {
    if (err instanceof SecretServiceError) return note(check, `${err.message} (optional)`);
    throw err;
  }
  if (presence.provider === 'activatable') return ok(check, 'org.freedesktop.secrets can be started on the session bus');
  if (presence.provider === 'absent') return note(check, 'no org.freedesktop.secrets on the session bus (optional: a keyring such as gnome-keyring or KeePassXC provides it)');
  if (presence.defaultCollection === 'locked') {
    return note(
      check,
      'org.freedesktop.secrets answers on the session bus, but its default collection is locked: a secret-service factor cannot unlock keyhold until it is unlocked',
      'log in to the desktop session, or `gnome-keyring-daemon --unlock`, which reads its password on stdin',
    );
  }
  if (presence.defaultCollection === 'none') return note(check, 'org.freedesktop.secrets answers on the session bus, but it has no default collection (optional)');
  return ok(check, 'org.freedesktop.secrets answers on the session bus');
}

/** The kernel keyring `unlock --remember` needs, and this vault's remembered unlock if one is held. */
function checkKernelKeyring(keyring: Keyring | null): CheckResult {
  const check = 'kernel keyring';
  const description = rememberedKeyDescription(keyring?.vault_id ?? 'doctor-probe');
  // A search reads no payload and changes nothing; ENOKEY means keyrings work and hold no such key.
  const found = searchUserKey(description);
  if (!found.ok && (found.code === 'ENOSYS' || found.code === 'EPERM' || found.code === 'UNSUPPORTED_ARCH' || found.code === 'NO_LIBC')) {
    return note(check, `${describeKeyError(found.code)}: unlock --remember cannot work here (optional)`);
  }
  if (!keyring || !found.ok) return ok(check, 'available; no remembered unlock for this vault');
  const described = describeKey(found.value);
  const groupOrOther = described.ok ? described.value.permissions & 0xffff : 0;
  if (groupOrOther !== 0) {
    return wrong(check, `the remembered unlock ${description} (key ${found.value}) grants group or other access`, 'keyhold lock (removes it), then unlock --remember again');
  }
  return ok(check, `a remembered unlock is held (${description}, key ${found.value}): a restarted daemon comes back unlocked until it expires or keyhold lock`);
}

/** Where the running daemon keeps its master key and KEKs. */
function checkMemory(daemon: DaemonState): CheckResult[] {
  const memory = daemon.status?.memory;
  if (!memory) return [];
  if (memory === 'secret') return [ok('memory', 'keys in memfd_secret memory')];
  return [
    note(
      'memory',
      `keys in ${memory} memory, not memfd_secret (the daemon's log says why)`,
      memory === 'plain' ? 'raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the unit, ulimit -l)' : 'a kernel with memfd_secret (Linux 5.14+, secretmem enabled)',
    ),
  ];
}

/** The time of the audit log's last line; the log is in the clear except its MACs. */
function lastAuditTime(path: string): Date | null {
  let text: string;
  try {
    text = readCapped(path, 64 * 1024, 'audit log', { regularFile: true, tail: true }).toString('utf8');
  } catch {
    return null;
  }
  const lines = text.trimEnd().split('\n');
  const last = lines[lines.length - 1];
  if (!last) return null;
  try {
    const time = (JSON.parse(last) as { time?: unknown }).time;
    const date = typeof time === 'string' ? new Date(time) : null;
    return date && !Number.isNaN(date.getTime()) ? date : null;
  } catch {
    return null;
  }
}

function checkClock(paths: VaultPaths): CheckResult {
  const now = new Date();
  const fix = 'set the clock: timedatectl set-ntp true (or date -s)';
  if (now.getTime() < EARLIEST_SANE_TIME || now.getTime() >= LATEST_SANE_TIME) {
    return wrong('clock', `the clock says ${now.toISOString()}: token expiries and lock times would be wrong`, fix);
  }
  const last = lastAuditTime(paths.audit);
  if (last && last.getTime() - now.getTime() > CLOCK_TOLERANCE_MS) {
    return wrong(
      'clock',
      `the clock (${now.toISOString()}) is earlier than the vault's last audit line (${last.toISOString()}): token expiries and the audit order depend on it`,
      fix,
    );
  }
  return ok('clock', `${now.toISOString()}${last ? ` (last audit line ${last.toISOString()})` : ''}`);
}

// ---- the command ----

export async function runChecks(args: GlobalArgs & { config?: string | undefined }): Promise<CheckResult[]> {
  const paths = vaultPaths(args.vault);
  const runtime = runtimeDir();
  const { result: configResult, config } = checkConfig(args.config);
  const { results: vaultResults, keyring } = checkVaultFiles(paths);
  const runtimeResult = checkRuntimeDir(runtime);
  const { result: daemonResult, daemon } = await checkDaemon(runtime, runtimeResult.status !== 'wrong', keyring);
  try {
    const { result: sockResult, scope } = await checkAuthSock(runtime, daemon);
    const scopeResults = await checkScopes(daemon, config?.serve.scopes ?? [], scope);
    return [
      configResult,
      ...vaultResults,
      runtimeResult,
      daemonResult,
      ...scopeResults,
      sockResult,
      ...checkUnits(),
      await checkSecretService(),
      checkKernelKeyring(keyring),
      ...checkMemory(daemon),
      checkClock(paths),
    ];
  } finally {
    daemon.client?.close();
  }
}

function formatResult(result: CheckResult): string {
  const fix = result.fix ? `; ${result.status === 'wrong' ? 'fix' : 'try'}: ${result.fix}` : '';
  return oneLine(`${MARK[result.status]} ${result.check}: ${result.message}${fix}`);
}

/** The unit in contrib/systemd with ExecStart's program set to this node running this install's `keyhold`. */
export function unitForThisInstall(): string {
  const text = readCapped(UNIT_TEMPLATE, 256 * 1024, 'unit template', {
    regularFile: true,
    missing: () => new KeyholdError(`no unit template at ${UNIT_TEMPLATE}`, 'reinstall keyhold (the package ships contrib/systemd)'),
  }).toString('utf8');
  // systemd reads `%` as a specifier and splits words at spaces.
  const word = (path: string) => {
    const escaped = path.replace(/%/g, '%%');
    return /[\s"'\\]/.test(escaped) ? `"${escaped.replace(/["\\]/g, '\\$&')}"` : escaped;
  };
  // This node, by its path: bin/keyhold's `#!/usr/bin/env node` finds none where systemd's PATH
  // lacks it (node from nvm or a tarball under $HOME).
  const program = `${word(process.execPath)} ${word(thisInstall())}`;
  let replaced = 0;
  const unit = text.replace(/^(\s*ExecStart\s*=\s*[-@:+!|]*)(\S+)/gm, (_all, head: string) => {
    replaced++;
    return `${head}${program}`;
  });
  if (replaced === 0) throw new KeyholdError(`the unit template ${UNIT_TEMPLATE} has no ExecStart line`, 'reinstall keyhold');
  return unit;
}

export function doctorCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'doctor',
    'check the daemon, runtime dir, vault file modes, SSH_AUTH_SOCK, scopes, config, systemd unit, Secret Service, kernel keyring, key memory and clock; say what to fix (exit 1 when something is wrong)',
    (c) =>
      c
        .option('unit', { type: 'boolean', describe: 'print the systemd user unit with ExecStart set to this install, and exit' })
        .option('config', { type: 'string', describe: 'check this config file (default: $KEYHOLD_CONFIG or ~/.config/keyhold/config.toml)' })
        .example('keyhold doctor', '')
        .example('keyhold doctor --unit > ~/.config/systemd/user/keyhold.service', ''),
    async (args) => {
      if (args.unit) {
        const unit = unitForThisInstall();
        if (args.json) return printJson({ exec_start: thisInstall(), unit });
        process.stdout.write(unit);
        return;
      }
      const results = await runChecks(args);
      if (args.json) printJson(results);
      else process.stdout.write(results.map(formatResult).join('\n') + '\n');
      if (results.some((r) => r.status === 'wrong')) throw new QuietExit(EXIT.ERROR);
    },
  );
}
