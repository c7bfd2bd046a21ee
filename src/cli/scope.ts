import type { Argv } from 'yargs';
import { runtimeDir, scopesDir } from '../runtime-dir.js';
import { scopeSocketPath } from '../signer/scope-sockets.js';
import { checkScopeName } from '../vault/vault.js';
import { printJson, printLines, table, withVault, type GlobalArgs } from './common.js';

export function scopeCommand(yargs: Argv<GlobalArgs>) {
  return yargs
    .command('scope', 'inspect scopes', (y) =>
      y
        .command(
          'list',
          'scopes with their key, secret and token counts and whether they have a policy or keys with ssh-add constraints',
          (c) => c,
          async (args) => {
            const scopes = await withVault(args, (api) => api.scopes());
            if (args.json) return printJson(scopes);
            printLines(
              table(
                ['SCOPE', 'KEYS', 'SECRETS', 'TOKENS', 'POLICY'],
                scopes.map((s) => [s.name, String(s.keys), String(s.secrets), String(s.tokens), s.policy ? (s.constrained ? 'yes + ssh-add' : 'yes') : s.constrained ? 'ssh-add' : 'no']),
              ),
            );
          },
        )
        .demandCommand(1, 'name a scope command: list'),
    )
    .command(
      'socket <scope>',
      "print the path of a scope's agent socket",
      (c) => c.positional('scope', { type: 'string', demandOption: true }),
      (args) => {
        const path = scopeSocketPath(scopesDir(runtimeDir()), checkScopeName(args.scope));
        if (args.json) printJson({ scope: args.scope, path });
        else process.stdout.write(`${path}\n`);
      },
    );
}
