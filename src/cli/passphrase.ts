// Where a vault passphrase comes from, first that applies (see PRODUCT.md, "Passphrase sources").
import { isatty } from 'node:tty';
import { existsSync } from 'node:fs';
import { readCapped } from '../read-capped.js';
import { join } from 'node:path';
import { EXIT, KeyholdError, usageError } from '../errors.js';

export interface PassphraseRequest {
  /** `--passphrase-file`; `-` reads standard input. */
  file?: string | undefined;
  env?: NodeJS.ProcessEnv;
  /** Ask twice on a terminal (when choosing a new passphrase). */
  confirm?: boolean;
  /** Extra sources to name when none applies (e.g. init's --generate-passphrase). */
  alternatives?: string[];
  warn?: (message: string) => void;
  prompt?: string;
}

/** Strips one trailing newline, as editors and `echo` add one. */
function trimNewline(bytes: Buffer): Buffer {
  let end = bytes.length;
  if (end > 0 && bytes[end - 1] === 0x0a) end--;
  if (end > 0 && bytes[end - 1] === 0x0d) end--;
  return bytes.subarray(0, end);
}

function readSecretFile(path: string, what: string): Buffer {
  return readCapped(path, 64 * 1024, what);
}

/** As OpenSSH refuses a key passphrase of fewer than 5 bytes ("passphrase too short"), in characters here. */
export const MIN_NEW_PASSPHRASE_CHARS = 5;

/** A passphrase about to protect the vault (init, factor add, passphrase change): long enough. */
export function checkNewPassphrase(passphrase: Buffer): Buffer {
  const chars = [...passphrase.toString('utf8')].length;
  if (chars < MIN_NEW_PASSPHRASE_CHARS) {
    passphrase.fill(0);
    throw usageError(
      `passphrase too short (${chars} character${chars === 1 ? '' : 's'}; at least ${MIN_NEW_PASSPHRASE_CHARS})`,
      'use a longer one, or `--generate-passphrase` at init',
    );
  }
  return passphrase;
}

function nonEmpty(passphrase: Buffer): Buffer {
  if (passphrase.length === 0) throw usageError('empty passphrase refused', 'use a non-empty passphrase');
  return passphrase;
}

/** Reads a secret from a file (`-` = stdin), without its trailing newline. */
export function readPassphraseFile(path: string, what = 'passphrase file'): Buffer {
  return nonEmpty(Buffer.from(trimNewline(readSecretFile(path, what))));
}

/** The tiers that name a passphrase explicitly: a file (or `-`), or a systemd credential. */
export function explicitPassphrase(request: PassphraseRequest): Buffer | null {
  const env = request.env ?? process.env;
  const file = request.file ?? env.KEYHOLD_PASSPHRASE_FILE;
  if (file) return readPassphraseFile(file);
  if (env.CREDENTIALS_DIRECTORY) {
    const credential = join(env.CREDENTIALS_DIRECTORY, 'keyhold-passphrase');
    if (existsSync(credential)) return readPassphraseFile(credential, 'systemd credential');
  }
  return null;
}

export function hasExplicitPassphrase(request: PassphraseRequest): boolean {
  const env = request.env ?? process.env;
  if (request.file ?? env.KEYHOLD_PASSPHRASE_FILE) return true;
  return Boolean(env.CREDENTIALS_DIRECTORY && existsSync(join(env.CREDENTIALS_DIRECTORY, 'keyhold-passphrase')));
}

/** The last tiers: KEYHOLD_PASSPHRASE (with a warning), then a prompt when stdin is a terminal. */
export async function fallbackPassphrase(request: PassphraseRequest): Promise<Buffer | null> {
  const env = request.env ?? process.env;
  if (env.KEYHOLD_PASSPHRASE !== undefined) {
    (request.warn ?? ((m) => process.stderr.write(`keyhold: warning: ${m}\n`)))(
      'KEYHOLD_PASSPHRASE exposes the passphrase to every process that can read this environment; prefer --passphrase-file',
    );
    return nonEmpty(Buffer.from(env.KEYHOLD_PASSPHRASE, 'utf8'));
  }
  if (isatty(0)) {
    const first = nonEmpty(await promptHidden(request.prompt ?? 'Vault passphrase: '));
    if (!request.confirm) return first;
    const second = await promptHidden('Repeat passphrase: ');
    const same = first.equals(second);
    second.fill(0);
    if (!same) {
      first.fill(0);
      throw usageError('the passphrases differ', 'try again');
    }
    return first;
  }
  return null;
}

/** Exit 3, naming every source that could have applied. */
export function noPassphraseSource(alternatives: string[] = [], what = 'no passphrase source'): KeyholdError {
  const sources = [
    '--passphrase-file F (- for stdin)',
    'KEYHOLD_PASSPHRASE_FILE',
    '$CREDENTIALS_DIRECTORY/keyhold-passphrase',
    ...alternatives,
    'KEYHOLD_PASSPHRASE',
    'a terminal to prompt on',
  ];
  return new KeyholdError(what, `use one of: ${sources.join(', ')}`, EXIT.LOCKED);
}

/** Every passphrase tier in the contract's order, except the daemon (see openVaultApi). */
export async function readPassphrase(request: PassphraseRequest): Promise<Buffer> {
  const passphrase = explicitPassphrase(request) ?? (await fallbackPassphrase(request));
  if (passphrase) return passphrase;
  throw noPassphraseSource(request.alternatives);
}

/** Reads a line from the terminal with echo off; the bytes stay in a Buffer the caller can zero. */
export function promptHidden(prompt: string): Promise<Buffer> {
  const stdin = process.stdin;
  return new Promise((resolve, reject) => {
    const bytes: number[] = [];
    const finish = (err?: Error) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      const result = Buffer.from(bytes);
      bytes.fill(0);
      if (err) {
        result.fill(0);
        reject(err);
      } else resolve(result);
    };
    const onData = (chunk: Buffer) => {
      for (const byte of chunk) {
        if (byte === 0x0d || byte === 0x0a) return finish();
        if (byte === 0x03 || (byte === 0x04 && bytes.length === 0)) {
          return finish(new KeyholdError('cancelled', 'nothing was changed'));
        }
        if (byte === 0x7f || byte === 0x08) bytes.pop();
        else bytes.push(byte);
      }
      chunk.fill(0);
    };
    process.stderr.write(prompt);
    stdin.setRawMode(true);
    stdin.resume();
    stdin.on('data', onData);
  });
}
