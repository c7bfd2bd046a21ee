// The confirm program, run as OpenSSH runs SSH_ASKPASS for `ssh-add -c` keys: argv[1] is the
// question, SSH_ASKPASS_PROMPT=confirm, exit 0 means yes and anything else no. Never through a
// shell, its output discarded, killed (with whatever it started) once the request is answered
// elsewhere or times out. A program that cannot start abstains; the other channels still count.
// Besides the question it gets the request's parts in KEYHOLD_CONFIRM_* variables, among them the
// process to ask about (what `pkcheck --process` needs: contrib/polkit/keyhold-confirm-polkit).
import { spawn, type ChildProcess } from 'node:child_process';
import type { Logger } from 'pino';
import { oneLine } from '../errors.js';
import { processStartTime } from '../signer/unix-listener.js';
import type { Approver, ConfirmChannel, PendingApproval } from './approvals.js';

/** Programs running at once; further questions wait for a slot (or for their request to end). */
export const MAX_RUNNING_PROGRAMS = 8;
/** After SIGTERM, how long a program (a GUI dialog, say) has to go before SIGKILL. */
const KILL_GRACE_MS = 2_000;
/** Never handed to a child: what could unlock the vault or open a token session. */
const WITHHELD_ENV = ['KEYHOLD_PASSPHRASE', 'KEYHOLD_TOKEN'];
const CONFIRM_ENV_PREFIX = 'KEYHOLD_CONFIRM_';

/** A process as polkit names one (`pkcheck --process`): the start time tells it from a later one with its pid. */
interface ProcessName {
  pid: number;
  startTime: string;
  uid: number;
}

let daemonProcess: ProcessName | null | undefined;
function ownProcess(): ProcessName | null {
  if (daemonProcess === undefined) {
    const startTime = processStartTime(process.pid);
    daemonProcess = startTime ? { pid: process.pid, startTime, uid: process.getuid!() } : null;
  }
  return daemonProcess;
}

/**
 * What a confirm program learns besides the question: the request's parts, one line each (a
 * client chooses the namespace and the key comment), and KEYHOLD_CONFIRM_PROCESS
 * (`pid,start-time,uid`), the process an authorization is asked for. That is the caller when it
 * is a local process of the daemon's own user, named by the start time read when it connected
 * (so a process that reused its pid since is not the one asked about); else (a container token,
 * a TCP peer, a root process on the scope socket) the daemon itself: it acts for its user, who is
 * the one to ask, and a non-root program may only ask polkit about its own user's processes.
 */
export function confirmEnvironment(about: PendingApproval, daemon: ProcessName | null = ownProcess()): Record<string, string> {
  const caller = about.caller;
  const vars: Record<string, string | number | null | undefined> = {
    REQUEST: about.id,
    SCOPE: about.scope,
    KEY: about.key.fingerprint,
    PURPOSE: about.purpose,
    HOST: about.host,
    USER: about.user,
    NAMESPACE: about.namespace,
    RULE: about.rule,
    PID: caller.subject === undefined ? caller.pid : undefined,
    EXE: caller.subject === undefined ? caller.exe : undefined,
    SUBJECT: caller.subject,
    TOKEN_ID: caller.token_id,
  };
  const localCaller =
    caller.subject === undefined && caller.pid !== undefined && caller.start_time !== undefined && caller.uid === process.getuid!();
  const asked: ProcessName | null = localCaller ? { pid: caller.pid!, startTime: caller.start_time!, uid: caller.uid! } : daemon;
  if (asked) vars.PROCESS = `${asked.pid},${asked.startTime},${asked.uid}`;
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(vars)) {
    if (value !== undefined && value !== null) env[CONFIRM_ENV_PREFIX + name] = oneLine(String(value));
  }
  return env;
}

/**
 * The program to use: the configured one; else `$SSH_ASKPASS` when a display is set (as ssh-add
 * does); else none.
 */
export function confirmProgramFor(configured: string | undefined, env: NodeJS.ProcessEnv = process.env): string | null {
  if (configured) return configured;
  if (env.SSH_ASKPASS && (env.DISPLAY || env.WAYLAND_DISPLAY)) return env.SSH_ASKPASS;
  return null;
}

interface Waiting {
  question: string;
  about?: PendingApproval;
  cancelled: AbortSignal;
  resolve(answer: boolean | null): void;
}

