// One error type for everything a user can see: a message, what to do about it, and the exit code.

export const EXIT = {
  OK: 0,
  ERROR: 1,
  USAGE: 2,
  LOCKED: 3,
  DENIED: 4,
  NOT_FOUND: 5,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

export class KeyholdError extends Error {
  override name = 'KeyholdError';

  constructor(
    message: string,
    readonly hint?: string,
    readonly exitCode: ExitCode = EXIT.ERROR,
  ) {
    super(message);
  }
}

export const usageError = (message: string, hint?: string) => new KeyholdError(message, hint, EXIT.USAGE);
export const notFound = (message: string, hint?: string) => new KeyholdError(message, hint, EXIT.NOT_FOUND);

/** `keyhold: <what went wrong> (<what to do>)` */
export function formatError(err: KeyholdError): string {
  return oneLine(`keyhold: ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
}

/** Control characters (a newline in an echoed argument, say) shown escaped: errors stay one line. */
export function oneLine(text: string): string {
  return text.replace(/[\x00-\x1f\x7f]/g, (c) => (c === '\n' ? '\\n' : c === '\t' ? '\\t' : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`));
}

/**
 * Ends a command with an exit code and no message: `status` when locked (3), or `env` when its
 * command cannot run (126/127, as a shell reports them).
 */
export class QuietExit extends Error {
  override name = 'QuietExit';

  constructor(readonly exitCode: number) {
    super(`exit ${exitCode}`);
  }
}
