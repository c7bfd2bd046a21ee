import { closeSync, fsyncSync, openSync, readdirSync, readSync, renameSync, unlinkSync, writeSync, constants } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';

/**
 * A temp file is named for the process that writes it (`.<name>.<pid>.<random>.tmp`), so that
 * the next open can tell the leftover of a writer that died (kill -9, power loss) from the live
 * temp file of a writer still running in another process.
 */
function tempName(path: string): string {
  return join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
}

const escapeRegExp = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** Whether a process with this pid exists (EPERM: it does, owned by someone else). */
function pidExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  return !isZombie(pid);
}

/** A zombie has exited (it will rename nothing), though kill(pid, 0) still finds it. */
function isZombie(pid: number): boolean {
  let fd: number | null = null;
  try {
    fd = openSync(`/proc/${pid}/stat`, constants.O_RDONLY);
    const buffer = Buffer.alloc(512);
    const stat = buffer.toString('latin1', 0, readSync(fd, buffer, 0, buffer.length, 0));
    return stat[stat.lastIndexOf(')') + 2] === 'Z';
  } catch {
    return false;
  } finally {
    if (fd !== null) closeSync(fd);
  }
}

/**
 * Removes the temp files `writeFileAtomic(path)` left behind in writers that are gone. A temp
 * whose writer still runs is left alone (its rename is still to come). A reused pid only keeps a
 * stale temp a little longer; it never removes a live one. Returns the names removed.
 *
 * `allWritersExcluded`: the caller holds the lock every writer of `path` takes, so no other
 * process is between temp and rename: every temp is stale, whatever its pid (another pid
 * namespace) and including those of keyhold versions that did not name the writer.
 */
export function removeStaleTemps(path: string, { allWritersExcluded = false } = {}): string[] {
  const pattern = new RegExp(`^\\.${escapeRegExp(basename(path))}\\.(?:(\\d+)\\.)?[0-9a-f]{12}\\.tmp$`);
  let names: string[];
  try {
    names = readdirSync(dirname(path));
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const name of names) {
    const match = pattern.exec(name);
    if (!match) continue;
    if (!allWritersExcluded) {
      const pid = Number(match[1] ?? NaN);
      if (!Number.isSafeInteger(pid) || pid <= 0 || pid === process.pid || pidExists(pid)) continue;
    }
    try {
      unlinkSync(join(dirname(path), name));
      removed.push(name);
    } catch {
      /* removed by another process meanwhile */
    }
  }
  return removed;
}

/**
 * Replaces `path` with `data` so that a reader (or a crash) sees the old file or the new one,
 * never a mix: write a private temp file beside it, fsync, rename over, fsync the directory.
 */
export function writeFileAtomic(path: string, data: Buffer | string, mode = 0o600): void {
  const dir = dirname(path);
  const temp = tempName(path);
  const fd = openSync(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, mode);
  try {
    const bytes = typeof data === 'string' ? Buffer.from(data) : data;
    let written = 0;
    while (written < bytes.length) written += writeSync(fd, bytes, written);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    unlinkSync(temp);
    throw err;
  }
  closeSync(fd);
  try {
    renameSync(temp, path);
  } catch (err) {
    unlinkSync(temp);
    throw err;
  }
  fsyncDirectory(dir);
}

export function fsyncDirectory(dir: string): void {
  const fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
