// `keyhold approvals`, `approve ID [--remember D]`, `deny ID` and `approve --watch`: the control
// socket's channel for confirmations. Any terminal of the user can answer; the first answer wins.
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import type { Argv } from 'yargs';
import { ControlClient } from '../control/client.js';
import { parseDuration } from '../duration.js';
import { EXIT, KeyholdError, oneLine, usageError } from '../errors.js';
import { describeQuestion, type PendingApproval } from '../policy/approvals.js';
import { runtimeDir } from '../runtime-dir.js';
import { readKeyring } from '../vault/keyring.js';
import { vaultPaths } from '../vault/paths.js';
import { printJson, printLines, table, type GlobalArgs } from './common.js';

/** How long one `--watch` poll waits for a change before asking again. */
const WATCH_POLL_MS = 25_000;

/**
 * The daemon of this runtime dir; exit 3 when none runs. When this vault's key file can be read,
 * the daemon must serve this vault (another one's requests are not ours to answer).
 */
async function connect(args: GlobalArgs): Promise<ControlClient> {
  const runtime = runtimeDir();
  const client = await ControlClient.connect(runtime);
  if (!client) throw new KeyholdError('no daemon is running', 'start one with `keyhold serve` or `keyhold unlock`; nothing waits for a confirmation', EXIT.LOCKED);
  try {
    const status = await client.status();
    const keys = vaultPaths(args.vault).keys;
    const vaultId = existsSync(keys) ? readKeyring(keys).vault_id : null;
    if (vaultId !== null && status.vault_id !== vaultId) {
      throw new KeyholdError(`the daemon in ${runtime} (pid ${status.pid}) serves another vault, ${status.vault}`, 'set KEYHOLD_RUNTIME_DIR to reach the daemon of this vault');
    }
  } catch (err) {
    client.close();
    throw err;
  }
  return client;
}

async function withDaemon<T>(args: GlobalArgs, fn: (client: ControlClient) => Promise<T>): Promise<T> {
  const client = await connect(args);
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

type ApprovalList = { version: number; approvals: PendingApproval[] };

function target(a: PendingApproval): string {
  if (a.purpose === 'ssh-login') return `${a.user !== undefined ? `${a.user}@` : ''}${a.host ?? '?'}`;
  if (a.purpose === 'sshsig') return `namespace ${a.namespace ?? '?'}`;
  return '-';
}

function caller(a: PendingApproval): string {
  const c = a.caller;
  if (c.subject !== undefined) return `token ${c.token_id ?? '?'} (${c.subject})`;
  return `${c.exe ?? '?'} (pid ${c.pid ?? '?'})`;
}

function waiting(a: PendingApproval, now = Date.now()): string {
  const since = Math.max(0, Math.round((now - Date.parse(a.created)) / 1000));
  const left = Math.max(0, Math.round((Date.parse(a.deadline) - now) / 1000));
  return `${since}s (${left}s left)`;
}

function rows(list: PendingApproval[]): string[] {
  return table(
    ['ID', 'SCOPE', 'KEY', 'PURPOSE', 'HOST/NAMESPACE', 'CALLER', 'WAITING'],
    list.map((a) => [a.id, a.scope, a.key.fingerprint, a.purpose, target(a), caller(a), waiting(a)].map(oneLine)),
  );
}

export function approvalsCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'approvals',
    'sign requests waiting for a confirmation (answer with `keyhold approve ID` or `keyhold deny ID`)',
    (c) => c,
    async (args) => {
      const { approvals } = await withDaemon(args, (client) => client.call<ApprovalList>({ op: 'approvals' }));
      if (args.json) return printJson(approvals);
      if (approvals.length === 0) return void process.stderr.write('keyhold: no request waits for a confirmation\n');
      printLines(rows(approvals));
    },
  );
}

export function approveCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'approve [id]',
    'approve a waiting sign request; --watch asks y/n for each new one on this terminal',
    (c) =>
      c
        .positional('id', { type: 'string', describe: 'the request, as `keyhold approvals` lists it' })
        .option('remember', { type: 'string', describe: 'also approve this process (or token), key and rule for this long (10m, 1h)' })
        .option('watch', { type: 'boolean', default: false, describe: 'ask for each new request until end of input or Ctrl-C' }),
    async (args) => {
      const rememberMs = args.remember === undefined ? undefined : parseDuration(args.remember, '--remember');
      if (args.watch) {
        if (args.id !== undefined) throw usageError('approve --watch takes no request id', 'run `keyhold approve --watch` alone');
        return watch(args, rememberMs);
      }
      if (args.id === undefined) throw usageError('name the request to approve', 'see `keyhold approvals`, or use `keyhold approve --watch`');
      const id = args.id;
      const result = await withDaemon(args, (client) => client.call({ op: 'approve', id, ...(rememberMs !== undefined ? { rememberMs } : {}) }));
      if (args.json) printJson(result);
      else process.stdout.write(`approved ${oneLine(id)}\n`);
    },
  );
}