export class ConfirmProgram implements ConfirmChannel {
  readonly approver: Approver;
  private running = 0;
  private readonly queue: Waiting[] = [];
  private failureLoggedAt = 0;
  private readonly children = new Set<ChildProcess>();

  constructor(
    readonly path: string,
    private readonly log: Logger,
    private readonly maxRunning = MAX_RUNNING_PROGRAMS,
  ) {
    this.approver = { channel: 'program', program: path };
  }

  ask(question: string, cancelled: AbortSignal, about?: PendingApproval): Promise<boolean | null> {
    if (cancelled.aborted) return Promise.resolve(null);
    return new Promise((resolve) => {
      const waiting: Waiting = { question, cancelled, resolve, ...(about ? { about } : {}) };
      if (this.running < this.maxRunning) return this.run(waiting);
      this.queue.push(waiting);
      // A request answered while it waits for a slot leaves the queue at once (the queue stays
      // bounded by the requests pending).
      cancelled.addEventListener(
        'abort',
        () => {
          const at = this.queue.indexOf(waiting);
          if (at >= 0) this.queue.splice(at, 1);
          resolve(null);
        },
        { once: true },
      );
    });
  }

  private run(waiting: Waiting): void {
    this.running++;
    let answered = false;
    let released = false;
    let child: ChildProcess | undefined;
    // The answer may come before the program is gone (the request was answered elsewhere and the
    // program is being killed): its slot is released only when it has exited.
    const answer = (value: boolean | null) => {
      if (answered) return;
      answered = true;
      waiting.cancelled.removeEventListener('abort', cancel);
      waiting.resolve(value);
    };
    const release = () => {
      if (released) return;
      released = true;
      if (child) this.children.delete(child);
      this.running--;
      this.next();
    };
    const cancel = () => {
      answer(null);
      killGroup(child);
    };
    const env: NodeJS.ProcessEnv = { ...process.env, SSH_ASKPASS_PROMPT: 'confirm' };
    for (const name of WITHHELD_ENV) delete env[name];
    // Only this request's parts: none inherited from whoever started the daemon.
    for (const name of Object.keys(env)) if (name.startsWith(CONFIRM_ENV_PREFIX)) delete env[name];
    if (waiting.about) Object.assign(env, confirmEnvironment(waiting.about));
    try {
      // Its own process group, so that what it starts (a shell script's sleep, a dialog) is killed with it.
      child = spawn(this.path, [waiting.question], { stdio: 'ignore', env, detached: true });
    } catch (err) {
      this.cannotRun(err as NodeJS.ErrnoException);
      answer(null);
      return release();
    }
    this.children.add(child);
    // 'error' may come more than once (a failed spawn, then a failed kill): every one is handled.
    child.on('error', (err: NodeJS.ErrnoException) => {
      this.cannotRun(err);
      answer(null);
      if (child!.pid === undefined) release();
    });
    child.once('exit', (code) => {
      answer(code === 0);
      release();
    });
    waiting.cancelled.addEventListener('abort', cancel, { once: true });
  }

  /** The daemon stops: every program still running is killed at once, with what it started. */
  close(): void {
    for (const child of this.children) killGroup(child, 'SIGKILL');
    for (const waiting of this.queue.splice(0)) waiting.resolve(null);
  }

  private next(): void {
    while (this.running < this.maxRunning && this.queue.length > 0) {
      const waiting = this.queue.shift()!;
      if (!waiting.cancelled.aborted) this.run(waiting);
    }
  }

  /** Said once a minute, not once a request. */
  private cannotRun(err: NodeJS.ErrnoException): void {
    if (Date.now() - this.failureLoggedAt < 60_000) return;
    this.failureLoggedAt = Date.now();
    this.log.error({ program: this.path, code: err.code ?? err.name }, 'cannot run the confirm program; confirmations wait for `keyhold approve`');
  }
}

function killGroup(child: ChildProcess | undefined, first: NodeJS.Signals = 'SIGTERM'): void {
  const pid = child?.pid;
  if (!child || pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  const signal = (name: NodeJS.Signals) => {
    try {
      process.kill(-pid, name);
    } catch {
      /* already gone */
    }
  };
  signal(first);
  if (first === 'SIGKILL') return;
  const timer = setTimeout(() => signal('SIGKILL'), KILL_GRACE_MS);
  timer.unref();
  child.once('exit', () => clearTimeout(timer));
}
