// The audit log on its own (formatLine/checkLine/AuditWriter/verifyAuditText) and through a real
// Vault in a temp dir (record/flushAudit/verifyAudit): the chain, the MACs, the vault's anchor, and
// what every kind of tampering (edit, delete, swap, truncate, foreign line, garbage) does to verify.
import fc from 'fast-check';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { createHmac, hkdfSync, randomBytes } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
process.env.KEYHOLD_KDF_LOG2N = '14';
import {
  auditKey,
  AuditWriter,
  checkLine,
  formatLine,
  GENESIS_MAC,
  MAX_PENDING_EVENTS,
  readAnchor,
  verifyAuditText,
  type AuditAnchor,
  type AuditEntry,
  type AuditEvent,
  type VerifyResult,
} from '../../src/audit/audit-log.js';
import { openDatabase, type Db } from '../../src/vault/database.js';
import { passphraseKeks } from '../../src/unlock/passphrase.js';
import { readKeyring, unwrapMasterKey } from '../../src/vault/keyring.js';
import { vaultPaths, type VaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';

const PASS = 'pass';

async function waitFor(check: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
const REPO = resolve(import.meta.dirname, '..', '..');

let dir: string;
let counter = 0;
const open: { vault?: Vault; db?: Db }[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'keyhold-audit-unit-'));
});
afterEach(() => {
  for (const o of open.splice(0)) {
    if (o.vault?.isOpen) o.vault.close();
    if (o.db?.open) o.db.close();
  }
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface TestVault {
  vault: Vault;
  paths: VaultPaths;
  /** The audit MAC key, derived here from the spec (HKDF-SHA256(master, vault_id, 'keyhold-audit-v1')). */
  key: Buffer;
  /** A second connection to the database, to read the anchor. */
  db: Db;
  anchor(): AuditAnchor;
  text(): string;
  lines(): string[];
  write(text: string): void;
}

async function newVault(): Promise<TestVault> {
  const paths = vaultPaths(join(dir, `v${++counter}`, 'vault.db'));
  const vault = await Vault.create(paths, Buffer.from(PASS));
  const keyring = readKeyring(paths.keys);
  const masterKey = unwrapMasterKey(keyring, await passphraseKeks(keyring, Buffer.from(PASS)));
  const key = Buffer.from(hkdfSync('sha256', masterKey, Buffer.from(keyring.vault_id), 'keyhold-audit-v1', 32));
  expect(key.equals(auditKey(masterKey, keyring.vault_id))).toBe(true);
  const db = openDatabase(paths.db, masterKey);
  masterKey.fill(0);
  open.push({ vault, db });
  const text = () => {
    try {
      return readFileSync(paths.audit, 'utf8');
    } catch {
      return '';
    }
  };
  return {
    vault,
    paths,
    key,
    db,
    anchor: () => readAnchor(db),
    text,
    lines: () => text().split('\n').filter((l, i, all) => !(l === '' && i === all.length - 1)),
    write: (t) => writeFileSync(paths.audit, t),
  };
}

/** Events with every kind of field the daemon writes. */
function sampleEvents(n: number): AuditEvent[] {
  const kinds: AuditEvent[] = [
    { event: 'sign', scope: 'web', fingerprint: 'SHA256:abc', algorithm: 'ssh-ed25519', data_sha256: 'ab'.repeat(32), user: 'git', host_key: 'SHA256:host', peer: { kind: 'unix', pid: 42, uid: 1000, gid: 1000, exe: '/usr/bin/ssh' } },
    { event: 'sign-refused', scope: 'web', reason: 'unknown-key', peer: { kind: 'tcp', address: '127.0.0.1', port: 5555 } },
    { event: 'secret-read', scope: 'app', names: ['A', 'B'], peer: { kind: 'process', pid: 7, uid: 0, exe: null } },
    { event: 'token-issued', scope: 'ci', token_id: 'tok_123', subject: 'runner "one"' },
    { event: 'secret-set', scope: 'app', name: 'DB_PASSWORD' },
    { event: 'lock', reason: 'idle' },
  ];
  return Array.from({ length: n }, (_, i) => ({ ...kinds[i % kinds.length]!, count: i }));
}

/** The entry as recorded: the event's fields plus seq/time/prev/mac. */
function strip(entry: AuditEntry): AuditEvent {
  const { seq: _s, time: _t, prev: _p, mac: _m, ...rest } = entry;
  return rest;
}

function expectFail(result: VerifyResult, line: number, reason?: RegExp): void {
  expect(result.ok, JSON.stringify(result)).toBe(false);
  if (result.ok) return;
  expect(result.line).toBe(line);
  if (reason) expect(result.reason).toMatch(reason);
}

function expectOk(result: VerifyResult, entries: number): void {
  expect(result.ok, JSON.stringify(result)).toBe(true);
  expect(result.entries).toBe(entries);
}

const join1 = (lines: string[]) => lines.map((l) => `${l}\n`).join('');

// ---------------------------------------------------------------------------------------------

describe('formatLine / checkLine', () => {
  const key = randomBytes(32);

  it('the line is the entry JSON (seq, time, event, fields, prev) with mac = HMAC over the line minus its mac', () => {
    const event: AuditEvent = { event: 'sign', scope: 'web', reason: 'a "quoted"\nnewline ✓ 🔑', peer: { kind: 'tcp', address: '::1', port: 22 } };
    const prev = 'ab'.repeat(32);
    const { line, mac } = formatLine(key, 5, '2024-01-02T03:04:05.000Z', event, prev);
    expect(line).not.toContain('\n');
    const parsed = JSON.parse(line) as Record<string, unknown>;
    expect(Object.keys(parsed)).toEqual(['seq', 'time', 'event', 'scope', 'reason', 'peer', 'prev', 'mac']);
    expect(parsed).toMatchObject({ seq: 5, time: '2024-01-02T03:04:05.000Z', event: 'sign', scope: 'web', reason: event.reason, peer: event.peer, prev, mac });
    const body = line.replace(/,"mac":"[0-9a-f]{64}"\}$/, '}');
    expect(createHmac('sha256', key).update(body).digest('hex')).toBe(mac);

    const check = checkLine(key, line);
    expect(check.ok).toBe(true);
    if (check.ok) expect(strip(check.entry)).toEqual(event);
    expect(checkLine(randomBytes(32), line)).toEqual({ ok: false, reason: expect.stringMatching(/bad mac/) });
  });

  it('checkLine refuses lines without a mac, with an edited body, or a mac of the wrong length', () => {
    const { line } = formatLine(key, 1, new Date().toISOString(), { event: 'lock', reason: 'idle' }, GENESIS_MAC);
    expect(checkLine(key, line.replace('"idle"', '"idlE"')).ok).toBe(false);
    expect(checkLine(key, line.replace(/,"mac":.*$/, '}'))).toEqual({ ok: false, reason: expect.stringMatching(/no mac/) });
    expect(checkLine(key, line.replace(/"\}$/, 'a"}')).ok).toBe(false);
    expect(checkLine(key, 'garbage').ok).toBe(false);
    expect(checkLine(key, '').ok).toBe(false);
  });
});

describe('a written log', () => {
  it('verifies: every mac checks, seq runs 1..N, prev chains, and the anchor is the last line', async () => {
    const t = await newVault();
    const events = sampleEvents(9);
    // Three flushes of three: the chain continues across batches.
    for (let b = 0; b < 3; b++) {
      for (const e of events.slice(b * 3, b * 3 + 3)) t.vault.record(e);
      t.vault.flushAudit();
    }
    const lines = t.lines();
    expect(lines).toHaveLength(9);
    expect(t.text().endsWith('\n')).toBe(true);
    expect(statSync(t.paths.audit).mode & 0o777).toBe(0o600);
    let prev = GENESIS_MAC;
    lines.forEach((line, i) => {
      const body = line.replace(/,"mac":"[0-9a-f]{64}"\}$/, '}');
      expect(body).not.toBe(line);
      const entry = JSON.parse(line) as AuditEntry;
      expect(createHmac('sha256', t.key).update(body).digest('hex')).toBe(entry.mac);
      expect(checkLine(t.key, line).ok).toBe(true);
      expect(entry.seq).toBe(i + 1);
      expect(entry.prev).toBe(prev);
      expect(strip(entry)).toEqual(events[i]);
      expect(Number.isNaN(Date.parse(entry.time))).toBe(false);
      // Reproducible from its parts.
      expect(formatLine(t.key, entry.seq, entry.time, strip(entry), entry.prev).line).toBe(line);
      prev = entry.mac;
    });
    expect(t.anchor()).toEqual({ seq: 9, mac: prev });
    const result = t.vault.verifyAudit();
    expectOk(result, 9);
    expect(result.warnings).toEqual([]);
    expect(verifyAuditText(t.text(), t.key, t.anchor())).toEqual(result);
  });

  it('an empty vault (no log file) verifies with 0 entries; a flush with nothing queued writes nothing', async () => {
    const t = await newVault();
    t.vault.flushAudit();
    expect(t.text()).toBe('');
    expectOk(t.vault.verifyAudit(), 0);
    expect(t.anchor()).toEqual({ seq: 0, mac: GENESIS_MAC });
  });

  it('records keep the time they were given, and are written only at flush or close', async () => {
    const t = await newVault();
    const when = new Date('2020-05-06T07:08:09.010Z');
    t.vault.record({ event: 'lock', reason: 'idle' }, when);
    expect(t.text()).toBe('');
    t.vault.close();
    const [line] = t.lines();
    expect(JSON.parse(line!)).toMatchObject({ seq: 1, time: when.toISOString(), event: 'lock' });
    expect(t.anchor().seq).toBe(1);
  });
});

describe('tampering', () => {
  // One vault with a six-line log; each case writes its tampered text, verifies, and restores.
  let t: TestVault;
  let original: string;
  let lines: string[];
  let other: TestVault;

  beforeAll(async () => {
    t = await newVault();
    for (const e of sampleEvents(6)) t.vault.record(e);
    t.vault.flushAudit();
    original = t.text();
    lines = t.lines();
    other = await newVault();
    for (const e of sampleEvents(6)) other.vault.record(e);
    other.vault.flushAudit();
    // These stay open across the tests of this block.
    open.splice(0);
  });
  afterAll(() => {
    for (const v of [t, other]) {
      v.vault.close();
      v.db.close();
    }
  });
  afterEach(() => t.write(original));

  const verify = () => t.vault.verifyAudit();

  it('the untouched log verifies', () => {
    expectOk(verify(), 6);
  });

  it('one character of a field value changed → fails naming that line (bad mac)', () => {
    const edited = [...lines];
    expect(edited[2]).toContain('"scope":"app"');
    edited[2] = edited[2]!.replace('"scope":"app"', '"scope":"apq"');
    t.write(join1(edited));
    expectFail(verify(), 3, /bad mac/);
    // A digit of a number too.
    const seqEdit = [...lines];
    seqEdit[4] = seqEdit[4]!.replace('"count":4', '"count":5');
    t.write(join1(seqEdit));
    expectFail(verify(), 5, /bad mac/);
  });

  it('the line re-serialized as JSON with one field changed (mac kept) → fails naming that line', () => {
    const edited = [...lines];
    const entry = JSON.parse(edited[3]!) as AuditEntry;
    entry.subject = 'someone else';
    edited[3] = JSON.stringify(entry);
    t.write(join1(edited));
    expectFail(verify(), 4, /bad mac/);
    // Even re-serialized unchanged but with the fields in another order.
    const reordered = [...lines];
    const { mac, event, ...rest } = JSON.parse(reordered[1]!) as AuditEntry;
    reordered[1] = JSON.stringify({ event, ...rest, mac });
    expect(reordered[1]).not.toBe(lines[1]);
    t.write(join1(reordered));
    expectFail(verify(), 2, /bad mac/);
  });

  it('a deleted middle line → fails at the line after the gap', () => {
    t.write(join1([...lines.slice(0, 2), ...lines.slice(3)]));
    expectFail(verify(), 3, /seq 4 where 3 belongs/);
  });

  it('two lines swapped → fails', () => {
    const swapped = [...lines];
    [swapped[1], swapped[2]] = [swapped[2]!, swapped[1]!];
    t.write(join1(swapped));
    expectFail(verify(), 2, /reordered/);
  });

  it('the last line deleted (truncation) → fails: the anchor is missing', () => {
    t.write(join1(lines.slice(0, 5)));
    expectFail(verify(), 6, /truncated: the vault recorded 6 entries, the log has 5/);
    t.write(join1(lines.slice(0, 1)));
    expectFail(verify(), 2, /truncated/);
  });

  it('the whole file emptied → fails (truncated to nothing)', () => {
    t.write('');
    expectFail(verify(), 1, /truncated: the vault recorded 6 entries, the log has 0/);
  });

  it('a line copied from another vault’s log → fails (bad mac), in place of a line or appended', () => {
    const foreign = other.lines();
    expect(foreign[2]).not.toBe(lines[2]);
    const replaced = [...lines];
    replaced[2] = foreign[2]!;
    t.write(join1(replaced));
    expectFail(verify(), 3, /bad mac/);
    t.write(join1([...lines, foreign[5]!]));
    expectFail(verify(), 7, /bad mac/);
    // The whole foreign log.
    t.write(other.text());
    expectFail(verify(), 1, /bad mac/);
  });

  it('a torn last line (no newline, no mac) → ok with a warning naming it; the next writer seals it and goes on', () => {
    const torn = lines[5]!.slice(0, 40);
    t.write(original + torn);
    let r = verify();
    expectOk(r, 6);
    expect(r.warnings).toEqual([{ line: 7, reason: expect.stringMatching(/incomplete last line/) }]);

    t.vault.record({ event: 'unlock', names: ['pp-1'] });
    t.vault.flushAudit();
    const after = t.lines();
    expect(after).toHaveLength(8);
    expect(after[6]).toBe(torn);
    expect(JSON.parse(after[7]!)).toMatchObject({ seq: 7, event: 'unlock', prev: (JSON.parse(lines[5]!) as AuditEntry).mac });
    r = verify();
    expectOk(r, 7);
    expect(r.warnings).toEqual([{ line: 7, reason: expect.stringMatching(/incomplete line/) }]);
    expect(t.anchor().seq).toBe(7);

    // Restore the six-line state for the other cases (the anchor moved to 7: rewind it).
    t.db.prepare(`UPDATE meta SET value = ? WHERE name = 'audit_seq'`).run(6);
    t.db.prepare(`UPDATE meta SET value = ? WHERE name = 'audit_mac'`).run((JSON.parse(lines[5]!) as AuditEntry).mac);
  });

  it('a torn last line on a log that also lost its last real line → still fails (truncated)', () => {
    t.write(join1(lines.slice(0, 5)) + lines[5]!.slice(0, 30));
    expectFail(verify(), 7, /truncated/);
  });

  it('garbage without a mac inserted between lines → a warning, and the chain goes on ok', () => {
    t.write(join1([...lines.slice(0, 3), 'some garbage text {"seq":99', ...lines.slice(3)]));
    const r = verify();
    expectOk(r, 6);
    expect(r.warnings).toEqual([{ line: 4, reason: expect.stringMatching(/incomplete line/) }]);
  });

  it('a valid line replaced by garbage → fails', () => {
    const replaced = [...lines];
    replaced[2] = 'some garbage text';
    t.write(join1(replaced));
    expectFail(verify(), 4, /seq 4 where 3 belongs/);
    // Garbage that carries a well-formed mac suffix is not skipped: it fails at once.
    replaced[2] = `{"seq":3,"event":"lock","prev":"${GENESIS_MAC}","mac":"${'0'.repeat(64)}"}`;
    t.write(join1(replaced));
    expectFail(verify(), 3, /bad mac/);
  });

  it('the last line replaced by garbage → fails (the anchor is gone)', () => {
    t.write(join1([...lines.slice(0, 5), 'garbage']));
    expectFail(verify(), 7, /truncated/);
  });

  it('an entry the vault did not record at the anchor’s seq → fails', () => {
    // A correctly chained and MAC'd line 6 that is not the one the anchor names.
    const entry6 = JSON.parse(lines[5]!) as AuditEntry;
    const forged = formatLine(t.key, 6, entry6.time, { event: 'lock', reason: 'forged' }, entry6.prev).line;
    t.write(join1([...lines.slice(0, 5), forged]));
    expectFail(verify(), 6, /differs from the entry the vault recorded/);
  });
});

describe('several writers on one vault', () => {
  it('two Vault instances (two connections) writing alternately and interleaved → one chain', async () => {
    const t = await newVault();
    const b = await Vault.open(t.paths, async () => Buffer.from(PASS));
    open.push({ vault: b });
    const expected: string[] = [];
    for (let i = 0; i < 10; i++) {
      const w = i % 2 === 0 ? t.vault : b;
      w.record({ event: 'test', name: `alt-${i}` });
      w.flushAudit();
      expected.push(`alt-${i}`);
    }
    // Both queue, then flush in the other order.
    t.vault.record({ event: 'test', name: 'a-1' });
    b.record({ event: 'test', name: 'b-1' });
    t.vault.record({ event: 'test', name: 'a-2' });
    b.record({ event: 'test', name: 'b-2' });
    b.flushAudit();
    t.vault.flushAudit();
    expected.push('b-1', 'b-2', 'a-1', 'a-2');
    const entries = t.lines().map((l) => JSON.parse(l) as AuditEntry);
    expect(entries.map((e) => e.name)).toEqual(expected);
    expect(entries.map((e) => e.seq)).toEqual(expected.map((_, i) => i + 1));
    expectOk(t.vault.verifyAudit(), 14);
    expectOk(b.verifyAudit(), 14);
  });

  it('three processes writing at the same time → one chain with every event once, in each writer’s order', async () => {
    const t = await newVault();
    const perWriter = 60;
    const go = join(dirname(t.paths.db), 'go');
    // Each child opens the vault, says so, waits for the common start, then records and flushes
    // with short random pauses, so that the writers' transactions interleave.
    const script = `
      const { existsSync, writeFileSync } = await import('node:fs');
      const { Vault } = await import(${JSON.stringify(pathToFileURL(join(REPO, 'dist', 'vault', 'vault.js')).href)});
      const { vaultPaths } = await import(${JSON.stringify(pathToFileURL(join(REPO, 'dist', 'vault', 'paths.js')).href)});
      const [db, tag, n, go] = process.argv.slice(1);
      const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
      const v = await Vault.open(vaultPaths(db), async () => Buffer.from(${JSON.stringify(PASS)}));
      writeFileSync(go + '.' + tag, '');
      while (!existsSync(go)) await sleep(2);
      for (let i = 0; i < Number(n); i++) {
        v.record({ event: 'test', name: tag + '-' + i, reason: 'é "q"\\n' });
        if (i % 2 === 1) { v.flushAudit(); await sleep(Math.random() * 4); }
      }
      v.close();
    `;
    const tags = ['p1', 'p2', 'p3'];
    const run = (tag: string) =>
      new Promise<{ code: number | null; stderr: string }>((res) => {
        const child = spawn(process.execPath, ['--input-type=module', '-e', script, t.paths.db, tag, String(perWriter), go], { stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        child.on('close', (code) => res({ code, stderr }));
      });
    const children = Promise.all(tags.map(run));
    await waitFor(() => tags.every((tag) => existsSync(`${go}.${tag}`)), 15_000);
    writeFileSync(go, '');
    // And this process writes too, meanwhile.
    for (let i = 0; i < 20; i++) {
      t.vault.record({ event: 'test', name: `main-${i}` });
      t.vault.flushAudit();
      await new Promise((r) => setTimeout(r, Math.random() * 6));
    }
    for (const r of await children) expect(r.code, r.stderr).toBe(0);
    const entries = t.lines().map((l) => JSON.parse(l) as AuditEntry);
    const total = 3 * perWriter + 20;
    expect(entries).toHaveLength(total);
    expect(entries.map((e) => e.seq)).toEqual(Array.from({ length: total }, (_, i) => i + 1));
    for (const tag of ['p1', 'p2', 'p3', 'main']) {
      const mine = entries.filter((e) => e.name!.startsWith(`${tag}-`)).map((e) => e.name);
      expect(mine).toEqual(Array.from({ length: tag === 'main' ? 20 : perWriter }, (_, i) => `${tag}-${i}`));
    }
    const result = t.vault.verifyAudit();
    expectOk(result, total);
    expect(result.warnings).toEqual([]);
    expect(t.anchor().seq).toBe(total);
  }, 30_000);
});

describe('a log that lost its tail', () => {
  it('then written again: verify reports the gap where the lost lines were', async () => {
    const t = await newVault();
    for (const e of sampleEvents(6)) t.vault.record(e);
    t.vault.flushAudit();
    const lines = t.lines();
    t.write(join1(lines.slice(0, 4)));
    expectFail(t.vault.verifyAudit(), 5, /truncated/);
    t.vault.record({ event: 'lock', reason: 'after the loss' });
    t.vault.flushAudit();
    const after = t.lines();
    expect(after).toHaveLength(5);
    // The writer continued from the anchor (seq 6), not from the file's last line (seq 4).
    expect(JSON.parse(after[4]!)).toMatchObject({ seq: 7, prev: (JSON.parse(lines[5]!) as AuditEntry).mac });
    expectFail(t.vault.verifyAudit(), 5, /seq 7 where 5 belongs/);
  });
});

// ---------------------------------------------------------------------------------------------
// Properties

describe('properties', () => {
  // One database for the anchor; each run writes its own log file and resets the anchor.
  let db: Db;
  let key: Buffer;
  let logDir: string;
  let run = 0;

  beforeAll(async () => {
    const t = await newVault();
    open.splice(0);
    t.vault.close();
    db = t.db;
    key = t.key;
    logDir = join(dir, 'prop-logs');
    mkdirSync(logDir);
  });
  afterAll(() => db.close());

  const resetAnchor = () => db.prepare(`DELETE FROM meta WHERE name IN ('audit_seq', 'audit_mac')`).run();

  const text = fc.oneof(
    fc.string({ unit: 'binary', maxLength: 30 }),
    fc.string({ unit: 'grapheme', maxLength: 20 }),
    fc.constantFrom('', '"', '\\', '\n', '\r\n', '\u2028', '","mac":"' + '0'.repeat(64) + '"}', '}\n{"seq":1', '\u0000', '\ud800', '🔑'),
  );
  const peer = fc.oneof(
    fc.record({ kind: fc.constant('unix' as const), pid: fc.nat(), uid: fc.nat(), gid: fc.nat(), exe: fc.option(text, { nil: null }) }),
    fc.record({ kind: fc.constant('tcp' as const), address: text, port: fc.nat(65535) }),
    fc.record({ kind: fc.constant('process' as const), pid: fc.nat(), uid: fc.nat(), exe: fc.option(text, { nil: null }) }),
  );
  const eventArb: fc.Arbitrary<AuditEvent> = fc.record(
    {
      event: fc.oneof(fc.constantFrom('sign', 'sign-refused', 'secret-read', 'lock'), text),
      scope: text,
      fingerprint: text,
      token_id: text,
      subject: text,
      peer,
      reason: text,
      name: text,
      names: fc.array(text, { maxLength: 4 }),
      count: fc.integer(),
    },
    { requiredKeys: ['event'] },
  );
  /** Batches: each inner array is flushed together. */
  const batchesArb = fc.array(fc.array(eventArb, { minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 4 });

  function writeLog(batches: AuditEvent[][]): string {
    resetAnchor();
    const path = join(logDir, `log-${++run}.jsonl`);
    const writer = new AuditWriter(path, db, key);
    for (const batch of batches) {
      for (const e of batch) writer.record(e);
      writer.flush();
    }
    return path;
  }

  /** The entries of the lines that carry a valid MAC, stripped to their events. */
  function authenticEvents(text: string): AuditEvent[] {
    return text
      .split('\n')
      .map((l) => checkLine(key, l))
      .filter((c): c is { ok: true; entry: AuditEntry } => c.ok)
      .map((c) => strip(c.entry));
  }

  it('any sequence of events (unicode, quotes, newlines, fake mac suffixes in fields) verifies and reads back equal', () => {
    fc.assert(
      fc.property(batchesArb, (batches) => {
        const path = writeLog(batches);
        const content = readFileSync(path, 'utf8');
        const events = batches.flat();
        const lines = content.split('\n');
        expect(lines.pop()).toBe('');
        expect(lines).toHaveLength(events.length);
        const result = verifyAuditText(content, key, readAnchor(db));
        expectOk(result, events.length);
        expect(result.warnings).toEqual([]);
        expect(authenticEvents(content)).toEqual(events);
      }),
      { numRuns: 150 },
    );
  });

  it('any single-byte change of a log → fails, or (if ok) every authentic entry is unchanged and a warning says so', () => {
    fc.assert(
      fc.property(
        batchesArb,
        fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }),
        fc.integer({ min: 1, max: 255 }),
        (batches, where, delta) => {
          const path = writeLog(batches);
          const bytes = readFileSync(path);
          const original = verifyAuditText(bytes.toString('utf8'), key, readAnchor(db));
          expectOk(original, batches.flat().length);
          const at = Math.floor(where * bytes.length);
          const changed = Buffer.from(bytes);
          changed[at] = (changed[at]! + delta) & 0xff;
          const result = verifyAuditText(changed.toString('utf8'), key, readAnchor(db));
          if (result.ok) {
            expect(result.warnings.length).toBeGreaterThan(0);
            expect(authenticEvents(changed.toString('utf8'))).toEqual(batches.flat());
          } else {
            expect(result.line).toBeGreaterThanOrEqual(1);
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  it('every single-byte change at every position of one log fails (exhaustive for a small log)', () => {
    const path = writeLog([[{ event: 'sign', scope: 'wé', reason: 'a\n"b"' }], [{ event: 'lock' }, { event: 'unlock', names: ['x'] }]]);
    const bytes = readFileSync(path);
    const anchor = readAnchor(db);
    const survivors: string[] = [];
    for (let at = 0; at < bytes.length; at++) {
      for (const delta of [1, 0x20, 0x80]) {
        const changed = Buffer.from(bytes);
        changed[at] = (changed[at]! + delta) & 0xff;
        const result = verifyAuditText(changed.toString('utf8'), key, anchor);
        if (result.ok) survivors.push(`byte ${at} +${delta}: ${JSON.stringify(result.warnings)}`);
      }
    }
    expect(survivors).toEqual([]);
  });
});

describe('a crash mid-append', () => {
  it('an appended partial line is sealed by the next flush of another Vault instance', async () => {
    const t = await newVault();
    t.vault.record({ event: 'lock', reason: 'one' });
    t.vault.flushAudit();
    appendFileSync(t.paths.audit, '{"seq":2,"time":"2024-');
    const b = await Vault.open(t.paths, async () => Buffer.from(PASS));
    open.push({ vault: b });
    b.record({ event: 'lock', reason: 'two' });
    b.flushAudit();
    const lines = t.lines();
    expect(lines).toHaveLength(3);
    expect(lines[1]).toBe('{"seq":2,"time":"2024-');
    expect(JSON.parse(lines[2]!)).toMatchObject({ seq: 2, reason: 'two' });
    const r = t.vault.verifyAudit();
    expectOk(r, 2);
    expect(r.warnings).toEqual([{ line: 2, reason: expect.stringMatching(/incomplete/) }]);
  });
});

describe('limits', () => {
  it('more than MAX_PENDING_EVENTS queued → the oldest dropped, and an events-dropped line says how many', async () => {
    const t = await newVault();
    const extra = 5;
    for (let i = 0; i < MAX_PENDING_EVENTS + extra; i++) t.vault.record({ event: 'test', count: i });
    t.vault.flushAudit();
    const entries = t.lines().map((l) => JSON.parse(l) as AuditEntry);
    expect(entries).toHaveLength(MAX_PENDING_EVENTS + 1);
    expect(entries[0]).toMatchObject({ seq: 1, event: 'events-dropped', count: extra });
    expect(entries[1]).toMatchObject({ seq: 2, event: 'test', count: extra });
    expect(entries.at(-1)).toMatchObject({ event: 'test', count: MAX_PENDING_EVENTS + extra - 1 });
    expectOk(t.vault.verifyAudit(), MAX_PENDING_EVENTS + 1);
  });
});

describe('a crash that cut the append just before its final newline', () => {
  // The whole line (mac included) reached the file, the '\n' and the anchor did not. The writer
  // takes the complete line for a torn fragment and writes its seq again after it, while verify
  // counts it as an entry: from then on the log never verifies again.
  it('the next writer continues after the complete last line (or the log stays verifiable)', async () => {
    const t = await newVault();
    for (const e of sampleEvents(3)) t.vault.record(e);
    t.vault.flushAudit();
    const last = JSON.parse(t.lines()[2]!) as AuditEntry;
    const cut = formatLine(t.key, 4, new Date().toISOString(), { event: 'lock', reason: 'cut before newline' }, last.mac).line;
    appendFileSync(t.paths.audit, cut);
    expectOk(t.vault.verifyAudit(), 4);

    t.vault.record({ event: 'unlock', names: ['pp-1'] });
    t.vault.flushAudit();
    const result = t.vault.verifyAudit();
    expect(result, JSON.stringify(result)).toMatchObject({ ok: true });
  });
});

describe('daemon mode: a reply waits for its line, and never gets a line that is not written', () => {
  const quietLog = { error() {}, info() {} };
  const signEvent = (n: number): AuditEvent => ({ event: 'sign', scope: 'web', data_sha256: String(n).padStart(64, '0') });

  it('a turn past MAX_PENDING_EVENTS refuses the newest; every promise that resolved has its line', async () => {
    const t = await newVault();
    t.vault.serveAudit(quietLog);
    const outcomes = await Promise.allSettled(Array.from({ length: MAX_PENDING_EVENTS + 500 }, (_, i) => t.vault.record(signEvent(i), undefined, { signature: true })));
    const resolved = outcomes.flatMap((o, i) => (o.status === 'fulfilled' ? [String(i).padStart(64, '0')] : []));
    expect(resolved.length).toBeLessThanOrEqual(MAX_PENDING_EVENTS);
    expect(outcomes.filter((o) => o.status === 'rejected').length).toBeGreaterThanOrEqual(500);
    const logged = new Set(t.lines().map((l) => (JSON.parse(l) as AuditEntry).data_sha256));
    expect(resolved.filter((d) => !logged.has(d))).toEqual([]);
    t.vault.flushAudit();
    expect(t.vault.verifyAudit().ok).toBe(true);
  });

  it('a lock while the log is held by another process: the waiting signature is refused, kept as a refusal, never released', async () => {
    const t = await newVault();
    t.vault.serveAudit(quietLog);
    await t.vault.record({ event: 'unlock' });
    const holder = spawn('flock', ['-x', t.paths.audit, 'sleep', '1']);
    await new Promise((r) => setTimeout(r, 200));
    const signature = t.vault.record(signEvent(1), undefined, { signature: true });
    const settled = signature.then(() => 'released', () => 'refused');
    expect(() => t.vault.flushAudit()).toThrow(/locked by another process/);
    const kept = t.vault.takeUnwrittenAudit();
    expect(await settled).toBe('refused');
    expect(kept.map((k) => [k.event.event, k.event.reason])).toEqual([['sign-refused', 'audit-unavailable']]);
    await new Promise((r) => holder.once('exit', r));
    expect(t.lines().some((l) => l.includes('"event":"sign"'))).toBe(false);
  });

  it('a flush resolves what a pending turn waited for (its lines are written)', async () => {
    const t = await newVault();
    t.vault.serveAudit(quietLog);
    const waiting = t.vault.record(signEvent(7), undefined, { signature: true });
    t.vault.flushAudit();
    await expect(waiting).resolves.toBeUndefined();
    expect(t.lines().filter((l) => l.includes(String(7).padStart(64, '0')))).toHaveLength(1);
  });
});
