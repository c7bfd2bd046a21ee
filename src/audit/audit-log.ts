// The audit log, `<vault>.audit.jsonl` (0600): one JSON object a line, each chained to the one
// before by `prev` and authenticated by `mac` (HMAC-SHA256 under a key derived from the master
// key). The vault's meta table keeps the latest seq and mac, so that deleting or truncating lines
// shows. Writers append under the database's write lock, which serializes them across processes.
import { createHmac, hkdfSync, timingSafeEqual } from 'node:crypto';
import { closeSync, constants, fstatSync, fsyncSync, openSync, readSync, writeSync } from 'node:fs';
import type { Db } from '../vault/database.js';

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

export class AuditWriter {
  private queue: { time: string; event: AuditEvent }[] = [];
  private timer: NodeJS.Timeout | null = null;
  private dropped = 0;

  constructor(
    private readonly path: string,
    private readonly db: Db,
    private readonly key: Buffer,
    /** Batch window: events are written at most this long after they happen; null = only on flush(). */
    private batchMs: number | null = null,
  ) {}

  /** From now on, write queued events within `ms` (the daemon: signatures must not wait on fsync). */
  batch(ms: number): void {
    this.batchMs = ms;
  }

  record(event: AuditEvent, time = new Date()): void {
    if (this.queue.length >= MAX_PENDING_EVENTS) {
      this.queue.shift();
      this.dropped++;
    }
    this.queue.push({ time: time.toISOString(), event });
    if (this.batchMs !== null && !this.timer) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.flush();
      }, this.batchMs);
      this.timer.unref();
    }
  }

  /** Appends every queued event, fsyncs, and moves the vault's anchor, in one write transaction. */
  flush(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.queue.length === 0 || !this.db.open) return;
    const batch = this.queue;
    this.queue = [];
    if (this.dropped > 0) {
      batch.unshift({ time: new Date().toISOString(), event: { event: 'events-dropped', count: this.dropped } });
      this.dropped = 0;
    }
    this.db
      .transaction(() => {
        const anchor = readAnchor(this.db);
        const fd = openSync(this.path, constants.O_RDWR | constants.O_CREAT | constants.O_APPEND | constants.O_NOFOLLOW, 0o600);
        try {
          const { head, torn } = fileHead(fd, this.key);
          // Continue from the file's last authentic line unless the file lost lines the vault
          // remembers: then from the anchor, so that the gap shows in `audit verify`.
          let { seq, mac } = head && head.seq >= anchor.seq ? head : anchor;
          const lines: string[] = torn ? [''] : [];
          for (const { time, event } of batch) {
            const formatted = formatLine(this.key, ++seq, time, event, mac);
            lines.push(formatted.line);
            mac = formatted.mac;
          }
          const bytes = Buffer.from(lines.join('\n') + '\n');
          let written = 0;
          while (written < bytes.length) written += writeSync(fd, bytes, written);
          fsyncSync(fd);
          const upsert = this.db.prepare('INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value');
          upsert.run('audit_seq', seq);
          upsert.run('audit_mac', mac);
        } finally {
          closeSync(fd);
        }
      })
      .immediate();
  }
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
