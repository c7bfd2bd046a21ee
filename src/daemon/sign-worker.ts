// A signing thread: keeps the KeyObjects it was sent, signs what the daemon's main thread asks.
import { parentPort } from 'node:worker_threads';
import type { KeyObject } from 'node:crypto';
import { signSsh, type SignatureAlgorithm } from '../agent-protocol/signature.js';

export type SignJob = { id: number; fingerprint: string; key?: KeyObject; algorithm: SignatureAlgorithm; data: Uint8Array };
export type SignReply = { id: number; signature?: Uint8Array; error?: string };

const keys = new Map<string, KeyObject>();

parentPort!.on('message', (message: SignJob | { clear: true }) => {
  if ('clear' in message) {
    keys.clear();
    return;
  }
  if (message.key) keys.set(message.fingerprint, message.key);
  const key = keys.get(message.fingerprint);
  let reply: SignReply;
  try {
    if (!key) throw new Error('key not sent');
    reply = { id: message.id, signature: signSsh(key, message.algorithm, Buffer.from(message.data.buffer, message.data.byteOffset, message.data.byteLength)) };
  } catch (err) {
    reply = { id: message.id, error: (err as Error).message };
  }
  parentPort!.postMessage(reply);
});
