// The audit log, `<vault>.audit.jsonl` (0600): one JSON object a line, each chained to the one
// before by `prev` and authenticated by `mac` (HMAC-SHA256 under a key derived from the master
// key). The vault's meta table keeps a recent seq and mac (the anchor, which may trail the file by
// about a second), so that deleting or truncating lines shows. Writers in several processes
// append under an advisory lock on the log file itself, never under the database's write lock.
import { createHmac, hkdfSync, timingSafeEqual } from 'node:crypto';
import { closeSync, constants, existsSync, fstatSync, fsync, fsyncSync, ftruncateSync, openSync, readSync, statSync, writeSync } from 'node:fs';
import { readCapped } from '../read-capped.js';
import { MAX_AUDIT_LOG_BYTES } from '../vault/paths.js';
import { KeyholdError } from '../errors.js';
import { tryLockFile, unlockFile } from '../libc.js';
import { isBusyError, type Db } from '../vault/database.js';

export const GENESIS_MAC = '0'.repeat(64);
const MAC_SUFFIX = /,"mac":"([0-9a-f]{64})"\}$/;
/** How far back from the end a writer looks for the last line. */
const TAIL_WINDOW = 256 * 1024;
/** Events kept while nothing can be written (a locked daemon), oldest dropped first. */
export const MAX_PENDING_EVENTS = 10_000;

export type AuditPeer =
  | { kind: 'unix'; pid: number; uid: number; gid: number; exe: string | null }
  | { kind: 'tcp'; address: string; port: number }
  | { kind: 'process'; pid: number; uid: number; exe: string | null };

export interface AuditEvent {
  event: string;
  scope?: string;
  fingerprint?: string;
  token_id?: string;
  subject?: string;
  peer?: AuditPeer;
  algorithm?: string;
  data_sha256?: string;
  user?: string;
  host_key?: string;
  reason?: string;
  name?: string;
  names?: string[];
  factor?: string;
  count?: number;
  [field: string]: unknown;
}

export interface AuditEntry extends AuditEvent {
  seq: number;
  time: string;
  prev: string;
  mac: string;
}

export interface AuditAnchor {
  seq: number;
  mac: string;
}

export function auditKey(masterKey: Buffer, vaultId: string): Buffer {
  return Buffer.from(hkdfSync('sha256', masterKey, Buffer.from(vaultId), 'keyhold-audit-v1', 32));
}

function hmac(key: Buffer, text: string): string {
  return createHmac('sha256', key).update(text).digest('hex');
}

/** The exact line: the entry's JSON with `prev`, then `mac` over everything before it. */
export function formatLine(key: Buffer, seq: number, time: string, event: AuditEvent, prev: string): { line: string; mac: string } {
  const { event: name, seq: _seq, time: _time, prev: _prev, mac: _mac, ...fields } = event;
  const body = JSON.stringify({ seq, time, event: name, ...fields, prev });
  const mac = hmac(key, body);
  return { line: `${body.slice(0, -1)},"mac":"${mac}"}`, mac };
}

export type LineCheck = { ok: true; entry: AuditEntry } | { ok: false; reason: string };

/** Parses one line and checks its MAC (not its place in the chain). */
export function checkLine(key: Buffer, line: string): LineCheck {
  const match = MAC_SUFFIX.exec(line);
  if (!match) return { ok: false, reason: 'not an audit line (no mac)' };
  const body = `${line.slice(0, match.index)}}`;
  const expected = Buffer.from(hmac(key, body), 'hex');
  if (!timingSafeEqual(expected, Buffer.from(match[1]!, 'hex'))) return { ok: false, reason: 'bad mac (edited, or from another vault)' };
  let entry: AuditEntry;
  try {
    entry = JSON.parse(line) as AuditEntry;
  } catch {
    return { ok: false, reason: 'not JSON' };
  }
  if (!Number.isSafeInteger(entry.seq) || typeof entry.prev !== 'string') return { ok: false, reason: 'bad fields' };
  return { ok: true, entry };
}

