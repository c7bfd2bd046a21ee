// `keyhold audit tail` reads the log file (it holds no secret); `keyhold audit verify` needs the
// vault's key, so it runs where the vault is open: here, or in an unlocked daemon.
import { closeSync, openSync, readSync, statSync } from 'node:fs';
import type { Argv } from 'yargs';
import { KeyholdError, usageError } from '../errors.js';
import { readAuditLog, type AuditEntry } from '../audit/audit-log.js';
import { vaultPaths } from '../vault/paths.js';
import { printJson, withVault, type GlobalArgs } from './common.js';

function parseEntry(line: string): AuditEntry | null {
  try {
    const entry = JSON.parse(line) as AuditEntry;
    return typeof entry === 'object' && entry !== null ? entry : null;
  } catch {
    return null;
  }
}

function describePeer(peer: AuditEntry['peer']): string {
  if (!peer) return '';
  if (peer.kind === 'tcp') return `${peer.address}:${peer.port}`;
  return `pid ${peer.pid} uid ${peer.uid}${peer.exe ? ` ${peer.exe}` : ''}`;
}

/** `control(pid 123 uid 1000)`, `program(/usr/bin/ssh-askpass)`, `remembered`. */
function describeApprover(by: unknown): string | null {
  if (typeof by !== 'object' || by === null) return null;
  const { channel, pid, uid, program } = by as { channel?: unknown; pid?: unknown; uid?: unknown; program?: unknown };
  if (typeof channel !== 'string') return null;
  if (typeof program === 'string') return `${channel}(${program})`;
  if (pid !== undefined || uid !== undefined) return `${channel}(pid ${String(pid)} uid ${String(uid)})`;
  return channel;
}

/** `"ID" serial N`, from an entry's certificate object. */
function describeCertificate(certificate: unknown): string | null {
  if (typeof certificate !== 'object' || certificate === null) return null;
  const { key_id: keyId, serial } = certificate as { key_id?: unknown; serial?: unknown };
  if (typeof keyId !== 'string') return null;
  return `${JSON.stringify(keyId)}${typeof serial === 'string' ? ` serial ${serial}` : ''}`;
}

/** One line per entry, like a log: time, event, then what it concerns. */
function humanLine(entry: AuditEntry): string {
  const parts = [entry.time, String(entry.seq).padStart(6), entry.event];
  if (entry.scope) parts.push(`scope=${entry.scope}`);
  if (entry.fingerprint) parts.push(entry.fingerprint);
  if (entry.user) parts.push(`user=${entry.user}`);
  if (entry.host_key) parts.push(`host=${entry.host_key}`);
  if (entry.token_id) parts.push(`token=${entry.token_id}`);
  if (entry.name) parts.push(`name=${entry.name}`);
  if (entry.names) parts.push(`names=${entry.names.join(',')}`);
  if (entry.factor) parts.push(`factor=${entry.factor}`);
  if (entry.reason) parts.push(`reason=${JSON.stringify(entry.reason)}`);
  if (typeof entry.decision === 'string') parts.push(`decision=${entry.decision}`);
  if (entry.rule !== undefined) parts.push(`rule=${String(entry.rule)}`);
  if (typeof entry.purpose === 'string') parts.push(`purpose=${entry.purpose}`);
  if (typeof entry.namespace === 'string') parts.push(`namespace=${JSON.stringify(entry.namespace)}`);
  // Why ssh-add's destination constraint refused a request, and what a constrained add asked for.
  if (typeof entry.detail === 'string') parts.push(`detail=${JSON.stringify(entry.detail)}`);
  const constraints = entry.constraints as { confirm?: unknown; lifetime_s?: unknown; hosts?: unknown } | undefined;
  if (typeof constraints === 'object' && constraints !== null) {
    if (constraints.confirm === true) parts.push('confirm');
    if (typeof constraints.lifetime_s === 'number') parts.push(`lifetime=${constraints.lifetime_s}s`);
    if (Array.isArray(constraints.hosts)) parts.push(`hosts=${JSON.stringify(constraints.hosts.map(String).join(','))}`);
  }
  // A certificate (ssh-add'ed, or the host's in a session-bind) by its key id and serial, as sshd logs it.
  const certificate = describeCertificate(entry.certificate);
  if (certificate) parts.push(`cert=${certificate}`);
  const hostCertificate = describeCertificate(entry.host_certificate);
  if (hostCertificate) parts.push(`host-cert=${hostCertificate}`);
  const approved = describeApprover(entry.approved_by);
  if (approved) parts.push(`approved-by=${approved}`);
  const denied = describeApprover(entry.denied_by);
  if (denied) parts.push(`denied-by=${denied}`);
  const peer = describePeer(entry.peer);
  if (peer) parts.push(`(${peer})`);
  return parts.join(' ');
}

