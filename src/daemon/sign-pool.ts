// Signing threads for slow keys. Measured on 2 cores (bench/, README "Performance"): RSA-3072 signs
// 659/s on the main thread and 1,206/s on two worker threads, while ed25519 and ECDSA gain nothing
// (the message round trip costs as much as the signature). So only RSA goes to the pool.
import type { KeyObject } from 'node:crypto';
import { cpus } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { SignatureAlgorithm } from '../agent-protocol/signature.js';
import type { SignJob, SignReply } from './sign-worker.js';

interface Thread {
  worker: Worker;
  /** Fingerprints whose KeyObject this thread already holds. */
  holds: Set<string>;
  busy: number;
}

export class SignPool {
  private readonly threads: Thread[];
  private readonly waiting = new Map<number, { resolve: (sig: Buffer) => void; reject: (err: Error) => void }>();
  private nextId = 1;

  constructor(size = Math.max(1, Math.min(4, cpus().length))) {
    this.threads = Array.from({ length: size }, () => {
      const worker = new Worker(new URL('./sign-worker.js', import.meta.url));
      worker.unref();
      const thread: Thread = { worker, holds: new Set(), busy: 0 };
      worker.on('message', (reply: SignReply) => {
        thread.busy--;
        const waiter = this.waiting.get(reply.id);
        if (!waiter) return;
        this.waiting.delete(reply.id);
        if (reply.signature) waiter.resolve(Buffer.from(reply.signature.buffer, reply.signature.byteOffset, reply.signature.byteLength));
        else waiter.reject(new Error(reply.error ?? 'signing failed'));
      });
      worker.on('error', () => {
        /* a failed job is answered with an error above; a dead thread fails its waiters at close */
      });
      return thread;
    });
  }

  private inlineTaken = false;
  private readonly endTurn = () => {
    this.inlineTaken = false;
  };

  /**
   * Whether a signature should go to a thread. A lone request signs inline (the thread hop only
   * adds latency, and at 1×1 the bench shows it); once the threads are busy, or a second request
   * arrives in the same turn of the event loop, the work spreads over the threads.
   */
  offload(): boolean {
    if (this.inlineTaken || this.threads.some((t) => t.busy > 0)) return true;
    this.inlineTaken = true;
    setImmediate(this.endTurn);
    return false;
  }

  sign(fingerprint: string, key: KeyObject, algorithm: SignatureAlgorithm, data: Buffer): Promise<Buffer> {
    const thread = this.threads.reduce((a, b) => (b.busy < a.busy ? b : a));
    const id = this.nextId++;
    // A copy of exactly the data: a view would send its whole backing buffer (a socket chunk).
    const job: SignJob = { id, fingerprint, algorithm, data: new Uint8Array(data) };
    if (!thread.holds.has(fingerprint)) {
      job.key = key;
      thread.holds.add(fingerprint);
    }
    thread.busy++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      thread.worker.postMessage(job);
    });
  }

  /** Lock: every thread drops the keys it holds. */
  clear(): void {
    for (const thread of this.threads) {
      thread.worker.postMessage({ clear: true });
      thread.holds.clear();
    }
  }

  async close(): Promise<void> {
    for (const waiter of this.waiting.values()) waiter.reject(new Error('daemon stopping'));
    this.waiting.clear();
    await Promise.all(this.threads.map((t) => t.worker.terminate()));
  }
}
