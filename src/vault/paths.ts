// Where a vault and its companion files live.
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

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