export function readAnchor(db: Db): AuditAnchor {
  const rows = db.prepare(`SELECT name, value FROM meta WHERE name IN ('audit_seq', 'audit_mac')`).all() as { name: string; value: unknown }[];
  const seq = rows.find((r) => r.name === 'audit_seq')?.value;
  const mac = rows.find((r) => r.name === 'audit_mac')?.value;
  return { seq: typeof seq === 'number' ? seq : 0, mac: typeof mac === 'string' ? mac : GENESIS_MAC };
}

/**
 * The last authentic line of the file (within the tail window) and whether the file ends in a
 * torn line (a crash mid-append), which the writer seals with a newline before going on.
 */
function fileHead(fd: number, key: Buffer): { head: AuditAnchor | null; torn: boolean } {
  const size = fstatSync(fd).size;
  if (size === 0) return { head: null, torn: false };
  const length = Math.min(size, TAIL_WINDOW);
  const buffer = Buffer.alloc(length);
  readSync(fd, buffer, 0, length, size - length);
  const text = buffer.toString('utf8');
  const torn = !text.endsWith('\n');
  const lines = text.split('\n');
  const last = lines.pop()!;
  // A crash can stop right before a line's newline: that line is complete and authentic, and the
  // chain goes on from it (the writer adds the missing newline).
  if (torn) {
    const check = checkLine(key, last);
    if (check.ok) return { head: { seq: check.entry.seq, mac: check.entry.mac }, torn };
  }
  for (let i = lines.length - 1; i >= (size > length ? 1 : 0); i--) {
    const check = checkLine(key, lines[i]!);
    if (check.ok) return { head: { seq: check.entry.seq, mac: check.entry.mac }, torn };
  }
  return { head: null, torn };
}

/** A written batch reaches the disk (fsync) within this long: the contract's 100 ms, with room. */
const SYNC_DELAY_MS = 50;
/** How often the vault's anchor catches up with the file. It may trail the file; see verifyAuditText. */
const ANCHOR_INTERVAL_MS = 1_000;
/** While the log cannot be written: how often to try again, and how often to say so again. */
const RETRY_MS = 1_000;
const REPEAT_LOG_MS = 60_000;
/** How long the daemon's appends wait for another process's append (the file lock) before it counts as a failure. */
const LOCK_WAIT_MS = 2_000;
/** A synchronous flush waits for the lock this long: the daemon's (event loop blocked), a CLI's. */
const FLUSH_LOCK_WAIT_MS = 250;
const CLI_LOCK_WAIT_MS = 10_000;
/** How often an append looks the log's path up, to follow a log moved away (renamed) under it. */
const PATH_CHECK_MS = 100;

/** The log cannot be written now: sign requests are refused until it can. */
export class AuditUnavailableError extends Error {
  override name = 'AuditUnavailableError';

  constructor(readonly code: string) {
    super(`the audit log cannot be written (${code})`);
  }
}

/** A rejection for callers that await it; one nobody awaits (`void record(…)`) must not end the process. */
export function auditUnavailable(code: string): Promise<never> {
  const rejected = Promise.reject(new AuditUnavailableError(code));
  rejected.catch(() => {});
  return rejected;
}

/** Another process holds the log's file lock (it is appending); not a failure unless it lasts. */
class LogBusy extends Error {}

interface Queued {
  time: string;
  event: AuditEvent;
  /** A signature that is refused when its line cannot be written: counted, not kept. */
  signature: boolean;
}

interface Turn {
  promise: Promise<void>;
  resolve(): void;
  reject(err: Error): void;
  busySince: number | null;
}

export interface AuditFailure {
  code: string;
  since: string;
}

export interface AuditLogger {
  error(fields: object, message: string): void;
  info(fields: object, message: string): void;
}

function errorCode(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? (err instanceof LogBusy ? 'locked by another process' : (err as Error).name ?? 'error');
}

