import { KeyholdError } from './errors.js';

const PLAINLY_SAFE = /^[A-Za-z0-9_\/.,:@%+=-]+$/;

/** Quotes a word for POSIX sh: bare when it is plainly safe, else in single quotes. */
export function shellQuote(word: string): string {
  if (PLAINLY_SAFE.test(word)) return word;
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * Quotes a word for csh and tcsh, which keep history substitution (`!`) active inside single
 * quotes. A newline cannot come through csh's eval of a command's output at all: refused.
 */
export function cshQuote(word: string): string {
  if (word.includes('\n')) throw new KeyholdError('the path holds a newline, which csh cannot take from eval', 'use -s and a Bourne shell, or another KEYHOLD_RUNTIME_DIR');
  if (PLAINLY_SAFE.test(word)) return word;
  return `'${word.replace(/'/g, `'\\''`).replace(/!/g, `'\\!'`)}'`;
}

/** The line that sets an environment variable, for `eval` in a Bourne shell or in csh. */
export function setenvLine(name: string, value: string, csh: boolean): string {
  return csh ? `setenv ${name} ${cshQuote(value)};` : `export ${name}=${shellQuote(value)}`;
}
