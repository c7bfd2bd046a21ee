// `keyhold secret set|get|list|rm`: values are bytes, taken from stdin or a file, never from argv.
import { isatty } from 'node:tty';
import { readCapped } from '../read-capped.js';
import type { Argv } from 'yargs';
import { EXIT, usageError } from '../errors.js';
import { checkScopeName, checkSecretName, MAX_SECRET_BYTES } from '../vault/vault.js';
import { printJson, printLines, table, withVault, type GlobalArgs } from './common.js';
import { promptHidden } from './passphrase.js';

const ARGV_REFUSED = usageError(
  'secret values are never taken from the command line: argv is visible to other processes (ps) and stays in shell history',
  'pipe the value on stdin, or use --value-file F',
);

function readValue(file: string | undefined): Promise<Buffer> | Buffer {
  // On a terminal, ask without echo (one line); otherwise take stdin's exact bytes. isatty(0), not
  // process.stdin.isTTY: touching process.stdin makes fd 0 non-blocking, and reading it then fails.
  if (file === undefined && isatty(0)) return promptHidden('Secret value: ');
  return readCapped(file ?? '-', MAX_SECRET_BYTES, 'secret value (the limit is 1 MiB)', EXIT.USAGE);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });
export function asUtf8(bytes: Buffer): string | null {
  try {
    return utf8.decode(bytes);
  } catch {
    return null;
  }
}

export function secretCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('secret', 'the secret store: values per scope, for `keyhold env`', (y) =>
    y
      .command(
        'set <scope> <name>',
        'store a secret; the value is read from stdin (exact bytes) or --value-file',
        (c) =>
          c
            .positional('scope', { type: 'string', demandOption: true })
            .positional('name', { type: 'string', demandOption: true })
            .option('value-file', { type: 'string', describe: 'read the value from this file (- for stdin)' })
            .option('value', { type: 'string', hidden: true })
            .example('printf %s "$TOKEN" | keyhold secret set ci API_TOKEN', '')
            .example('keyhold secret set ci TLS_KEY --value-file key.pem', ''),
        async (args) => {
          if (args.value !== undefined) throw ARGV_REFUSED;
          const scope = checkScopeName(args.scope);
          const name = checkSecretName(args.name);
          const value = await readValue(args['value-file']);
          try {
            if (value.length > MAX_SECRET_BYTES) throw usageError(`the value is ${value.length} bytes; the limit is 1 MiB`);
            const { created } = await withVault(args, (api) => api.setSecret(scope, name, value));
            if (args.json) printJson({ scope, name, created });
          } finally {
            value.fill(0);
          }
        },
      )
      .command(
        'get <scope> <name>',
        "write a secret's exact bytes to stdout",
        (c) => c.positional('scope', { type: 'string', demandOption: true }).positional('name', { type: 'string', demandOption: true }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          const name = checkSecretName(args.name);
          const value = await withVault(args, (api) => api.getSecret(scope, name));
          if (args.json) printJson({ scope, name, value: asUtf8(value), base64: value.toString('base64') });
          else process.stdout.write(value);
        },
      )
      .command(
        'list <scope>',
        "a scope's secret names and times (never the values)",
        (c) => c.positional('scope', { type: 'string', demandOption: true }),
        async (args) => {
          const secrets = await withVault(args, (api) => api.listSecrets(checkScopeName(args.scope)));
          if (args.json) return printJson(secrets);
          printLines(table(['NAME', 'CREATED', 'UPDATED'], secrets.map((s) => [s.name, s.created, s.updated])));
        },
      )
      .command(
        'rm <scope> <name>',
        'delete a secret',
        (c) => c.positional('scope', { type: 'string', demandOption: true }).positional('name', { type: 'string', demandOption: true }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          const name = checkSecretName(args.name);
          await withVault(args, (api) => api.removeSecret(scope, name));
          if (args.json) printJson({ scope, name, removed: true });
          else process.stderr.write(`keyhold: removed secret ${name} of ${scope}\n`);
        },
      )
      .demandCommand(1, 'name a secret command: set, get, list, rm'),
  );
}
