// What every command shares: global options, opening the vault, printing results.
import type { Argv } from 'yargs';
import { vaultPaths } from '../vault/paths.js';
import { Vault } from '../vault/vault.js';
import { readPassphrase } from './passphrase.js';

export interface GlobalArgs {
  vault?: string | undefined;
  json?: boolean | undefined;
  'passphrase-file'?: string | undefined;
}

export function globalOptions<T>(yargs: Argv<T>) {
  return yargs
    .option('vault', { type: 'string', describe: 'vault file (default: $KEYHOLD_VAULT or ~/.local/share/keyhold/vault.db)', global: true })
    .option('json', { type: 'boolean', describe: 'print one JSON document on stdout', global: true })
    .option('passphrase-file', { type: 'string', describe: 'read the vault passphrase from this file (- for stdin)', global: true });
}

export async function openVault(args: GlobalArgs): Promise<Vault> {
  return Vault.open(vaultPaths(args.vault), () => readPassphrase({ file: args['passphrase-file'] }));
}

/** Runs `fn` with an open vault and closes it afterwards, whatever happens. */
export async function withVault<T>(args: GlobalArgs, fn: (vault: Vault) => T | Promise<T>): Promise<T> {
  const vault = await openVault(args);
  try {
    return await fn(vault);
  } finally {
    vault.close();
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