/**
 * Appends chained lines to the log. Writers in several processes serialize on an advisory lock on
 * the log file itself, not on the database: a process holding the vault's write lock never holds
 * up an append, and appends never wait on a database transaction.
 *
 * Two modes. A CLI process queues events and `flush()`es them (write, fsync, anchor) before it
 * reports success. The daemon (`serve()`) writes every turn of the event loop: each `record()`
 * returns the promise of its turn's single write(2), which the caller awaits before it answers, so
 * no signature or change is acknowledged before its line is in the file (it then survives kill -9);
 * fsync follows within SYNC_DELAY_MS for the whole group, and the anchor in the vault catches up
 * about once a second, off the request path and without waiting for the database lock.
 */
export class AuditWriter {
  private queue: Queued[] = [];
  private dropped = 0;
  private fd: number | null = null;
  /** The file's size after our last append; another writer's append shows as a difference. */
  private size = -1;
  private head: AuditAnchor | null = null;
  private tornEnd = false;
  private turn: Turn | null = null;
  private daemon: { log: AuditLogger } | null = null;
  private syncTimer: NodeJS.Timeout | null = null;
  private syncing = false;
  private unsynced: AuditAnchor | null = null;
  private synced: AuditAnchor | null = null;
  private anchoredSeq = 0;
  private anchorTimer: NodeJS.Timeout | null = null;
  private failing: (AuditFailure & { refused: number; loggedAt: number; retry: NodeJS.Timeout | null }) | null = null;
  private closed = false;
  private pathCheckedAt = 0;

  constructor(
    private readonly path: string,
    private readonly db: Db,
    private readonly key: Buffer,
  ) {}

  /**
   * Daemon mode: from now on every turn's events are written before the turn's `record()`
   * promises resolve. Failures are logged (once, then once a minute), never thrown at a timer.
   */
  serve(log: AuditLogger): void {
    this.daemon = { log };
    if (this.queue.length > 0) void this.scheduleTurn();
  }

  /** Null while the log can be written; otherwise since when and why not. */
  get failure(): AuditFailure | null {
    return this.failing && { code: this.failing.code, since: this.failing.since };
  }

  /** A sign request refused without signing because the log cannot be written (counted for the resume line). */
  countRefusal(): void {
    if (this.failing) this.failing.refused++;
  }

  /**
   * Queues an event. In daemon mode, resolves once its line is written (rejects with
   * AuditUnavailableError if it cannot be); a CLI process writes it at `flush()`.
   */
  record(event: AuditEvent, time = new Date(), options: { signature?: boolean } = {}): Promise<void> {
    const queued: Queued = { time: time.toISOString(), event, signature: options.signature ?? false };
    if (!this.daemon) {
      this.keep(queued);
      return Promise.resolve();
    }
    if (this.failing) {
      // Nothing is written now: a signature is refused (and counted), anything else kept for later.
      if (queued.signature) this.failing.refused++;
      else this.keep(queued);
      return auditUnavailable(this.failing.code);
    }
    if (this.queue.length >= MAX_PENDING_EVENTS) {
      // Never drop what a waiting reply needs: past the bound (a turn that cannot be written for a
      // moment while requests keep coming) the new event is refused instead, and counted.
      this.dropped++;
      return auditUnavailable('audit queue full');
    }
    this.queue.push(queued);
    return this.scheduleTurn();
  }

  /** Keeps an event to write later, the oldest dropped (and counted) past MAX_PENDING_EVENTS. */
  private keep(queued: Queued): void {
    if (this.queue.length >= MAX_PENDING_EVENTS) {
      this.queue.shift();
      this.dropped++;
    }
    this.queue.push(queued);
  }

  /** Puts events that could not be written back in front of the queue, within its bound (the rest counted). */
  private requeue(events: Queued[]): void {
    const all = [...events, ...this.queue];
    const over = all.length - MAX_PENDING_EVENTS;
    if (over > 0) this.dropped += over;
    this.queue = over > 0 ? all.slice(over) : all;
  }

  /** Everything recorded so far is written (daemon mode); resolves at once when nothing is queued. */
  written(): Promise<void> {
    if (this.failing) return auditUnavailable(this.failing.code);
    return this.turn?.promise ?? Promise.resolve();
  }

