// The confirm program, run as OpenSSH runs SSH_ASKPASS for `ssh-add -c` keys: argv[1] is the
// question, SSH_ASKPASS_PROMPT=confirm, exit 0 means yes and anything else no. Never through a
// shell, its output discarded, killed (with whatever it started) once the request is answered
// elsewhere or times out. A program that cannot start abstains; the other channels still count.
import { spawn, type ChildProcess } from 'node:child_process';
import type { Logger } from 'pino';
import type { Approver, ConfirmChannel } from './approvals.js';

/** Programs running at once; further questions wait for a slot (or for their request to end). */
export const MAX_RUNNING_PROGRAMS = 8;
/** After SIGTERM, how long a program (a GUI dialog, say) has to go before SIGKILL. */
const KILL_GRACE_MS = 2_000;
/** Never handed to a child: what could unlock the vault or open a token session. */
const WITHHELD_ENV = ['KEYHOLD_PASSPHRASE', 'KEYHOLD_TOKEN'];

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

  ask(question: string, cancelled: AbortSignal): Promise<boolean | null> {
    if (cancelled.aborted) return Promise.resolve(null);
    return new Promise((resolve) => {
      const waiting: Waiting = { question, cancelled, resolve };
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