export function auditCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('audit', 'the audit log: who signed what, every change', (y) =>
    y
      .command(
        'tail',
        'print the last entries (needs no unlock)',
        (c) =>
          c
            .option('n', { alias: 'lines', type: 'number', default: 10, describe: 'how many entries' })
            .option('follow', { alias: 'f', type: 'boolean', default: false, describe: 'keep printing new entries' }),
        async (args) => {
          if (!Number.isInteger(args.n) || args.n < 0) throw usageError('-n takes a whole number');
          const path = vaultPaths(args.vault).audit;
          const text = readAuditLog(path);
          const complete = text.endsWith('\n') ? text : text.slice(0, text.lastIndexOf('\n') + 1);
          const entries = complete.split('\n').filter(Boolean).map(parseEntry).filter((e): e is AuditEntry => e !== null);
          const last = args.n === 0 ? [] : entries.slice(-args.n);
          if (!args.follow) {
            if (args.json) return printJson(last);
            for (const entry of last) process.stdout.write(humanLine(entry) + '\n');
            return;
          }
          // Following: one line per entry (JSON lines with --json), until interrupted.
          const print = (entry: AuditEntry) => process.stdout.write((args.json ? JSON.stringify(entry) : humanLine(entry)) + '\n');
          last.forEach(print);
          let offset = Buffer.byteLength(complete);
          let partial = '';
          await new Promise<void>((resolve) => {
            const timer = setInterval(() => {
              let size: number;
              try {
                size = statSync(path).size;
              } catch {
                return;
              }
              if (size < offset) offset = 0; // replaced by a shorter file
              if (size === offset) return;
              const fd = openSync(path, 'r');
              try {
                const chunk = Buffer.alloc(size - offset);
                readSync(fd, chunk, 0, chunk.length, offset);
                offset = size;
                const lines = (partial + chunk.toString('utf8')).split('\n');
                partial = lines.pop() ?? '';
                for (const line of lines) {
                  const entry = line ? parseEntry(line) : null;
                  if (entry) print(entry);
                }
              } finally {
                closeSync(fd);
              }
            }, 250);
            for (const signal of ['SIGINT', 'SIGTERM', 'SIGPIPE'] as const) {
              process.once(signal, () => {
                clearInterval(timer);
                resolve();
              });
            }
            process.stdout.once('error', () => {
              clearInterval(timer);
              resolve();
            });
          });
        },
      )
      .command(
        'verify',
        'check every line against the vault: exit 1 naming the first bad line',
        (c) => c,
        async (args) => {
          const path = vaultPaths(args.vault).audit;
          const result = await withVault(args, (api) => api.verifyAudit());
          if (args.json) printJson({ file: path, ...result });
          else {
            for (const w of result.warnings) process.stderr.write(`keyhold: warning: ${path} line ${w.line}: ${w.reason}\n`);
            if (result.ok) process.stdout.write(`ok: ${result.entries} entries, chained and authentic\n`);
          }
          if (!result.ok) {
            throw new KeyholdError(`${path} line ${result.line}: ${result.reason}`, 'the log was edited, reordered or truncated after it was written');
          }
        },
      )
      .demandCommand(1, 'name an audit command: tail, verify'),
  );
}
