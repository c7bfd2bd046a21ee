// Reads /proc/PID/smaps: which mappings a process has, and their flags (VmFlags `lo` = mlocked,
// `dd` = left out of core dumps).
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';

export interface Mapping {
  start: bigint;
  end: bigint;
  header: string;
  fields: Map<string, string>;
  flags: string[];
}

export function readSmaps(pid: number | 'self'): Mapping[] {
  const mappings: Mapping[] = [];
  let current: Mapping | null = null;
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const header = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (header) {
      current = { start: BigInt(`0x${header[1]}`), end: BigInt(`0x${header[2]}`), header: line, fields: new Map(), flags: [] };
      mappings.push(current);
      continue;
    }
    const field = /^(\w+):\s*(.*)$/.exec(line);
    if (!field || !current) continue;
    current.fields.set(field[1]!, field[2]!.trim());
    if (field[1] === 'VmFlags') current.flags = field[2]!.trim().split(/\s+/);
  }
  return mappings;
}

export const isSecretmem = (m: Mapping) => /\/secretmem \(deleted\)$/.test(m.header);

/** Reads `length` bytes at `address` through /proc/PID/mem (as a debugger or gcore would): the bytes, or the error code. */
export function readProcessMemory(pid: number | 'self', address: bigint, length = 32): Buffer | string {
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  try {
    const bytes = Buffer.alloc(length);
    readSync(fd, bytes, 0, length, Number(address));
    return bytes;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  } finally {
    closeSync(fd);
  }
}

/**
 * How often each needle occurs in the process's memory as a core dumper sees it: every readable
 * mapping that has pages (what gdb's gcore writes), read through /proc/PID/mem. Mappings the
 * kernel refuses to read (secretmem) are counted in `unreadable`.
 */
export function countInReadableMemory(pid: number, needles: Record<string, Buffer>): { counts: Record<string, number>; unreadable: number } {
  const counts = Object.fromEntries(Object.keys(needles).map((name) => [name, 0]));
  let unreadable = 0;
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  try {
    for (const mapping of readSmaps(pid)) {
      const perms = mapping.header.split(' ')[1]!;
      const length = Number(mapping.end - mapping.start);
      // Reserved address space (V8's cage) has no pages; nothing there is in a dump either.
      if (!perms.startsWith('r') || mapping.fields.get('Rss') === '0 kB' || length > 1 << 30) continue;
      const bytes = Buffer.alloc(length);
      try {
        readSync(fd, bytes, 0, length, Number(mapping.start));
      } catch {
        unreadable++;
        continue;
      }
      for (const [name, needle] of Object.entries(needles)) {
        for (let at = bytes.indexOf(needle); at >= 0; at = bytes.indexOf(needle, at + 1)) counts[name]!++;
      }
    }
  } finally {
    closeSync(fd);
  }
  return { counts, unreadable };
}
