// `keyhold factor add|list|rm` and `keyhold passphrase change`: rewrap the master key, never
// re-encrypt the database. Secrets for new factors are taken here; the vault (in this process or in
// the daemon) only wraps.
import type { Argv, Options } from 'yargs';
import { KeyholdError, notFound, usageError } from '../errors.js';
import { readKeyring, type EnrolledFactor } from '../vault/keyring.js';
import { vaultPaths } from '../vault/paths.js';
import type { FactorKind } from '../unlock/factor-kind.js';
import { describeFactor, FACTOR_KINDS, FACTOR_TYPES, kindOf, type Factor } from '../unlock/kinds.js';
import { enrollPassphrase, passphraseKind, readNewPassphrase, type PassphraseFactor } from '../unlock/passphrase.js';
import { printJson, printLines, table, withVault, type GlobalArgs } from './common.js';

function factorJson(factor: Factor, policy: string) {
  return { id: factor.id, type: factor.type, created: factor.created, policy, ...kindOf(factor.type).details(factor).json };
}

function report(args: GlobalArgs, factor: Factor, policy: string, verb: string): void {
  if (args.json) printJson(factorJson(factor, policy));
  else process.stderr.write(`keyhold: ${verb} factor ${describeFactor(factor)}\n`);
}

const kinds = FACTOR_KINDS as unknown as readonly FactorKind[];

/** Whether the key file holds the factor (true when it cannot tell: keeping an item is the safe side). */
function factorInKeyFile(vault: string | undefined, factorId: string): boolean {
  try {
    return readKeyring(vaultPaths(vault).keys).factors.some((f) => f.id === factorId);
  } catch {
    return true;
  }
}

/** Every kind's `factor add` options, each named as belonging to its kind. */
const addOptions: [string, Options, FactorKind][] = kinds.flatMap((kind) => Object.entries(kind.addOptions).map(([name, option]) => [name, option, kind] as [string, Options, FactorKind]));

export function factorCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('factor', `manage the unlock factors (${FACTOR_TYPES.join(', ')})`, (y) =>
    y
      .command(
        'add <type>',
        `add an unlock factor: ${kinds.map((kind) => `${kind.type}, ${kind.summary}`).join('; ')}`,
        (c) => {
          let command = c.positional('type', { choices: FACTOR_TYPES, demandOption: true });
          for (const [name, option] of addOptions) command = command.option(name, option);
          return command.example('keyhold factor add ssh-agent --key ~/.ssh/id_ed25519.pub', '');
        },
        async (args) => {
          const kind = kindOf(args.type);
          const values = args as unknown as Record<string, unknown>;
          for (const [name, , owner] of addOptions) {
            if (owner !== kind && values[name] !== undefined) throw usageError(`--${name} goes with ${owner.type}`);
          }
          const keyring = readKeyring(vaultPaths(args.vault).keys);
          const options = Object.fromEntries(Object.keys(kind.addOptions).map((name) => [name, values[name]]));
          const factor = await withVault(args, async (api) => {
            const enrolled = (await kind.enroll({ vaultId: keyring.vault_id, keyring, env: process.env, options, passphraseFile: args['passphrase-file'] })) as EnrolledFactor;
            try {
              return await api.addFactor(enrolled);
            } catch (err) {
              // What the kind kept outside the key file (a keyring item) unlocks nothing unless the
              // factor made it into the file after all (an error after the commit: a failing audit,
              // a daemon killed before its reply); then it is the factor's only key.
              if (!factorInKeyFile(args.vault, enrolled.factor.id)) {
                await kind.forget?.(enrolled.factor as Factor, { vaultId: keyring.vault_id, env: process.env });
              }
              throw err;
            } finally {
              enrolled.kek.fill(0);
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
              keyring.factors.map((f) => [f.id, f.type, f.created, kindOf(f.type).details(f).column]),
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
          await kindOf(factor.type).forget?.(factor, { vaultId: keyring.vault_id, env: process.env });
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
          const candidates = keyring.factors.filter((f): f is PassphraseFactor => f.type === passphraseKind.type);
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
            const passphrase = await readNewPassphrase(args['new-passphrase-file'], args['passphrase-file']);
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
