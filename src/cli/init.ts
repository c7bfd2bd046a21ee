import { randomBytes } from 'node:crypto';
import type { Argv } from 'yargs';
import { usageError } from '../errors.js';
import { vaultPaths } from '../vault/paths.js';
import { Vault } from '../vault/vault.js';
import { printJson, type GlobalArgs } from './common.js';
import { readPassphrase } from './passphrase.js';

export function initCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'init',
    'create a vault with its first unlock factor',
    (y) =>
      y
        .option('generate-passphrase', {
          type: 'boolean',
          describe: 'generate a random passphrase and print it once',
        })
        .example('keyhold init --passphrase-file ~/.config/keyhold/pass', '')
        .example('keyhold init --generate-passphrase > pass.txt', ''),
    async (args) => {
      if (args['generate-passphrase'] && args['passphrase-file']) {
        throw usageError('--generate-passphrase and --passphrase-file exclude each other', 'pass one of them');
      }
      const paths = vaultPaths(args.vault);
      const generated = args['generate-passphrase'] ? randomBytes(32).toString('base64url') : undefined;
      const passphrase = generated
        ? Buffer.from(generated)
        : await readPassphrase({ file: args['passphrase-file'], confirm: true, alternatives: ['--generate-passphrase'] });
      let vault: Vault;
      try {
        vault = await Vault.create(paths, passphrase);
      } finally {
        passphrase.fill(0);
      }
      const vaultId = vault.keyring.vault_id;
      vault.close();
      if (args.json) {
        printJson({ vault: paths.db, keys: paths.keys, vault_id: vaultId, ...(generated ? { passphrase: generated } : {}) });
      } else if (generated) {
        process.stdout.write(`${generated}\n`);
        process.stderr.write(`keyhold: created vault ${paths.db}; the passphrase above is shown only once, store it\n`);
      } else {
        process.stdout.write(`created vault ${paths.db}\n`);
      }
    },
  );
}
