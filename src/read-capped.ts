// Reading a file or stdin with a size cap: `/dev/zero` or a pipe that never ends must be an error,
// not a process that eats all memory.
import { closeSync, openSync, readSync } from 'node:fs';
import { EXIT, KeyholdError, notFound, type ExitCode } from './errors.js';

const pause = new Int32Array(new SharedArrayBuffer(4));

/** Reads `path` (or stdin for `-`) whole; more than `max` bytes is an error naming `what`. */
export function readCapped(path: string, max: number, what: string, tooLarge: ExitCode = EXIT.ERROR): Buffer {
  let fd: number;
  if (path === '-') fd = 0;
  else {
    try {
      fd = openSync(path, 'r');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw notFound(`no ${what} ${path}`, 'check the path');
      throw new KeyholdError(`cannot read ${what} ${path}: ${code ?? 'error'}`, 'check the path and its permissions');
    }
  }
  const chunks: Buffer[] = [];
  let total = 0;
  try {
    for (;;) {
      const chunk = Buffer.alloc(Math.min(64 * 1024, max + 1 - total));
      let n: number;
      try {
        n = readSync(fd, chunk, 0, chunk.length, null);
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
      if (total > max) {
        for (const c of chunks) c.fill(0);
        throw new KeyholdError(`${what} ${path === '-' ? '(stdin)' : path} is over ${max} bytes`, 'is it the right file?', tooLarge);
      }
    }
  } finally {
    if (fd !== 0) closeSync(fd);
  }
  const out = Buffer.concat(chunks);
  for (const c of chunks) c.fill(0);
  return out;
}
