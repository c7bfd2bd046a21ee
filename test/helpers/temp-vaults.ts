// The throwaway vaults of the vault unit tests: one temp root per test file, a fresh vault path
// for each test, and every vault a test opened closed after it, whatever the test did to them.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeEach } from 'vitest';
import { vaultPaths, type VaultPaths } from '../../src/vault/paths.js';
import type { Vault } from '../../src/vault/vault.js';

export interface TempVaults {
  /** The temp root, removed after the file's tests. */
  readonly root: string;
  /** This test's vault path, in a directory of its own. */
  readonly paths: VaultPaths;
  /** Another fresh vault path, for a test that needs more than one vault. */
  newPaths(): VaultPaths;
  /** Closes these vaults after this test. */
  closeAfter(...vaults: Vault[]): void;
}

/** Call once at the top of a test file; the cheapest scrypt cost within bounds is set for it. */
export function tempVaults(prefix: string): TempVaults {
  process.env.KEYHOLD_KDF_LOG2N = '14';
  const root = mkdtempSync(join(tmpdir(), prefix));
  const newPaths = () => vaultPaths(join(mkdtempSync(join(root, 'v-')), 'vault.db'));
  let current: VaultPaths | undefined;
  let open: Vault[] = [];
  beforeEach(() => {
    current = newPaths();
  });
  afterEach(() => {
    for (const vault of open) if (vault.isOpen) vault.close();
    open = [];
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));
  return {
    root,
    get paths() {
      if (!current) throw new Error('tempVaults: paths is set for each test, not at the top of the file');
      return current;
    },
    newPaths,
    closeAfter: (...vaults) => void open.push(...vaults),
  };
}
