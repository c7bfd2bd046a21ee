// `keyhold factor add|list|rm` and `keyhold passphrase change`: rewrap the master key, never
// re-encrypt the database. Secrets for new factors are taken here; the vault (in this process or in
// the daemon) only wraps.
import type { Argv } from 'yargs';
import { KeyholdError, notFound, usageError } from '../errors.js';
import { describeFactor, enrollPassphrase, readKeyring, type Factor, type PassphraseFactor } from '../vault/keyring.js';
import { vaultPaths } from '../vault/paths.js';
import { enrollSshAgent } from '../vault/ssh-agent-factor.js';
import { printJson, printLines, table, withVault, type GlobalArgs } from './common.js';
import { checkNewPassphrase, fallbackPassphrase, readPassphraseFile } from './passphrase.js';

function factorJson(factor: Factor, policy: string) {
  return {
    id: factor.id,
    type: factor.type,
    created: factor.created,
    policy,
    ...(factor.type === 'ssh-agent' ? { key_type: factor.key.type, fingerprint: factor.key.fingerprint } : {}),
  };
}

/** A new passphrase: `--new-passphrase-file`, else asked twice on the terminal. */
async function newPassphrase(args: GlobalArgs & { 'new-passphrase-file'?: string | undefined }): Promise<Buffer> {
  const file = args['new-passphrase-file'];
  if (file === '-' && args['passphrase-file'] === '-') {
    throw usageError('--passphrase-file and --new-passphrase-file cannot both read stdin', 'put one of them in a file');
  }
  if (file) return checkNewPassphrase(readPassphraseFile(file, 'new passphrase file'));
  const typed = await fallbackPassphrase({ env: {}, confirm: true, prompt: 'New passphrase: ' });
  if (!typed) throw usageError('no new passphrase', 'pass --new-passphrase-file F (- for stdin), or run on a terminal');
  return checkNewPassphrase(typed);
}

function report(args: GlobalArgs, factor: Factor, policy: string, verb: string): void {
  if (args.json) printJson(factorJson(factor, policy));
  else process.stderr.write(`keyhold: ${verb} factor ${describeFactor(factor)}\n`);
}

export function factorCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('factor', 'manage the unlock factors (passphrase, ssh-agent)', (y) =>
    y
      .command(
        'add <type>',
        'add an unlock factor: ssh-agent (a key in the agent at SSH_AUTH_SOCK) or passphrase',
        (c) =>
          c
            .positional('type', { choices: ['ssh-agent', 'passphrase'] as const, demandOption: true })
            .option('key', { type: 'string', describe: 'ssh-agent: the key, as SHA256:fingerprint or a .pub file' })
            .option('new-passphrase-file', { type: 'string', describe: 'passphrase: read it from this file (- for stdin)' })
            .example('keyhold factor add ssh-agent --key ~/.ssh/id_ed25519.pub', ''),
        async (args) => {
          const keyring = readKeyring(vaultPaths(args.vault).keys);
          if (args.type === 'ssh-agent' && args['new-passphrase-file'] !== undefined) throw usageError('--new-passphrase-file goes with passphrase');
          if (args.type === 'passphrase' && args.key !== undefined) throw usageError('--key goes with ssh-agent');
          const factor = await withVault(args, async (api) => {
            if (args.type === 'ssh-agent') {
              const enrolled = await enrollSshAgent(keyring.vault_id, process.env.SSH_AUTH_SOCK || undefined, args.key);
              const fp = enrolled.factor.type === 'ssh-agent' ? enrolled.factor.key.fingerprint : '';
              const existing = readKeyring(vaultPaths(args.vault).keys).factors.find((f) => f.type === 'ssh-agent' && f.key.fingerprint === fp);
              if (existing) {
                enrolled.kek.fill(0);
                throw new KeyholdError(`${fp} is already enrolled as ${existing.id}`, 'nothing was changed');
              }
              return api.addFactor(enrolled);
            }
            const passphrase = await newPassphrase(args);
            try {
              return api.addFactor(await enrollPassphrase(passphrase));
            } finally {
              passphrase.fill(0);
            }
          });
          report(args, factor, keyring.policy, 'added');
        },
      )
      .command(
        'list',
        'list the unlock factors (from vault.db.keys; needs no unlock)',
        (c) => c,
        (args) => {
          const keyring = readKeyring(vaultPaths(args.vault).keys);
          if (args.json) return printJson(keyring.factors.map((f) => factorJson(f, keyring.policy)));
          printLines([
            `policy: ${keyring.policy} (${keyring.policy === 'any' ? 'any one factor unlocks' : 'every factor is needed'})`,
            ...table(
              ['ID', 'TYPE', 'CREATED', 'KEY'],
              keyring.factors.map((f) => [f.id, f.type, f.created, f.type === 'ssh-agent' ? `${f.key.fingerprint} (${f.key.type})` : '-']),
            ),
          ]);
        },
      )
      .command(
        'rm <id>',
        'remove an unlock factor (never the last one)',
        (c) => c.positional('id', { type: 'string', demandOption: true }),
        async (args) => {
          const keyring = readKeyring(vaultPaths(args.vault).keys);
          const factor = keyring.factors.find((f) => f.id === args.id);
          if (!factor) throw notFound(`no factor ${args.id}`, 'see `keyhold factor list`');
          if (keyring.factors.length === 1) {
            throw new KeyholdError(`${args.id} is the last unlock factor; removing it would lock the vault for good`, 'add another factor first');
          }
          await withVault(args, (api) => api.removeFactor(args.id));
          report(args, factor, keyring.policy, 'removed');
        },
      )
      .demandCommand(1, 'name a factor command: add, list, rm'),
  );
}

export function passphraseCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('passphrase', "change the vault's passphrase", (y) =>
    y
      .command(
        'change',
        'set a new passphrase (rewraps the master key; the database is not re-encrypted)',
        (c) =>
          c
            .option('new-passphrase-file', { type: 'string', describe: 'read the new passphrase from this file (- for stdin)' })
            .option('factor', { type: 'string', describe: 'which passphrase factor, when the vault has several' }),
        async (args) => {
          const keyring = readKeyring(vaultPaths(args.vault).keys);
          const candidates = keyring.factors.filter((f): f is PassphraseFactor => f.type === 'passphrase');
          if (candidates.length === 0) {
            throw notFound('this vault has no passphrase factor', 'add one with `keyhold factor add passphrase`');
          }
          let target: PassphraseFactor;
          if (args.factor !== undefined) {
            const found = candidates.find((f) => f.id === args.factor);
            if (!found) throw notFound(`no passphrase factor ${args.factor}`, 'see `keyhold factor list`');
            target = found;
          } else if (candidates.length === 1) {
            target = candidates[0]!;
          } else {
            throw usageError('this vault has several passphrase factors', `name one with --factor: ${candidates.map((f) => f.id).join(', ')}`);
          }
          const factor = await withVault(args, async (api) => {
            const passphrase = await newPassphrase(args);
            try {
              return api.replaceFactor(await enrollPassphrase(passphrase, undefined, target.id));
            } finally {
              passphrase.fill(0);
            }
          });
          if (args.json) printJson(factorJson(factor, keyring.policy));
          else process.stderr.write(`keyhold: passphrase changed (${factor.id})\n`);
        },
      )
      .demandCommand(1, 'name a passphrase command: change'),
  );
}
