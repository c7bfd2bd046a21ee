// keyhold's command line: parse, dispatch, and turn every failure into `keyhold: … (…)` + exit code.
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { EXIT, formatError, KeyholdError, oneLine, QuietExit, usageError } from '../errors.js';
import { globalOptions, STDIN_ARGUMENT, type GlobalArgs } from './common.js';
import { COMMANDS } from './commands.js';
import { usageFailure, type UsageLines } from './usage-errors.js';
import { packageVersion } from '../version.js';

/** Options whose value may be `-` (stdin), which yargs would otherwise take for an argument. */
const FILE_OPTIONS = new Set(['--passphrase-file', '--key-passphrase-file', '--token-file', '--value-file', '--new-passphrase-file']);

/** Commands with a FILE argument that may be `-` (stdin): yargs would turn a lone `-` into an empty string. */
const STDIN_ARGUMENT_COMMANDS = [['policy', 'set']];

function joinStdinValues(argv: string[]): string[] {
  // The command's words: arguments that are neither options nor an option's value.
  const words = argv.filter((a, i) => !a.startsWith('-') && !VALUE_OPTIONS.has(argv[i - 1] ?? ''));
  const stdinArgument = STDIN_ARGUMENT_COMMANDS.some((command) => command.every((word, i) => words[i] === word));
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--') {
      out.push(...argv.slice(i));
      break;
    }
    if (FILE_OPTIONS.has(argv[i]!) && argv[i + 1] === '-') out.push(`${argv[i++]}=-`);
    else if (stdinArgument && argv[i] === '-' && !VALUE_OPTIONS.has(argv[i - 1] ?? '')) out.push(STDIN_ARGUMENT);
    else out.push(argv[i]!);
  }
  return out;
}

/** Options that take a value; yargs would quietly use the default when the value is missing. */
const VALUE_OPTIONS = new Set([
  '--vault', '--passphrase-file', '--type', '--bits', '--comment', '--key-passphrase-file', '--scope', '-s', '--subject',
  '--ttl', '--idle', '--idle-lock', '--lock-after', '--listen', '--connect', '--token-file', '--value-file',
  '--new-passphrase-file', '--factor', '--key', '--ssh-key', '--policy', '--prefix', '--only', '--allow', '--format',
  '-n', '--lines', '--value', '--token', '--known-hosts', '--purpose', '--host', '--user', '--namespace', '--exe',
  '--remember', '--confirm-program', '--confirm-timeout', '--config', '--log-level',
]);

/** Short options that take a value in most commands but are flags in some (`unlock -s`, as ssh-agent -s). */
const FLAG_IN: Record<string, string[]> = { '-s': ['unlock'] };

function checkOptionValues(argv: string[]): void {
  const command = argv.find((a, i) => !a.startsWith('-') && !VALUE_OPTIONS.has(argv[i - 1] ?? ''));
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') return;
    if (!VALUE_OPTIONS.has(arg) || (command !== undefined && FLAG_IN[arg]?.includes(command))) continue;
    const next = argv[i + 1];
    if (next === undefined || (next.startsWith('-') && next !== '-' && !/^-\d/.test(next))) {
      throw usageError(`${arg} needs a value`, 'see `keyhold --help`');
    }
    i++;
  }
}

export async function main(argv: string[]): Promise<number> {
  // Everything keyhold creates (vault, key file, sockets, runtime dir) is private to the user.
  process.umask(0o077);
  try {
    checkOptionValues(argv);
  } catch (err) {
    process.stderr.write(formatError(err as KeyholdError) + '\n');
    return EXIT.USAGE;
  }
  const parser: Argv<GlobalArgs> = globalOptions(yargs(joinStdinValues(argv)).scriptName('keyhold'));
  for (const register of COMMANDS) register(parser);
  try {
    await parser
      .strict()
      .demandCommand(1, 'name a command')
      .recommendCommands()
      .help()
      .alias('help', 'h')
      .version(packageVersion())
      .wrap(Math.min(100, process.stdout.columns || 100))
      .fail((message, err, usage) => {
        throw err ?? usageFailure(message, usage as unknown as UsageLines);
      })
      .parseAsync();
    return EXIT.OK;
  } catch (err) {
    if (err instanceof QuietExit) return err.exitCode;
    if (err instanceof KeyholdError) {
      process.stderr.write(formatError(err) + '\n');
      return err.exitCode;
    }
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`${oneLine(`keyhold: unexpected error: ${message} (please report it)`)}\n`);
    if (process.env.KEYHOLD_DEBUG) console.error(err);
    return EXIT.ERROR;
  }
}

main(hideBin(process.argv)).then((code) => {
  process.exitCode = code;
});
