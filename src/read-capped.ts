// Reading a file or stdin with a size cap: `/dev/zero` or a pipe that never ends must be an error,
// not a process that eats all memory.
import { closeSync, constants, fstatSync, openSync, readSync, type Stats } from 'node:fs';
import { EXIT, KeyholdError, notFound, type ExitCode } from './errors.js';

const pause = new Int32Array(new SharedArrayBuffer(4));

export interface CappedReadOptions {
  /** Exit code when the file is over the cap. */
  tooLarge?: ExitCode;
  /**
   * Only a regular file will do (a vault file, an audit log): whatever a symlink points at, a
   * device, FIFO, socket or directory is refused before a byte is read, and a FIFO is opened
   * without waiting for a writer.
   */
  regularFile?: boolean;
  /** Also refuse a file with any group or other permission bit, as ssh refuses an unprotected key. */
  privateFile?: boolean;
  /** The error for a missing file (default: "no <what> <path>"). */
  missing?: () => KeyholdError;
  /** A log: instead of refusing a larger regular file, read its last `max` bytes. */
  tail?: boolean;
}

/**
 * Reads `path` (or stdin for `-`) whole; more than `max` bytes is an error naming `what` (with
 * `tail`, the last `max` bytes are read instead). Never reads more than `max + 1` bytes, whatever
 * the file claims or turns out to be. The one way keyhold reads a file a user or a symlink names.
 */
export function readCapped(path: string, max: number, what: string, options: CappedReadOptions | ExitCode = {}): Buffer {
  const { tooLarge = EXIT.ERROR, regularFile = false, privateFile = false, missing, tail = false } = typeof options === 'number' ? { tooLarge: options } : options;
  let fd: number;
  if (path === '-') fd = 0;
  else {
    try {
      fd = openSync(path, constants.O_RDONLY | (regularFile ? constants.O_NONBLOCK : 0));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw missing ? missing() : notFound(`no ${what} ${path}`, 'check the path');
      throw new KeyholdError(`cannot read ${what} ${path}: ${code ?? 'error'}`, 'check the path and its permissions');
    }
  }
  const chunks: Buffer[] = [];
  let total = 0;
  /** A tail of a larger file starts `max` bytes before its end. */
  let position: number | null = null;
  try {
    if (fd !== 0) {
      const stat = fstatSync(fd);
      if (regularFile || privateFile) checkOpened(stat, path, tail ? Infinity : max, what, { regularFile, privateFile, tooLarge });
      if (tail && stat.isFile() && stat.size > max) position = stat.size - max;
    }
    // One byte past the cap tells "too large"; a tail just stops at the cap.
    const limit = tail ? max : max + 1;
    while (total < limit) {
      const chunk = Buffer.alloc(Math.min(64 * 1024, limit - total));
      let n: number;
      try {
        n = readSync(fd, chunk, 0, chunk.length, position === null ? null : position + total);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // stdin left non-blocking by another process: wait a little and read again.
        if (code === 'EAGAIN') {
          Atomics.wait(pause, 0, 0, 10);
          continue;
        }
        if (code === 'EISDIR') throw new KeyholdError(`${path} is a directory, not a ${what}`);
        throw new KeyholdError(`cannot read ${what} ${path}: ${code ?? 'error'}`);
      }
      if (n === 0) break;
      chunks.push(chunk.subarray(0, n));
      total += n;
      if (total > max && !tail) {
        for (const c of chunks) c.fill(0);
        throw overCap(path, max, what, tooLarge);
      }
    }
  } finally {
    if (fd !== 0) closeSync(fd);
  }
  const out = Buffer.concat(chunks);
  for (const c of chunks) c.fill(0);
  return out;
}

function overCap(path: string, max: number, what: string, exitCode: ExitCode): KeyholdError {
  return new KeyholdError(`${what} ${path === '-' ? '(stdin)' : path} is over ${max} bytes`, 'is it the right file?', exitCode);
}

function checkOpened(
  stat: Stats,
  path: string,
  max: number,
  what: string,
  { regularFile, privateFile, tooLarge }: { regularFile: boolean; privateFile: boolean; tooLarge: ExitCode },
): void {
  if (regularFile && !stat.isFile()) {
    throw new KeyholdError(`${path} is ${describeFileType(stat)}, not a regular file`, `restore the ${what}`);
  }
  if (privateFile) checkPrivateMode(stat, path);
  // The size the file claims: a regular file this large is refused without reading it.
  if (stat.isFile() && stat.size > max) throw overCap(path, max, what, tooLarge);
}

/** ssh's rule for a private key: no permission bit for group or other. */
export function checkPrivateMode(stat: Stats, path: string): void {
  if ((stat.mode & 0o077) !== 0) {
    const mode = (stat.mode & 0o7777).toString(8).padStart(4, '0');
    throw new KeyholdError(`${path} is accessible by others (mode ${mode})`, `run: chmod 600 ${path}`);
  }
}

export function describeFileType(stat: Stats): string {
  if (stat.isDirectory()) return 'a directory';
  if (stat.isFIFO()) return 'a FIFO';
  if (stat.isCharacterDevice()) return 'a character device';
  if (stat.isBlockDevice()) return 'a block device';
  if (stat.isSocket()) return 'a socket';
  return 'not a file';
}