export function denyCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'deny <id>',
    'refuse a waiting sign request',
    (c) => c.positional('id', { type: 'string', demandOption: true, describe: 'the request, as `keyhold approvals` lists it' }),
    async (args) => {
      const id = args.id;
      const result = await withDaemon(args, (client) => client.call({ op: 'deny', id }));
      if (args.json) printJson(result);
      else process.stdout.write(`denied ${oneLine(id)}\n`);
    },
  );
}

/**
 * Reads answers one line at a time (a terminal, or lines piped in). Piped lines are kept for the
 * next questions; on a terminal, what was typed before a question is dropped. Once input ends and
 * no line is left, watching ends.
 */
class Answers {
  private readonly lines: string[] = [];
  private ended = false;
  private waiter: (() => void) | null = null;
  private readonly rl = createInterface({ input: process.stdin });

  constructor(onEnd: () => void) {
    this.rl.on('line', (line) => {
      this.lines.push(line);
      this.wake();
    });
    this.rl.on('close', () => {
      this.ended = true;
      this.wake();
      if (this.lines.length === 0) onEnd();
    });
  }

  /**
   * Forgets lines typed before a question was shown (on a terminal): a stray `y`, or a paste, must
   * not answer a request the user has not seen yet. Piped answers are meant in order, and kept.
   */
  discardTypedAhead(): void {
    if (process.stdin.isTTY) this.lines.length = 0;
  }

  /** The next line, or null at the end of input. */
  async next(): Promise<string | null> {
    while (this.lines.length === 0 && !this.ended) await new Promise<void>((resolve) => (this.waiter = resolve));
    return this.lines.shift() ?? null;
  }

  /** Input has ended and every line was used. */
  get done(): boolean {
    return this.ended && this.lines.length === 0;
  }

  close(): void {
    this.rl.close();
    process.stdin.destroy();
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.();
  }
}

async function watch(args: GlobalArgs, rememberMs: number | undefined): Promise<void> {
  const client = await connect(args);
  let stopped = false;
  const stop = () => {
    stopped = true;
    client.close(); // ends a poll in progress
  };
  const answers = new Answers(stop);
  process.once('SIGINT', stop);
  process.stderr.write('keyhold: asking for each request that waits for a confirmation (end of input or Ctrl-C stops)\n');
  const asked = new Set<string>();
  let version: number | undefined;
  try {
    while (!stopped && !answers.done) {
      let list: ApprovalList;
      try {
        list = await client.call<ApprovalList>({ op: 'approvals', ...(version !== undefined ? { after: version, waitMs: WATCH_POLL_MS } : {}) });
      } catch (err) {
        if (stopped) break;
        throw err;
      }
      version = list.version;
      // Forget requests no longer listed: the set stays as small as the daemon's list.
      const listed = new Set(list.approvals.map((a) => a.id));
      for (const id of asked) if (!listed.has(id)) asked.delete(id);
      for (const approval of list.approvals) {
        if (stopped || asked.has(approval.id)) continue;
        asked.add(approval.id);
        if (Date.parse(approval.deadline) <= Date.now()) continue;
        answers.discardTypedAhead();
        process.stdout.write(`${describeQuestion(approval)}\napprove ${approval.id}? [y/N] `);
        const line = await answers.next();
        if (line === null || stopped) {
          process.stdout.write('\n');
          break;
        }
        const yes = /^\s*y(es)?\s*$/i.test(line);
        try {
          await client.call(yes ? { op: 'approve', id: approval.id, ...(rememberMs !== undefined ? { rememberMs } : {}) } : { op: 'deny', id: approval.id });
          process.stdout.write(`${yes ? 'approved' : 'denied'} ${approval.id}\n`);
        } catch (err) {
          if (stopped) break;
          if (!(err instanceof KeyholdError && err.exitCode === EXIT.NOT_FOUND)) throw err;
          process.stdout.write(`${approval.id} no longer waits (answered elsewhere, timed out or withdrawn)\n`);
        }
      }
    }
  } finally {
    process.removeListener('SIGINT', stop);
    answers.close();
    client.close();
  }
}
