// keyhold's command line: parse, dispatch, and turn every failure into `keyhold: … (…)` + exit code.
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { EXIT, formatError, KeyholdError, usageError } from '../errors.js';
import { globalOptions, type GlobalArgs } from './common.js';
import { initCommand } from './init.js';
import { keyCommand } from './key.js';
import { scopeCommand } from './scope.js';
import { serveCommand } from './serve.js';

export async function main(argv: string[]): Promise<number> {
  // Everything keyhold creates (vault, key file, sockets, runtime dir) is private to the user.
  process.umask(0o077);
  const parser: Argv<GlobalArgs> = globalOptions(yargs(argv).scriptName('keyhold'));
  for (const register of [initCommand, keyCommand, scopeCommand, serveCommand]) register(parser);
  try {
    await parser
      .strict()
      .demandCommand(1, 'name a command')
      .recommendCommands()
      .help()
      .alias('help', 'h')
      .version()
      .wrap(Math.min(100, process.stdout.columns || 100))
      .fail((message, err) => {
        throw err ?? usageError(message ?? 'invalid arguments', 'see `keyhold --help`');
      })
      .parseAsync();
    return EXIT.OK;
  } catch (err) {
    if (err instanceof KeyholdError) {
      process.stderr.write(formatError(err) + '\n');
      return err.exitCode;
    }
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`keyhold: unexpected error: ${message} (please report it)\n`);
    if (process.env.KEYHOLD_DEBUG) console.error(err);
    return EXIT.ERROR;
  }
}

main(hideBin(process.argv)).then((code) => {
  process.exitCode = code;
});
