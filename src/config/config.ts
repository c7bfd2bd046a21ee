// keyhold's config file: `--config F`, else KEYHOLD_CONFIG, else
// ${XDG_CONFIG_HOME:-~/.config}/keyhold/config.toml. Flags win over it, then environment variables
// (KEYHOLD_LOG_LEVEL, the only key that has one), then the file, then the defaults.
// A key keyhold does not know, or a value it cannot use, exits 2 naming the file, line and key:
// a typo must not quietly leave the daemon without a setting its user counts on.
import { fstatSync, openSync, closeSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parse, TomlError } from 'smol-toml';
import { parseDuration } from '../duration.js';
import { EXIT, KeyholdError, usageError } from '../errors.js';
import { readCapped } from '../read-capped.js';
import { parseListenAddress, type ListenAddress } from '../signer/token-listener.js';
import { SCOPE_PATTERN } from '../vault/vault.js';
import { MAX_CONFIRM_TIMEOUT_MS } from '../policy/approvals.js';
import { tomlLines } from '../toml-lines.js';
import { isLogLevel, LOG_LEVELS } from '../log.js';

export interface ServeConfig {
  listen?: ListenAddress[];
  /** Scope sockets bound even while the vault is locked. */
  scopes?: string[];
  idleLockMs?: number;
  lockAfterMs?: number;
  confirmProgram?: string;
  confirmTimeoutMs?: number;
  logLevel?: string;
  /** PostgreSQL vaults only (planned): read and checked so that a config shared with one is valid; no effect yet. */
  offlineGraceMs?: number;
}

export interface KeyholdConfig {
  /** The file read, or null when there is none (the default path does not exist). */
  file: string | null;
  serve: ServeConfig;
}

const MAX_CONFIG_BYTES = 256 * 1024;
const MAX_LIST = 1_000;

export function defaultConfigPath(env: NodeJS.ProcessEnv = process.env): string {
  return join(env.XDG_CONFIG_HOME || join(homedir(), '.config'), 'keyhold', 'config.toml');
}

/** The config in effect: an explicit file must exist; the default one may be absent. */
export function loadConfig(explicit?: string, env: NodeJS.ProcessEnv = process.env): KeyholdConfig {
  const named = explicit ?? (env.KEYHOLD_CONFIG || undefined);
  const file = named ?? defaultConfigPath(env);
  if (named === undefined && !exists(file)) return { file: null, serve: {} };
  const text = readCapped(file, MAX_CONFIG_BYTES, 'config file', {
    regularFile: true,
    tooLarge: EXIT.USAGE,
    missing: () => usageError(`no config file ${file}`, 'check --config or KEYHOLD_CONFIG'),
  }).toString('utf8');
  checkNotWritableByOthers(file);
  return { file, serve: parseServeConfig(text, file) };
}

function exists(file: string): boolean {
  try {
    closeSync(openSync(file, 'r'));
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ENOENT';
  }
}

/** As ssh refuses a config others may write: it names programs the daemon runs. */
function checkNotWritableByOthers(file: string): void {
  const fd = openSync(file, 'r');
  try {
    const stat = fstatSync(fd);
    const uid = process.getuid?.();
    if ((stat.mode & 0o022) !== 0 || (uid !== undefined && stat.uid !== uid && stat.uid !== 0)) {
      throw new KeyholdError(`${file} may be written by others`, `chmod go-w ${file}, and own it yourself`, EXIT.USAGE);
    }
  } finally {
    closeSync(fd);
  }
}

type Reader<T> = (value: unknown) => T;

/** Each key of [serve]: how its value is read (a thrown message names what is wrong with it). */
const SERVE_KEYS: { [K in string]: { field: keyof ServeConfig; read: Reader<unknown> } } = {
  listen: { field: 'listen', read: (value) => stringList(value, 'unix:PATH or tcp:HOST:PORT addresses').map(listenAddress) },
  scopes: {
    field: 'scopes',
    read: (value) =>
      stringList(value, 'scope names').map((scope) => {
        if (!SCOPE_PATTERN.test(scope)) throw new Error(`invalid scope name ${JSON.stringify(scope.slice(0, 80))}`);
        return scope;
      }),
  },
  idle_lock: { field: 'idleLockMs', read: duration },
  lock_after: { field: 'lockAfterMs', read: duration },
  confirm_program: {
    field: 'confirmProgram',
    read: (value) => {
      if (typeof value !== 'string' || !value.startsWith('/')) throw new Error('must be an absolute path');
      return value;
    },
  },
  confirm_timeout: {
    field: 'confirmTimeoutMs',
    read: (value) => {
      const ms = duration(value);
      if (ms > MAX_CONFIRM_TIMEOUT_MS) throw new Error('is at most 1h (a client waiting longer has given up)');
      return ms;
    },
  },
  log_level: {
    field: 'logLevel',
    read: (value) => {
      if (typeof value !== 'string' || !isLogLevel(value)) throw new Error(`must be one of ${LOG_LEVELS.join(', ')}`);
      return value;
    },
  },
  offline_grace: { field: 'offlineGraceMs', read: duration },
};

function duration(value: unknown): number {
  if (typeof value !== 'string') throw new Error('must be a duration string: 90s, 30m, 8h, 7d');
  try {
    return parseDuration(value);
  } catch (err) {
    throw new Error((err as KeyholdError).message + ' (use 90s, 30m, 8h, 7d)');
  }
}

function stringList(value: unknown, what: string): string[] {
  if (!Array.isArray(value) || value.length > MAX_LIST || !value.every((item) => typeof item === 'string')) {
    throw new Error(`must be a list of ${what}`);
  }
  return value as string[];
}

function listenAddress(text: string): ListenAddress {
  const address = parseListenAddress(text);
  if (!address) throw new Error(`invalid address ${JSON.stringify(text.slice(0, 80))} (use unix:PATH or tcp:HOST:PORT)`);
  return address;
}

export function parseServeConfig(text: string, file: string): ServeConfig {
  let doc: Record<string, unknown>;
  try {
    doc = parse(text) as Record<string, unknown>;
  } catch (err) {
    if (err instanceof TomlError) {
      const reason = err.message.split('\n')[0]!.replace(/^Invalid TOML document: /, '');
      throw usageError(`${file}:${err.line}: ${reason}`, 'fix the TOML syntax');
    }
    throw usageError(`${file}: not a TOML document`);
  }
  const lines = tomlLines(text);
  const lineOf = (...path: string[]) => lines.line(...path) ?? lines.line(...path.slice(0, -1)) ?? 1;
  const fail = (line: number, key: string, reason: string) => usageError(`${file}:${line}: ${key}: ${reason}`, 'see "Configuration" in the README');
  const config: ServeConfig = {};
  for (const [table, value] of Object.entries(doc)) {
    if (table !== 'serve') throw fail(lineOf(table), table, 'unknown table or key (keyhold reads [serve])');
    if (typeof value !== 'object' || value === null || Array.isArray(value)) throw fail(lineOf(table), table, 'must be a table');
    for (const [key, raw] of Object.entries(value)) {
      const spec = Object.hasOwn(SERVE_KEYS, key) ? SERVE_KEYS[key] : undefined;
      if (!spec) throw fail(lineOf('serve', key), `serve.${key}`, 'unknown key');
      try {
        (config as Record<string, unknown>)[spec.field] = spec.read(raw);
      } catch (err) {
        throw fail(lineOf('serve', key), `serve.${key}`, (err as Error).message);
      }
    }
  }
  return config;
}