  private scheduleTurn(): Promise<void> {
    if (this.turn) return this.turn.promise;
    let resolve!: () => void;
    let reject!: (err: Error) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Events nobody awaits (a handshake failure) must not become unhandled rejections.
    promise.catch(() => {});
    this.turn = { promise, resolve, reject, busySince: null };
    if (this.wroteThisTurn) {
      // Others are being answered in this turn of the event loop: everything recorded from here
      // to the turn's end shares one write (16 pipelining clients pay one write, not 16).
      setImmediate(this.writeTurn);
    } else {
      // The first in this turn (a lone request, most often) is written as soon as the code that
      // recorded it returns: waiting for the turn's end would cost it a pass of the event loop.
      this.wroteThisTurn = true;
      setImmediate(this.endTurn);
      queueMicrotask(this.writeTurn);
    }
    return promise;
  }

  private wroteThisTurn = false;
  private readonly endTurn = (): void => {
    this.wroteThisTurn = false;
  };

  private readonly writeTurn = (): void => {
    const turn = this.turn;
    if (!turn) return;
    const batch = this.takeQueue();
    try {
      this.appendLocked(batch, 0);
    } catch (err) {
      if (err instanceof LogBusy && (turn.busySince ??= Date.now()) > Date.now() - LOCK_WAIT_MS) {
        // Another process is appending: this turn's events wait a moment, later ones join them.
        this.queue = [...batch, ...this.queue];
        setTimeout(this.writeTurn, 2);
        return;
      }
      this.turn = null;
      this.fail(err, batch);
      turn.reject(new AuditUnavailableError(errorCode(err)));
      return;
    }
    this.turn = null;
    turn.resolve();
    this.scheduleSync();
  };

  private takeQueue(): Queued[] {
    const batch = this.queue;
    this.queue = [];
    if (this.dropped > 0) {
      batch.unshift({ time: new Date().toISOString(), event: { event: 'events-dropped', count: this.dropped }, signature: false });
      this.dropped = 0;
    }
    return batch;
  }

  /** Enters (or stays in) the failed state: signatures of the batch are counted as refused, other events kept. */
  private fail(err: unknown, batch: Queued[]): void {
    const code = errorCode(err);
    const refused = batch.filter((q) => q.signature).length;
    this.requeue(batch.filter((q) => !q.signature));
    if (this.failing) {
      this.failing.refused += refused;
      return;
    }
    const now = Date.now();
    this.failing = { code, since: new Date(now).toISOString(), refused, loggedAt: now, retry: null };
    this.daemon?.log.error({ path: this.path, code }, 'cannot write the audit log: refusing to sign until it can be written again');
    this.armRetry();
  }

  private armRetry(): void {
    const failing = this.failing;
    if (!failing || !this.daemon) return;
    failing.retry = setTimeout(() => {
      failing.retry = null;
      this.retry();
    }, RETRY_MS);
    failing.retry.unref();
  }

  /** While failing: tries to write what was kept plus a line saying what happened meanwhile. */
  private retry(): void {
    const failing = this.failing;
    if (!failing) return;
    const resumed: Queued = {
      time: new Date().toISOString(),
      event: { event: 'audit-resumed', reason: failing.code, since: failing.since, refused: failing.refused },
      signature: false,
    };
    const batch = [...this.takeQueue(), resumed];
    try {
      this.appendLocked(batch, 0);
    } catch (err) {
      this.requeue(batch.slice(0, -1));
      failing.code = errorCode(err);
      if (Date.now() - failing.loggedAt >= REPEAT_LOG_MS) {
        failing.loggedAt = Date.now();
        this.daemon?.log.error({ path: this.path, code: failing.code, since: failing.since, refused: failing.refused }, 'still cannot write the audit log: refusing to sign');
      }
      this.armRetry();
      return;
    }
    this.failing = null;
    this.daemon?.log.info({ path: this.path, since: failing.since, refused: failing.refused }, 'the audit log can be written again: signing resumed');
    this.scheduleSync();
  }

