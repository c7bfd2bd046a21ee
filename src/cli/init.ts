import { randomBytes } from 'node:crypto';
import type { Argv } from 'yargs';
import { usageError } from '../errors.js';
import { newVaultId, POLICIES, type EnrolledFactor, type Policy } from '../vault/keyring.js';
import { enrollPassphrase } from '../unlock/passphrase.js';
import { vaultPaths } from '../vault/paths.js';
import { enrollSshAgent } from '../unlock/ssh-agent.js';
import { Vault } from '../vault/vault.js';
import { printJson, type GlobalArgs } from './common.js';
import { checkNewPassphrase, explicitPassphrase, readPassphrase } from './passphrase.js';

export function initCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'init',
    'create a vault with its first unlock factor(s)',
    (y) =>
      y
        .option('generate-passphrase', {
          type: 'boolean',
          describe: 'generate a random passphrase and print it once',
        })
        .option('ssh-key', {
          type: 'string',
          describe: 'enroll this key of the agent at SSH_AUTH_SOCK as a factor: SHA256:fingerprint or a .pub file',
        })
        .option('policy', {
          choices: POLICIES,
          default: 'any' as Policy,
          describe: 'any: each factor unlocks; all: every factor is needed',
        })
        .example('keyhold init --passphrase-file ~/.config/keyhold/pass', '')
        .example('keyhold init --generate-passphrase > pass.txt', '')
        .example('keyhold init --ssh-key ~/.ssh/id_ed25519.pub   # a server unlocked over ssh -A', ''),
    async (args) => {
      if (args['generate-passphrase'] && args['passphrase-file']) {
        throw usageError('--generate-passphrase and --passphrase-file exclude each other', 'pass one of them');
      }
      const policy = args.policy;
      if (policy === 'all' && args['ssh-key'] === undefined) {
        throw usageError('--policy all needs a second factor', 'add --ssh-key FP|PUBFILE (with one factor, all and any are the same)');
      }
      const paths = vaultPaths(args.vault);
      Vault.checkAbsent(paths);
      const vaultId = newVaultId();
      const enrolled: EnrolledFactor[] = [];
      let generated: string | undefined;
      try {
        // With --ssh-key alone (policy any), a passphrase factor is added only if one is named.
        const request = { file: args['passphrase-file'], confirm: true, alternatives: ['--generate-passphrase'] };
        let passphrase: Buffer | null = null;
        if (args['generate-passphrase']) {
          generated = randomBytes(32).toString('base64url');
          passphrase = Buffer.from(generated);
        } else if (args['ssh-key'] === undefined || policy === 'all') {
          passphrase = await readPassphrase(request);
        } else {
          passphrase = explicitPassphrase(request) ?? (process.env.KEYHOLD_PASSPHRASE !== undefined ? await readPassphrase(request) : null);
        }
        if (passphrase) {
          if (!generated) checkNewPassphrase(passphrase);
          try {
            enrolled.push(await enrollPassphrase(passphrase));
          } finally {
            passphrase.fill(0);
          }
        }
        if (args['ssh-key'] !== undefined) {
          enrolled.push(await enrollSshAgent(vaultId, process.env.SSH_AUTH_SOCK || undefined, args['ssh-key']));
        }
        const vault = Vault.createWithFactors(paths, policy, enrolled, vaultId);
        vault.close();
      } finally {
        for (const e of enrolled) e.kek.fill(0);
      }
      const factors = enrolled.map((e) => ({ id: e.factor.id, type: e.factor.type }));
      if (args.json) {
        printJson({ vault: paths.db, keys: paths.keys, vault_id: vaultId, policy, factors, ...(generated ? { passphrase: generated } : {}) });
      } else if (generated) {
        process.stdout.write(`${generated}\n`);
        process.stderr.write(`keyhold: created vault ${paths.db}; the passphrase above is shown only once, store it\n`);
      } else {
        process.stdout.write(`created vault ${paths.db} (${factors.map((f) => `${f.id} ${f.type}`).join(', ')}; policy ${policy})\n`);
      }
    },
  );
}
