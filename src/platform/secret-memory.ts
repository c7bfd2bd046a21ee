// Small secret buffers (the master key, KEKs, the audit MAC key) in memory the rest of the process
// cannot leak: memfd_secret(2) pages where the kernel has them (unmapped from the kernel's own
// direct map, never swapped, out of core dumps and of /proc/PID/mem), else anonymous pages that
// are mlock'ed and MADV_DONTDUMP, else ordinary Buffers. Each step down is said, with its reason.
//
// Buffers handed out are views (koffi.view: an external ArrayBuffer, no copy) into one page that
// many slots share; a page is mapped once and kept for the life of the process, so a view can
// never outlive its memory. Freeing a slot zeroes it.
import { koffi, libcLibrary, libcSyscall } from '../libc.js';

export type MemoryKind = 'secret' | 'locked' | 'plain';

const STRENGTH: Record<MemoryKind, number> = { plain: 0, locked: 1, secret: 2 };

/** Allocation granularity: every key here is 32 bytes. */
const SLOT_BYTES = 32;
/** One page: mmap rounds up to the real page size (larger on some arm64 kernels), which only wastes the rest. */
const CHUNK_BYTES = 4096;
const SLOTS_PER_CHUNK = CHUNK_BYTES / SLOT_BYTES;

const SYS_MEMFD_SECRET: Partial<Record<string, number>> = { x64: 447, arm64: 447 };
const O_CLOEXEC = 0o2000000;
const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MADV_DONTDUMP = 16;
const MAP_FAILED = 0xffffffffffffffffn;

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM',
  11: 'EAGAIN',
  12: 'ENOMEM',
  22: 'EINVAL',
  24: 'EMFILE',
  38: 'ENOSYS',
};

interface MemoryCalls {
  syscall: (number: number, ...args: unknown[]) => number;
  ftruncate: (fd: number, length: number) => number;
  close: (fd: number) => number;
  mmap: (addr: null, length: number, prot: number, flags: number, fd: number, offset: number) => unknown;
  munmap: (addr: unknown, length: number) => number;
  mlock: (addr: unknown, length: number) => number;
  madvise: (addr: unknown, length: number, advice: number) => number;
}

let calls: MemoryCalls | null = null;

function load(): MemoryCalls {
  if (calls) return calls;
  const lib = libcLibrary();
  calls = {
    syscall: libcSyscall(),
    ftruncate: lib.func('int ftruncate(int, int64_t)'),
    close: lib.func('int close(int)'),
    mmap: lib.func('void *mmap(void *, size_t, int, int, int, int64_t)'),
    munmap: lib.func('int munmap(void *, size_t)'),
    mlock: lib.func('int mlock(void *, size_t)'),
    madvise: lib.func('int madvise(void *, size_t, int)'),
  } as MemoryCalls;
  return calls;
}

const errnoName = () => {
  const errno = koffi().errno();
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
};

class MappingFailed extends Error {}

/** The failure of one step, worded for the daemon's log. */
function failure(call: string, hints: Partial<Record<string, string>> = {}): MappingFailed {
  const name = errnoName();
  return new MappingFailed(hints[name] ? `${call}: ${name}, ${hints[name]}` : `${call}: ${name}`);
}

const MEMLOCK_HINT = 'RLIMIT_MEMLOCK reached (raise LimitMEMLOCK= or ulimit -l)';

function mapped(pointer: unknown): boolean {
  return pointer !== null && koffi().address(pointer) !== MAP_FAILED;
}