  /**
   * Appends under the log's file lock; in daemon mode a held lock throws LogBusy instead of
   * waiting. One fstat under the lock gives the size (another writer's append shows as a change)
   * and whether the file we hold is still linked (removed, or replaced by a rename: then the log
   * is reopened); the path itself is looked up only now and then (see stillAtPath).
   */
  private appendLocked(batch: Queued[], lockWaitMs: number): void {
    if (batch.length === 0) return;
    for (let reopened = false; ; reopened = true) {
      const fd = this.fd ?? this.openLog();
      this.lock(fd, lockWaitMs);
      try {
        const stat = fstatSync(fd);
        if ((stat.nlink > 0 && this.stillAtPath(stat.ino)) || reopened) return this.append(fd, stat.size, batch);
      } finally {
        unlockFile(fd);
      }
      if (this.syncing) throw new LogBusy();
      closeSync(fd);
      this.fd = null;
    }
  }

  /** Takes the log's lock, waiting at most `waitMs` (blocking: only a CLI process or a rare daemon flush waits). */
  private lock(fd: number, waitMs: number): void {
    if (tryLockFile(fd)) return;
    if (waitMs === 0) throw new LogBusy();
    const deadline = Date.now() + waitMs;
    const pause = new Int32Array(new SharedArrayBuffer(4));
    while (!tryLockFile(fd)) {
      if (Date.now() > deadline) throw new KeyholdError(`${this.path} stays locked by another process`, 'see which keyhold process holds it');
      Atomics.wait(pause, 0, 0, 2);
    }
  }

  /**
   * Whether the path still names the file we hold. A rename (logrotate, `mv`) leaves it linked,
   * so the path is looked up too, at most every PATH_CHECK_MS: not on every append.
   */
  private stillAtPath(ino: number): boolean {
    const now = Date.now();
    if (now - this.pathCheckedAt < PATH_CHECK_MS) return true;
    this.pathCheckedAt = now;
    try {
      return statSync(this.path).ino === ino;
    } catch {
      return false;
    }
  }

  private openLog(): number {
    this.fd = openSync(this.path, constants.O_RDWR | constants.O_CREAT | constants.O_APPEND | constants.O_NOFOLLOW, 0o600);
    this.size = -1;
    return this.fd;
  }

  private append(fd: number, start: number, batch: Queued[]): void {
    if (start !== this.size || this.head === null) this.resync(fd);
    let { seq, mac } = this.head!;
    const lines: string[] = this.tornEnd ? [''] : [];
    for (const { time, event } of batch) {
      const formatted = formatLine(this.key, ++seq, time, event, mac);
      lines.push(formatted.line);
      mac = formatted.mac;
    }
    const bytes = Buffer.from(lines.join('\n') + '\n');
    try {
      let written = 0;
      while (written < bytes.length) written += writeSync(fd, bytes, written);
    } catch (err) {
      // Disk full or an I/O error part-way: take the partial lines back, so that the chain on
      // disk ends where it did and the next append continues from there.
      try {
        ftruncateSync(fd, start);
      } catch {
        this.size = -1;
      }
      throw err;
    }
    this.head = { seq, mac };
    this.tornEnd = false;
    this.size = start + bytes.length;
    this.unsynced = this.head;
  }

  /**
   * Finds where the chain goes on: the file's last authentic line, unless the file lost lines the
   * vault remembers; then from the anchor, so that the gap shows in `audit verify`.
   */
  private resync(fd: number): void {
    const { head, torn } = fileHead(fd, this.key);
    let anchor: AuditAnchor = { seq: 0, mac: GENESIS_MAC };
    try {
      anchor = readAnchor(this.db);
    } catch (err) {
      // The database is busy or gone: the file's own head is the best we know.
      if (!head) throw err;
    }
    this.head = head && head.seq >= anchor.seq ? head : anchor;
    this.anchoredSeq = Math.max(this.anchoredSeq, anchor.seq);
    this.tornEnd = torn;
    this.size = fstatSync(fd).size;
  }

  private scheduleSync(): void {
    if (!this.daemon || this.syncTimer || this.syncing || !this.unsynced) return;
    this.syncTimer = setTimeout(() => {
      this.syncTimer = null;
      this.syncAsync();
    }, SYNC_DELAY_MS);
    this.syncTimer.unref();
  }

