// Sign requests waiting for a human: each one a promise the backend awaits (so every other
// connection is served meanwhile), answered by the first channel that speaks (`keyhold approve` /
// `deny` over the control socket, a confirm program), refused at its deadline, withdrawn when its
// client hangs up. Bounded per peer and in total, so no client can make the daemon hold more.
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { oneLine } from '../errors.js';
import type { Purpose } from './policy.js';

/** Who answered a confirmation (the audit's `approved_by` / `denied_by`). */
export type Approver =
  | { channel: 'control'; pid: number; uid: number }
  | { channel: 'program'; program: string }
  | { channel: 'remembered' };

/** Who asks: a local process, or a container token (its subject and id, never the token). */
export interface Caller {
  pid?: number;
  uid?: number;
  exe?: string | null;
  /** Unix peers: field 22 of /proc/PID/stat when it connected (names that process, not a later one with its pid). */
  start_time?: string;
  subject?: string;
  token_id?: string;
  address?: string;
}

/** What a human is asked about; never the signed data. */
export interface ApprovalQuestion {
  scope: string;
  key: { fingerprint: string; comment: string };
  purpose: Purpose;
  /** ssh-login: the host key's fingerprint. */
  host?: string;
  user?: string;
  /** sshsig: the namespace. */
  namespace?: string;
  /** The rule that asked, numbered from 1, "default", or "ssh-add" (a key added with ssh-add -c). */
  rule: number | 'default' | 'ssh-add';
  caller: Caller;
}

export interface PendingApproval extends ApprovalQuestion {
  id: string;
  created: string;
  deadline: string;
}

export type ApprovalOutcome =
  | { approved: true; by: Approver; rememberMs?: number }
  | { approved: false; reason: 'denied'; by: Approver }
  | { approved: false; reason: 'confirm-timeout' | 'too-many-pending' | 'withdrawn' | 'locked' };

/** A channel besides the control socket: asked once per request; null abstains. */
export interface ConfirmChannel {
  readonly approver: Approver;
  /** `about`: the request the question describes, for a channel that needs its parts (pkcheck needs the process). */
  ask(question: string, cancelled: AbortSignal, about?: PendingApproval): Promise<boolean | null>;
}

export interface ApprovalsOptions {
  timeoutMs: number;
  log: Logger;
  maxPerPeer?: number;
  maxTotal?: number;
  program?: ConfirmChannel | null;
}

export const DEFAULT_CONFIRM_TIMEOUT_MS = 30_000;
/** The longest a request may wait for a confirmation (beyond it a client has long given up). */
export const MAX_CONFIRM_TIMEOUT_MS = 3_600_000;
export const MAX_PENDING_PER_PEER = 4;
export const MAX_PENDING_TOTAL = 64;
/** The longest a control client may wait in one `approvals` long-poll. */
export const MAX_APPROVALS_WAIT_MS = 60_000;

interface Entry {
  pending: PendingApproval;
  peer: string;
  settle(outcome: ApprovalOutcome): void;
}

const BASE32 = 'abcdefghijklmnopqrstuvwxyz234567';

/** 8 base32 characters (40 random bits). */
function approvalId(): string {
  const bytes = randomBytes(5);
  let bits = 0n;
  for (const b of bytes) bits = (bits << 8n) | BigInt(b);
  let id = '';
  for (let i = 7; i >= 0; i--) id += BASE32[Number((bits >> BigInt(i * 5)) & 31n)];
  return id;
}

/** The question as one line: what a confirm program shows and `approve --watch` prints. */
export function describeQuestion(q: ApprovalQuestion & { id?: string }): string {
  const target =
    q.purpose === 'ssh-login'
      ? `an SSH login${q.user !== undefined ? ` as ${q.user}` : ''} to host ${q.host ?? '(unknown host)'}`
      : q.purpose === 'sshsig'
        ? `an ssh-keygen signature in namespace ${q.namespace ?? '(none)'}`
        : 'data that is neither an SSH login nor an ssh-keygen signature';
  const key = `${q.key.fingerprint}${q.key.comment ? ` (${q.key.comment})` : ''}`;
  const c = q.caller;
  const who =
    c.subject !== undefined
      ? `container token ${c.token_id ?? ''} subject ${c.subject}${c.address ? ` at ${c.address}` : ''}${c.pid !== undefined ? ` pid ${c.pid}` : ''}`
      : `${c.exe ?? 'an unknown program'} (pid ${c.pid ?? '?'})`;
  const rule = q.rule === 'default' ? 'the policy default' : q.rule === 'ssh-add' ? 'added with ssh-add -c' : `rule ${q.rule}`;
  return oneLine(`keyhold: allow ${who} to sign ${target} with key ${key} of scope ${q.scope}? (${rule}${q.id ? `, request ${q.id}` : ''})`);
}

