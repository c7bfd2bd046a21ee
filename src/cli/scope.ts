import type { Argv } from 'yargs';
import { basename } from 'node:path';
import { daemonFor } from '../control/client.js';
import { remoteVaultApi } from '../control/remote-vault.js';
import { notFound } from '../errors.js';
import { runtimeDir, scopesDir } from '../runtime-dir.js';
import { scopeSocketPath } from '../signer/scope-sockets.js';
import { readKeyring } from '../vault/keyring.js';
import { vaultPaths } from '../vault/paths.js';
import { checkScopeName, type ScopeSummary } from '../vault/vault.js';
import { printJson, printLines, table, withVault, type GlobalArgs } from './common.js';
import { hasExplicitPassphrase } from './passphrase.js';

/**
 * What `keyhold socket` can learn about a scope without asking for anything: a running daemon
 * knows its open sockets, and when unlocked the vault's scopes; an explicit passphrase source (a
 * file, a systemd credential) opens the vault here. Null: it cannot know (no prompt, no agent: the
 * command's output goes into `$(…)`).
 */
async function lookUpScope(args: GlobalArgs, scope: string, path: string): Promise<{ summary: ScopeSummary | undefined; served: boolean } | null> {
  const keyring = readKeyring(vaultPaths(args.vault).keys);
  const daemon = await daemonFor(runtimeDir(), keyring.vault_id);
  let served = false;
  if (daemon) {
    try {
      served = daemon.status.sockets.some((socket) => socket === path || basename(socket) === basename(path));
      if (!daemon.status.locked) {
        const scopes = await remoteVaultApi(daemon.client, keyring.vault_id).scopes();
        return { summary: scopes.find((s) => s.name === scope), served };
      }
    } finally {
      daemon.client.close();
    }
  }
  if (hasExplicitPassphrase({ file: args['passphrase-file'] })) {
    const scopes = await withVault(args, (api) => api.scopes());
    return { summary: scopes.find((s) => s.name === scope), served };
  }
  return served ? { summary: undefined, served } : null;
}

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
      "print the path of a scope's agent socket (exit 5 when the scope does not exist, as far as a running daemon or a passphrase source can tell)",
      (c) => c.positional('scope', { type: 'string', demandOption: true }),
      async (args) => {
        const scope = checkScopeName(args.scope);
        const path = scopeSocketPath(scopesDir(runtimeDir()), scope);
        const found = await lookUpScope(args, scope, path);
        if (found === null) {
          process.stderr.write(`keyhold: warning: cannot check that scope ${scope} exists (no unlocked daemon and no passphrase file); printing its socket path anyway\n`);
        } else if (!found.summary && !found.served) {
          throw notFound(`no scope ${scope}`, `\`keyhold scope list\` shows the scopes; a scope exists once it has a key: \`keyhold key generate ${scope}\``);
        } else if (!found.served && found.summary?.keys === 0) {
          process.stderr.write(`keyhold: warning: scope ${scope} has no keys, so its socket is not served\n`);
        }
        if (args.json) printJson({ scope, path });
        else process.stdout.write(`${path}\n`);
      },
    );
}
