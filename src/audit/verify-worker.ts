// `audit verify` on a thread of its own: reading and checking a log of up to 512 MiB takes
// seconds, and the daemon's event loop must go on answering signatures meanwhile.
import { parentPort, workerData } from 'node:worker_threads';
import { verifyAuditFile, type AuditAnchor, type VerifyResult } from './audit-log.js';

export interface VerifyJob {
  path: string;
  key: Uint8Array;
  anchor: AuditAnchor;
}

export type VerifyReply = { result: VerifyResult } | { error: { message: string; hint?: string } };

const { path, key, anchor } = workerData as VerifyJob;
let reply: VerifyReply;
try {
  reply = { result: verifyAuditFile(path, Buffer.from(key), anchor) };
} catch (err) {
  reply = { error: { message: (err as Error).message, ...((err as { hint?: string }).hint ? { hint: (err as { hint?: string }).hint } : {}) } };
} finally {
  key.fill(0);
}
parentPort!.postMessage(reply);
