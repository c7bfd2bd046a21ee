// yargs' own usage messages, said the keyhold way: which argument is missing, and the usage line.
import { KeyholdError, usageError } from '../errors.js';

/** The part of yargs' usage instance that `.fail()` hands its callback. */
export interface UsageLines {
  getUsage(): [string, string][];
}

/**
 * yargs reports a missing positional as "Not enough non-option arguments: got N, need at least M"
 * and a missing required option as "Missing required argument: name"; this names what is missing
 * and gives the command's usage line (`keyhold key pub <scope>`).
 */
export function missingArgumentError(message: string, usage: UsageLines | undefined): KeyholdError | null {
  const line = usage?.getUsage()[0]?.[0]?.replace(/^\$0\b/, 'keyhold');
  if (!line) return null;
  const command = line.split(' ').filter((word) => !/^[<[]/.test(word)).join(' ');
  const required = [...line.matchAll(/<([^>]+)>/g)].map((m) => m[1]!);
  let missing: string | undefined;
  const counts = /^Not enough non-option arguments: got (\d+), need at least (\d+)/.exec(message);
  if (counts) missing = required[Number(counts[1])] && `argument <${required[Number(counts[1])]}>`;
  const named = /^Missing required arguments?: (.+)$/.exec(message);
  if (named) {
    const names = named[1]!.split(', ');
    const what = names.map((n) => (required.includes(n) ? `<${n}>` : `--${n}`));
    missing = `${names.every((n) => required.includes(n)) ? 'argument' : 'option'}${what.length > 1 ? 's' : ''} ${what.join(', ')}`;
  }
  if (!missing) return null;
  return usageError(`${command.replace(/^keyhold /, '')}: missing ${missing}`, `usage: ${line}; see \`${command} --help\``);
}

/** What yargs' `.fail()` reports, as one keyhold usage error (exit 2). */
export function usageFailure(message: string | undefined, usage: UsageLines | undefined): KeyholdError {
  const oneLine = (message ?? 'invalid arguments').split('\n').map((l) => l.trim()).filter(Boolean).join(' ');
  return missingArgumentError(oneLine, usage) ?? usageError(oneLine, 'see `keyhold --help`');
}
