// What every command shares: global options, opening the vault, printing results.
import type { Argv } from 'yargs';
import { daemonFor } from '../control/client.js';
import { remoteVaultApi } from '../control/remote-vault.js';
import { runtimeDir } from '../runtime-dir.js';
import { localVaultApi, thisProcess, type VaultApi } from '../vault/api.js';
import { readKeyring } from '../vault/keyring.js';
import { vaultPaths } from '../vault/paths.js';
import { Vault } from '../vault/vault.js';
import { hasExplicitPassphrase } from './passphrase.js';
import { collectKeks, type UnlockRequest } from '../unlock/prove.js';

export interface GlobalArgs {
  vault?: string | undefined;
  json?: boolean | undefined;
  'passphrase-file'?: string | undefined;
}

/** What a FILE argument given as `-` (stdin) reaches its command as (see main.ts). */
export const STDIN_ARGUMENT = '\u0000stdin';

export function globalOptions<T>(yargs: Argv<T>) {
  return yargs
    .option('vault', { type: 'string', describe: 'vault file (default: $KEYHOLD_VAULT or ~/.local/share/keyhold/vault.db)', global: true })
    .option('json', { type: 'boolean', describe: 'print one JSON document on stdout', global: true })
    .option('passphrase-file', { type: 'string', describe: 'read the vault passphrase from this file (- for stdin)', global: true });
}

/** Opens the vault in this process with what the CLI can prove (passphrase sources, SSH agent). */
export async function openVault(args: GlobalArgs, request: Partial<UnlockRequest> = {}): Promise<Vault> {
  return Vault.openWithKeks(vaultPaths(args.vault), (keyring) =>
    collectKeks(keyring, { file: args['passphrase-file'], alternatives: [DAEMON_SOURCE], ...request }),
  );
}

const DAEMON_SOURCE = 'a running, unlocked daemon (`keyhold unlock`)';

/**
 * The vault's operations, by the contract's order of sources: an explicit passphrase (file,
 * credential) opens the vault here; else a running, unlocked daemon for this vault does the work
 * (no passphrase at all); else the SSH agent, KEYHOLD_PASSPHRASE or a prompt open it here.
 */
export async function openVaultApi(args: GlobalArgs): Promise<{ api: VaultApi; close(): void }> {
  const paths = vaultPaths(args.vault);
  const keyring = readKeyring(paths.keys);
  const explicit = hasExplicitPassphrase({ file: args['passphrase-file'] });
  if (!(explicit && keyring.policy === 'any')) {
    const daemon = await daemonFor(runtimeDir(), keyring.vault_id);
    if (daemon && !daemon.status.locked) {
      return { api: remoteVaultApi(daemon.client, keyring.vault_id), close: () => daemon.client.close() };
    }
    daemon?.client.close();
  }
  const vault = await openVault(args);
  return { api: localVaultApi(vault, thisProcess()), close: () => vault.close() };
}

/** Runs `fn` with the vault's operations and closes what it opened, whatever happens. */
export async function withVault<T>(args: GlobalArgs, fn: (api: VaultApi) => T | Promise<T>): Promise<T> {
  const { api, close } = await openVaultApi(args);
  try {
    return await fn(api);
  } finally {
    close();
  }
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

export function printLines(lines: string[]): void {
  if (lines.length > 0) process.stdout.write(lines.join('\n') + '\n');
}

/** Left-aligned columns, as `ssh-add -l`-style listings. */
export function table(header: string[], rows: string[][]): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)];
}
