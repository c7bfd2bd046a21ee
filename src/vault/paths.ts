// Where a vault and its companion files live.
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

/**
 * The most of an audit log `audit verify` and `audit tail` read at once: V8 cannot hold a longer
 * string (about 512 MiB), so a larger log could not be read whole before either; the cap makes that
 * an error naming the file rather than a crash, and refuses a log swapped for a device or FIFO.
 */
export const MAX_AUDIT_LOG_BYTES = 512 * 1024 * 1024 - 64 * 1024;

export interface VaultPaths {
  db: string;
  keys: string;
  audit: string;
}

export function defaultVaultPath(env: NodeJS.ProcessEnv = process.env): string {
  const dataHome = env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(dataHome, 'keyhold', 'vault.db');
}

/** `--vault`, else KEYHOLD_VAULT, else the XDG default. */
export function vaultPaths(explicit: string | undefined, env: NodeJS.ProcessEnv = process.env): VaultPaths {
  const db = resolve(explicit || env.KEYHOLD_VAULT || defaultVaultPath(env));
  return { db, keys: `${db}.keys`, audit: `${db}.audit.jsonl` };
}
