// The secret-memory allocator on the real kernel: which memory it got, read back from
// /proc/self/smaps, and each step down (no memfd_secret; RLIMIT_MEMLOCK 0 without CAP_IPC_LOCK)
// reported as what it is. The RLIMIT cases run the built module (dist/) in a child: the limit and
// the dropped capability must not reach this test's own process.
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { SecretMemory, type MemoryKind } from '../../src/platform/secret-memory.js';
import { REPO } from '../helpers/keyhold.js';
import { isSecretmem, readProcessMemory, readSmaps, type Mapping } from '../helpers/smaps.js';

const mappingAt = (address: bigint): Mapping | undefined => readSmaps('self').find((m) => m.start === address);

const DIST_MODULE = join(REPO, 'dist', 'platform', 'secret-memory.js');

/** The allocator in a child without CAP_IPC_LOCK (root would ignore the limit) and with RLIMIT_MEMLOCK 0. */
function inChildWithoutMemlock(options: object): { kind: MemoryKind; reason: string | null; regions: number; smaps: string } {
  expect(existsSync(DIST_MODULE), 'build first: npx tsc -p tsconfig.json').toBe(true);
  const script = `
    const { SecretMemory } = await import(${JSON.stringify(pathToFileURL(DIST_MODULE).href)});
    const memory = new SecretMemory(${JSON.stringify(options)});
    memory.copyOf(Buffer.alloc(32, 1));
    const smaps = require('fs').readFileSync('/proc/self/smaps', 'utf8');
    console.log(JSON.stringify({ kind: memory.kind, reason: memory.fallbackReason, regions: memory.regions.length,
      smaps: smaps.split('\\n').filter((l) => l.includes('secretmem') || l.startsWith('Locked:') && !/\\s0 kB/.test(l)).join('\\n') }));`;
  const child = spawnSync(
    'setpriv',
    ['--bounding-set=-ipc_lock', 'prlimit', '--memlock=0', '--', process.execPath, '--input-type=commonjs', '-e', `(async () => { ${script} })()`],
    { encoding: 'utf8', timeout: 20_000 },
  );
  expect(child.status, child.stderr).toBe(0);
  return JSON.parse(child.stdout);
}

describe('secret memory', () => {
  it('uses memfd_secret pages on this kernel: a secretmem mapping, locked and not dumpable, unreadable through /proc/self/mem', () => {
    const memory = new SecretMemory();
    const key = memory.copyOf(Buffer.alloc(32, 0xa5));
    expect(memory.kind).toBe('secret');
    expect(memory.fallbackReason).toBeNull();
    const [region] = memory.regions;
    expect(region!.kind).toBe('secret');
    const entry = mappingAt(region!.address!);
    expect(entry, 'the mapping is in smaps').toBeDefined();
    expect(isSecretmem(entry!)).toBe(true);
    expect(entry!.flags).toEqual(expect.arrayContaining(['lo', 'dd']));
    expect(entry!.fields.get('Rss')).toBe('4 kB');
    // What a debugger or gcore would read: the kernel refuses it.
    expect(readProcessMemory('self', region!.address!)).toBe('EIO');
    expect(key.equals(Buffer.alloc(32, 0xa5))).toBe(true);
  });

  it('shares a page between slots, zeroes a slot when freed and gives it out again', () => {
    const memory = new SecretMemory();
    const keys = Array.from({ length: 128 }, (_, i) => memory.copyOf(Buffer.alloc(32, i + 1)));
    expect(memory.regions).toHaveLength(1);
    expect(keys.every((key, i) => key.every((b) => b === i + 1))).toBe(true);
    const seventh = keys[7]!;
    memory.free(seventh);
    expect(seventh.every((b) => b === 0)).toBe(true);
    expect(memory.inUse).toBe(127);
    const again = memory.alloc(32);
    expect(again.byteOffset).toBe(seventh.byteOffset);
    expect(memory.regions).toHaveLength(1);
    memory.alloc(48); // two slots: the page is full, a second one is mapped
    expect(memory.regions).toHaveLength(2);
    expect(() => memory.alloc(4097)).toThrow(RangeError);
    // A buffer not from here is zeroed, and no slot is given back for it.
    const stranger = Buffer.alloc(32, 3);
    memory.free(stranger);
    expect(stranger.every((b) => b === 0)).toBe(true);
    expect(memory.inUse).toBe(129);
  });

  it('without memfd_secret: mlocked, MADV_DONTDUMP anonymous pages, reported as `locked` with the reason', () => {
    const memory = new SecretMemory({ memfdSecret: false });
    memory.copyOf(Buffer.alloc(32, 1));
    expect(memory.kind).toBe('locked');
    expect(memory.fallbackReason).toBe('memfd_secret disabled');
    const entry = mappingAt(memory.regions[0]!.address!);
    expect(isSecretmem(entry!)).toBe(false);
    expect(entry!.flags).toEqual(expect.arrayContaining(['lo', 'dd']));
    expect(entry!.fields.get('Locked')).toBe('4 kB');
    // Unlike memfd_secret, a debugger of the same process can still read them.
    expect(readProcessMemory('self', memory.regions[0]!.address!)).toEqual(Buffer.alloc(32, 1));
  });

  describe('RLIMIT_MEMLOCK 0 and no CAP_IPC_LOCK (a child process)', () => {
    it('secretmem is charged to the limit: falls to `plain`, saying both steps failed', () => {
      const result = inChildWithoutMemlock({});
      expect(result.kind).toBe('plain');
      expect(result.reason).toMatch(/^mmap of the memfd_secret file: EAGAIN, RLIMIT_MEMLOCK reached .*; mlock: EPERM, RLIMIT_MEMLOCK reached/);
      expect(result.smaps).toBe(''); // nothing secretmem, nothing locked: `plain` is what it is
    });

    it('without memfd_secret either: `plain`, not `locked`', () => {
      const result = inChildWithoutMemlock({ memfdSecret: false });
      expect(result.kind).toBe('plain');
      expect(result.reason).toMatch(/^memfd_secret disabled; mlock: EPERM/);
    });
  });
});