  /** One fsync for every line written since the last, on libuv's thread pool (the loop does not wait). */
  private syncAsync(): void {
    const fd = this.fd;
    const target = this.unsynced;
    if (fd === null || !target) return;
    this.unsynced = null;
    this.syncing = true;
    fsync(fd, (err) => {
      this.syncing = false;
      if (this.closed) {
        if (this.fd !== fd) closeSync(fd);
        return;
      }
      if (err) {
        this.unsynced ??= target;
        this.fail(err, []);
        return;
      }
      this.synced = target;
      this.scheduleAnchor();
      this.scheduleSync();
    });
  }

  private scheduleAnchor(): void {
    if (this.anchorTimer || !this.synced || this.synced.seq <= this.anchoredSeq) return;
    this.anchorTimer = setTimeout(() => {
      this.anchorTimer = null;
      try {
        this.moveAnchor(this.synced!);
      } catch (err) {
        // A process holding the database's write lock, or a full disk: the anchor trails the
        // file a little longer. Nothing on the request path waits for it.
        if (!isBusyError(err)) this.daemon?.log.info({ code: errorCode(err) }, 'audit anchor not updated; will retry');
      }
      this.scheduleAnchor();
    }, ANCHOR_INTERVAL_MS);
    this.anchorTimer.unref();
  }

  /** Moves the vault's anchor forward to `to` (never back: another writer may be ahead). */
  private moveAnchor(to: AuditAnchor): void {
    this.db
      .transaction(() => {
        if (readAnchor(this.db).seq >= to.seq) return;
        const upsert = this.db.prepare('INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value');
        upsert.run('audit_seq', to.seq);
        upsert.run('audit_mac', to.mac);
      })
      .immediate();
    this.anchoredSeq = Math.max(this.anchoredSeq, to.seq);
  }

  /**
   * Writes every queued event, fsyncs, and moves the anchor, before returning (a CLI process
   * before it reports success; the daemon at lock and shutdown). Throws if the log cannot be
   * written; the events stay queued.
   */
  flush(): void {
    if (this.syncTimer) clearTimeout(this.syncTimer);
    this.syncTimer = null;
    const batch = this.takeQueue();
    if (this.failing) batch.push({ time: new Date().toISOString(), event: { event: 'audit-resumed', reason: this.failing.code, since: this.failing.since, refused: this.failing.refused }, signature: false });
    try {
      // The daemon waits a moment for a CLI's append, never long: its event loop is blocked meanwhile.
      this.appendLocked(batch, this.daemon ? FLUSH_LOCK_WAIT_MS : CLI_LOCK_WAIT_MS);
    } catch (err) {
      this.requeue(batch.filter((q) => q.event.event !== 'audit-resumed'));
      this.scheduleSync();
      throw err;
    }
    if (this.failing?.retry) clearTimeout(this.failing.retry);
    this.failing = null;
    // What a pending turn waited for is written now (this flush took its events).
    const turn = this.turn;
    this.turn = null;
    turn?.resolve();
    const target = this.unsynced ?? this.synced;
    if (this.fd !== null && this.unsynced) {
      try {
        fsyncSync(this.fd);
      } catch (err) {
        this.fail(err, []);
        throw err;
      }
    }
    this.unsynced = null;
    if (!target || target.seq <= this.anchoredSeq || !this.db.open) return;
    this.synced = target;
    try {
      this.moveAnchor(target);
    } catch (err) {
      // The lines are on disk; in the daemon the anchor may trail them (a held lock, a full disk).
      if (!this.daemon) throw err;
      if (!isBusyError(err)) this.daemon.log.info({ code: errorCode(err) }, 'audit anchor not updated; will retry');
      this.scheduleAnchor();
    }
  }

  /** Stops the timers and closes the file; call after a last flush. */
  close(): void {
    this.closed = true;
    // Events still queued are not written by this writer any more: whoever waits on them is refused.
    const turn = this.turn;
    this.turn = null;
    turn?.reject(new AuditUnavailableError('closed'));
    for (const timer of [this.syncTimer, this.anchorTimer, this.failing?.retry ?? null]) if (timer) clearTimeout(timer);
    this.syncTimer = this.anchorTimer = null;
    if (this.fd !== null && !this.syncing) closeSync(this.fd);
    this.fd = null;
  }