/** A memfd_secret page: the fd can be closed once mapped (the mapping keeps the memory). */
function mapSecretPage(): { pointer: unknown } {
  const number = SYS_MEMFD_SECRET[process.arch];
  if (number === undefined) throw new MappingFailed(`memfd_secret: not wired for ${process.arch}`);
  const libc = load();
  const fd = Number(libc.syscall(number, 'unsigned int', O_CLOEXEC));
  if (fd < 0) throw failure('memfd_secret', { ENOSYS: 'the kernel has no secretmem (Linux >= 5.14 with secretmem.enable=1)' });
  try {
    if (libc.ftruncate(fd, CHUNK_BYTES) !== 0) throw failure('ftruncate of the memfd_secret file');
    const pointer = libc.mmap(null, CHUNK_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    // secretmem charges its pages against RLIMIT_MEMLOCK (EAGAIN past it).
    if (!mapped(pointer)) throw failure('mmap of the memfd_secret file', { EAGAIN: MEMLOCK_HINT, ENOMEM: MEMLOCK_HINT });
    return { pointer };
  } finally {
    libc.close(fd);
  }
}

function mapLockedPage(): { pointer: unknown } {
  const libc = load();
  const pointer = libc.mmap(null, CHUNK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (!mapped(pointer)) throw failure('mmap');
  if (libc.madvise(pointer, CHUNK_BYTES, MADV_DONTDUMP) !== 0 || libc.mlock(pointer, CHUNK_BYTES) !== 0) {
    const error = failure('mlock', { ENOMEM: MEMLOCK_HINT, EPERM: MEMLOCK_HINT, EAGAIN: 'the kernel could not lock the page now' });
    libc.munmap(pointer, CHUNK_BYTES);
    throw error;
  }
  return { pointer };
}

interface Chunk {
  kind: MemoryKind;
  bytes: Buffer;
  /** The mapping's address (null for a plain chunk): what /proc/PID/smaps lists it under. */
  address: bigint | null;
  used: boolean[];
}

interface Slot {
  chunk: Chunk;
  first: number;
  count: number;
}

export interface SecretMemoryOptions {
  /** Skip memfd_secret (tests: what a kernel without it does). */
  memfdSecret?: boolean;
  /** Skip mlock as well (tests). */
  locking?: boolean;
}

export class SecretMemory {
  private readonly chunks: Chunk[] = [];
  private readonly slots = new Map<Buffer, Slot>();
  /** The best kind still worth trying; lowered for good when a step fails. */
  private ceiling: MemoryKind;
  private reasons: string[] = [];

  constructor(options: SecretMemoryOptions = {}) {
    this.ceiling = options.memfdSecret === false ? (options.locking === false ? 'plain' : 'locked') : 'secret';
    if (options.memfdSecret === false) this.reasons.push('memfd_secret disabled');
    if (options.locking === false) this.reasons.push('mlock disabled');
  }

  /**
   * The weakest memory any slot may be in: maps the first page if none is yet, so that it is
   * known (and said) before any secret arrives.
   */
  get kind(): MemoryKind {
    if (this.chunks.length === 0) this.chunks.push(this.mapChunk());
    return this.chunks.reduce<MemoryKind>((weakest, c) => (STRENGTH[c.kind] < STRENGTH[weakest] ? c.kind : weakest), 'secret');
  }

  /** Why the memory is not `secret`: each step that failed, in order; null when it is. */
  get fallbackReason(): string | null {
    return this.kind === 'secret' ? null : this.reasons.join('; ');
  }

  /** The mapped pages (tests read them in /proc/PID/smaps). */
  get regions(): { kind: MemoryKind; address: bigint | null; length: number }[] {
    return this.chunks.map((c) => ({ kind: c.kind, address: c.address, length: CHUNK_BYTES }));
  }

  /** A zeroed buffer of `size` bytes (at most a page) in the best memory available. */
  alloc(size: number): Buffer {
    if (!Number.isInteger(size) || size <= 0 || size > CHUNK_BYTES) throw new RangeError(`a secret slot holds 1 to ${CHUNK_BYTES} bytes`);
    const count = Math.ceil(size / SLOT_BYTES);
    for (const chunk of this.chunks) {
      const first = freeRun(chunk.used, count);
      if (first >= 0) return this.take(chunk, first, count, size);
    }
    const chunk = this.mapChunk();
    this.chunks.push(chunk);
    return this.take(chunk, 0, count, size);
  }

  /** A copy of `source` in secret memory (the caller zeroes its own). */
  copyOf(source: Uint8Array): Buffer {
    const held = this.alloc(source.length);
    held.set(source);
    return held;
  }

  /** Zeroes the buffer and gives its slot back. A buffer not from here is only zeroed. */
  free(buffer: Buffer): void {
    buffer.fill(0);
    const slot = this.slots.get(buffer);
    if (!slot) return;
    this.slots.delete(buffer);
    for (let i = slot.first; i < slot.first + slot.count; i++) slot.chunk.used[i] = false;
  }

  /** Slots in use (tests). */
  get inUse(): number {
    return this.slots.size;
  }

  private take(chunk: Chunk, first: number, count: number, size: number): Buffer {
    for (let i = first; i < first + count; i++) chunk.used[i] = true;
    const buffer = chunk.bytes.subarray(first * SLOT_BYTES, first * SLOT_BYTES + size);
    buffer.fill(0);
    this.slots.set(buffer, { chunk, first, count });
    return buffer;
  }

  private mapChunk(): Chunk {
    const attempts: [MemoryKind, () => { pointer: unknown }][] = [
      ['secret', mapSecretPage],
      ['locked', mapLockedPage],
    ];
    for (const [kind, map] of attempts) {
      if (STRENGTH[kind] > STRENGTH[this.ceiling]) continue;
      try {
        const { pointer } = map();
        const bytes = Buffer.from(koffi().view(pointer, CHUNK_BYTES));
        return { kind, bytes, address: koffi().address(pointer), used: new Array<boolean>(SLOTS_PER_CHUNK).fill(false) };
      } catch (err) {
        // koffi itself failing (no libc.so.6, a runtime without external buffers) is a step down too.
        this.reasons.push(err instanceof MappingFailed ? err.message : `${kind} memory: ${(err as Error).message}`);
        this.ceiling = kind === 'secret' ? 'locked' : 'plain';
      }
    }
    return { kind: 'plain', bytes: Buffer.alloc(CHUNK_BYTES), address: null, used: new Array<boolean>(SLOTS_PER_CHUNK).fill(false) };
  }
}

function freeRun(used: boolean[], count: number): number {
  let run = 0;
  for (let i = 0; i < used.length; i++) {
    run = used[i] ? 0 : run + 1;
    if (run === count) return i - count + 1;
  }
  return -1;
}

let shared: SecretMemory | null = null;

/** The process's one allocator (its pages are shared by every vault the process opens). */
export function secretMemory(): SecretMemory {
  shared ??= new SecretMemory();
  return shared;
}
