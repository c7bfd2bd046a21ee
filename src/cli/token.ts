import type { Argv } from 'yargs';
import { parseDuration } from '../duration.js';
import { usageError } from '../errors.js';
import { TOKEN_SUBJECT_PATTERN, tokenUsable, type TokenRecord } from '../tokens/tokens.js';
import { checkScopeName } from '../vault/vault.js';
import { printJson, printLines, table, withVault, type GlobalArgs } from './common.js';

function tokenJson(record: TokenRecord) {
  return {
    id: record.id,
    scope: record.scope,
    subject: record.subject,
    created: record.created,
    expires: record.expires,
    revoked: record.revoked,
    prefix: record.prefix,
  };
}

function state(record: TokenRecord): string {
  if (record.revoked) return 'revoked';
  return tokenUsable(record) ? 'active' : 'expired';
}

export function tokenCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('token', 'phantom tokens for the container signer', (y) =>
    y
      .command(
        'issue <scope>',
        'issue a token for a scope and print it (shown only this once)',
        (c) =>
          c
            .positional('scope', { type: 'string', demandOption: true })
            .option('subject', { type: 'string', default: '', describe: 'who holds it, e.g. ci-42' })
            .option('ttl', { type: 'string', describe: 'lifetime: 90s, 30m, 8h, 7d (default: no expiry)' }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          if (!TOKEN_SUBJECT_PATTERN.test(args.subject)) {
            throw usageError('invalid subject', 'up to 128 printable characters');
          }
          const ttl = args.ttl === undefined ? null : parseDuration(args.ttl, '--ttl');
          const { token, record } = await withVault(args, (api) => api.issueToken(scope, args.subject, ttl));
          if (args.json) {
            printJson({ id: record.id, token, scope: record.scope, subject: record.subject, expires: record.expires });
          } else {
            process.stdout.write(`${token}\n`);
          }
        },
      )
      .command(
        'list',
        'list tokens (never the token itself)',
        (c) => c.option('scope', { type: 'string', describe: 'only tokens of this scope' }),
        async (args) => {
          const scope = args.scope === undefined ? undefined : checkScopeName(args.scope);
          const tokens = await withVault(args, (api) => api.listTokens(scope));
          if (args.json) return printJson(tokens.map(tokenJson));
          printLines(
            table(
              ['ID', 'SCOPE', 'SUBJECT', 'TOKEN', 'STATE', 'CREATED', 'EXPIRES'],
              tokens.map((t) => [t.id, t.scope, t.subject || '-', `${t.prefix}…`, state(t), t.created, t.expires ?? 'never']),
            ),
          );
        },
      )
      .command(
        'revoke [id]',
        'revoke one token by id, or every token of --scope (and --subject); open connections end too',
        (c) =>
          c
            .positional('id', { type: 'string' })
            .option('scope', { type: 'string' })
            .option('subject', { type: 'string' }),
        async (args) => {
          if ((args.id === undefined) === (args.scope === undefined)) {
            const what = args.id === undefined ? 'token revoke: missing argument <id> or option --scope' : 'name a token id or --scope, not both';
            throw usageError(what, 'usage: keyhold token revoke ID | --scope S [--subject N]');
          }
          if (args.subject !== undefined && args.scope === undefined) throw usageError('--subject goes with --scope');
          if (args.id !== undefined) {
            const record = await withVault(args, (api) => api.revokeToken(args.id!));
            if (args.json) printJson(tokenJson(record));
            else process.stderr.write(`keyhold: revoked ${record.id} (scope ${record.scope}${record.subject ? `, subject ${record.subject}` : ''}); its open connections end\n`);
            return;
          }
          const count = await withVault(args, (api) => api.revokeTokens(checkScopeName(args.scope!), args.subject));
          if (args.json) printJson({ scope: args.scope, subject: args.subject ?? null, revoked: count });
          else process.stderr.write(`keyhold: revoked ${count} token${count === 1 ? '' : 's'}\n`);
        },
      )
      .demandCommand(1, 'name a token command: issue, list, revoke'),
  );
}