export class Approvals {
  private readonly entries = new Map<string, Entry>();
  private readonly perPeer = new Map<string, number>();
  private version = 1;
  private readonly watchers = new Set<() => void>();
  private overflowSaid = false;
  private readonly maxPerPeer: number;
  private readonly maxTotal: number;

  constructor(private readonly options: ApprovalsOptions) {
    this.maxPerPeer = options.maxPerPeer ?? MAX_PENDING_PER_PEER;
    this.maxTotal = options.maxTotal ?? MAX_PENDING_TOTAL;
  }

  get size(): number {
    return this.entries.size;
  }

  /**
   * Waits for an answer to `question`. `peer` names the asking process or token (for the per-peer
   * bound); `hangup` withdraws the request when its client is gone.
   */
  ask(question: ApprovalQuestion, peer: string, hangup?: AbortSignal): Promise<ApprovalOutcome> {
    if (hangup?.aborted) return Promise.resolve({ approved: false, reason: 'withdrawn' });
    const mine = this.perPeer.get(peer) ?? 0;
    if (this.entries.size >= this.maxTotal || mine >= this.maxPerPeer) {
      if (!this.overflowSaid) {
        this.overflowSaid = true;
        this.options.log.warn(
          { pending: this.entries.size, maxTotal: this.maxTotal, maxPerPeer: this.maxPerPeer },
          'too many sign requests wait for a confirmation; refusing more until some are answered',
        );
      }
      return Promise.resolve({ approved: false, reason: 'too-many-pending' });
    }
    let id = approvalId();
    while (this.entries.has(id)) id = approvalId();
    const now = Date.now();
    const pending: PendingApproval = {
      id,
      ...question,
      created: new Date(now).toISOString(),
      deadline: new Date(now + this.options.timeoutMs).toISOString(),
    };
    return new Promise<ApprovalOutcome>((resolve) => {
      const cancelProgram = new AbortController();
      const onHangup = () => entry.settle({ approved: false, reason: 'withdrawn' });
      const timer = setTimeout(() => entry.settle({ approved: false, reason: 'confirm-timeout' }), this.options.timeoutMs);
      timer.unref();
      const entry: Entry = {
        pending,
        peer,
        settle: (outcome) => {
          if (this.entries.get(id) !== entry) return;
          this.entries.delete(id);
          const left = (this.perPeer.get(peer) ?? 1) - 1;
          if (left > 0) this.perPeer.set(peer, left);
          else this.perPeer.delete(peer);
          if (this.entries.size < this.maxTotal) this.overflowSaid = false;
          clearTimeout(timer);
          hangup?.removeEventListener('abort', onHangup);
          cancelProgram.abort();
          this.changed();
          resolve(outcome);
        },
      };
      this.entries.set(id, entry);
      this.perPeer.set(peer, mine + 1);
      hangup?.addEventListener('abort', onHangup, { once: true });
      this.changed();
      const program = this.options.program;
      if (program) {
        program.ask(describeQuestion(pending), cancelProgram.signal, pending).then(
          (answer) => {
            if (answer === true) entry.settle({ approved: true, by: program.approver });
            else if (answer === false) entry.settle({ approved: false, reason: 'denied', by: program.approver });
          },
          () => {
            /* a channel that fails abstains */
          },
        );
      }
    });
  }

  /** False when no request has this id (answered, timed out, withdrawn, or never was). */
  approve(id: string, by: Approver, rememberMs?: number): boolean {
    const entry = this.entries.get(id);
    if (!entry) return false;
    entry.settle({ approved: true, by, ...(rememberMs !== undefined ? { rememberMs } : {}) });
    return true;
  }

  deny(id: string, by: Approver): boolean {
    const entry = this.entries.get(id);
    if (!entry) return false;
    entry.settle({ approved: false, reason: 'denied', by });
    return true;
  }

  /** Every waiting request is refused (the vault was locked, the daemon stops). */
  refuseAll(reason: 'locked' | 'withdrawn'): void {
    for (const entry of [...this.entries.values()]) entry.settle({ approved: false, reason });
  }

  list(): { version: number; approvals: PendingApproval[] } {
    return { version: this.version, approvals: [...this.entries.values()].map((e) => e.pending) };
  }

  /**
   * The list once it differs from version `after` (at once if it already does), or as it is after
   * `waitMs`: a long-poll for `approve --watch`.
   */
  wait(after: number | undefined, waitMs: number): Promise<{ version: number; approvals: PendingApproval[] }> {
    if (after === undefined || after !== this.version || waitMs <= 0) return Promise.resolve(this.list());
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.watchers.delete(done);
        resolve(this.list());
      };
      const timer = setTimeout(done, Math.min(waitMs, MAX_APPROVALS_WAIT_MS));
      timer.unref();
      this.watchers.add(done);
    });
  }

  private changed(): void {
    this.version++;
    for (const watcher of [...this.watchers]) watcher();
  }
}