  /**
   * Events not written yet, with a line on the failure if there is one: the daemon keeps them
   * across a lock that happens while the log cannot be written, and writes them at the next unlock.
   */
  takeUnwritten(): { time: Date; event: AuditEvent }[] {
    // Their lines are not in the file: replies waiting on them are refused, and a signature among
    // them is kept as a refusal (it is never sent).
    const turn = this.turn;
    this.turn = null;
    turn?.reject(new AuditUnavailableError(this.failing?.code ?? 'locked'));
    const events = this.takeQueue().map((q) => ({
      time: new Date(q.time),
      event: q.signature ? { ...q.event, event: 'sign-refused', reason: 'audit-unavailable' } : q.event,
    }));
    if (this.failing) {
      const { code, since, refused } = this.failing;
      events.push({ time: new Date(), event: { event: 'audit-unavailable', reason: code, since, refused } });
    }
    return events;
  }
}

/** The log's text ('' when there is none yet), through the size cap; it must be a regular file. */
export function readAuditLog(path: string): string {
  if (!existsSync(path)) return '';
  return readCapped(path, MAX_AUDIT_LOG_BYTES, 'audit log', { regularFile: true }).toString('utf8');
}

/** Reads the log at `path` and checks it against `key` and the vault's anchor (read before it). */
export function verifyAuditFile(path: string, key: Buffer, anchor: AuditAnchor): VerifyResult {
  return verifyAuditText(readAuditLog(path), key, anchor);
}

export interface VerifyWarning {
  line: number;
  reason: string;
}

export type VerifyResult =
  | { ok: true; entries: number; lastSeq: number; warnings: VerifyWarning[] }
  | { ok: false; line: number; reason: string; entries: number; warnings: VerifyWarning[] };

/**
 * Checks every line: its MAC, seq following the entry before it, prev = that entry's mac; and that
 * the vault's anchor (latest seq and mac) is in the chain, so deleted or truncated lines show. A
 * line cut short by a crash mid-append (no mac at all) is reported as a warning and skipped: it
 * was never acknowledged, and the chain must continue intact after it.
 */
export function verifyAuditText(text: string, key: Buffer, anchor: AuditAnchor): VerifyResult {
  const warnings: VerifyWarning[] = [];
  const lines = text.length === 0 ? [] : text.split('\n');
  const lastTorn = lines.length > 0 && lines[lines.length - 1] !== '';
  if (!lastTorn && lines.length > 0) lines.pop();
  let prev = GENESIS_MAC;
  let entries = 0;
  let anchorSeen = anchor.seq === 0;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    const fail = (reason: string): VerifyResult => ({ ok: false, line: i + 1, reason, entries, warnings });
    if (!MAC_SUFFIX.test(line)) {
      const last = i === lines.length - 1;
      warnings.push({ line: i + 1, reason: last && lastTorn ? 'incomplete last line (torn by a crash while writing)' : 'incomplete line (torn by a crash while writing)' });
      continue;
    }
    const check = checkLine(key, line);
    if (!check.ok) return fail(check.reason);
    const { entry } = check;
    if (entry.seq !== entries + 1) return fail(`seq ${entry.seq} where ${entries + 1} belongs (lines deleted or reordered)`);
    if (entry.prev !== prev) return fail('does not follow the entry before it (lines deleted or reordered)');
    if (entry.seq === anchor.seq) {
      if (entry.mac !== anchor.mac) return fail('differs from the entry the vault recorded');
      anchorSeen = true;
    }
    prev = entry.mac;
    entries++;
  }
  if (!anchorSeen) {
    return { ok: false, line: lines.length + 1, reason: `truncated: the vault recorded ${anchor.seq} entries, the log has ${entries}`, entries, warnings };
  }
  return { ok: true, entries, lastSeq: entries, warnings };
}
