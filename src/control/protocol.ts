// The control socket's wire format: frames of `uint32 length` + one JSON document, a request from
// the CLI and a response from the daemon, in turn. Buffers travel as {"$b64": "..."}.
import { join } from 'node:path';
import { frame } from '../agent-protocol/framing.js';
import { EXIT, KeyholdError, usageError, type ExitCode } from '../errors.js';
import type { MemoryKind } from '../platform/secret-memory.js';

export const CONTROL_SOCKET = 'control.sock';
/** Large enough for a 1 MiB value in base64 plus its envelope. */
export const CONTROL_MAX_FRAME = 4 * 1024 * 1024;
export const CONTROL_MAX_REPLY = 1024 * 1024 * 1024;

export const controlSocketPath = (runtime: string) => join(runtime, CONTROL_SOCKET);

export interface LockTimers {
  /** Lock after this long without a request; null: never. */
  idleMs: number | null;
  /** Lock this long after unlocking, whatever the activity; null: never. */
  ttlMs: number | null;
}

/** The requests, and their schemas, are in requests.ts. */
export type { ControlRequest } from './requests.js';

export interface DaemonStatus {
  pid: number;
  vault: string;
  vault_id: string;
  locked: boolean;
  unlocked_at: string | null;
  /** The absolute deadline (--ttl / --lock-after), if any. */
  lock_at: string | null;
  /** The inactivity limit (--idle / --idle-lock) in milliseconds, if any. */
  idle_ms: number | null;
  /** When the idle limit locks if nothing happens before. */
  idle_lock_at: string | null;
  sockets: string[];
  /** Until when a restarted daemon comes back unlocked (`unlock --remember`); null: it does not. */
  remembered_until: string | null;
  /** Where the master key and KEKs live (platform/secret-memory.ts): memfd_secret, mlock'ed, or ordinary memory. */
  memory: MemoryKind;
}

export type ControlResponse =
  | { ok: true; result: unknown }
  | { ok: false; error: { message: string; hint?: string; exitCode: number } };

const MAX_DEPTH = 32;

/** Replaces Buffers by {$b64} (and undefined array items by {$undefined}) so that JSON keeps them exact. */
export function toWire(value: unknown, depth = 0): unknown {
  if (depth > MAX_DEPTH) throw usageError('value nested too deeply');
  if (Buffer.isBuffer(value)) return { $b64: value.toString('base64') };
  // An omitted argument must stay omitted (JSON would make it null).
  if (Array.isArray(value)) return value.map((v) => (v === undefined ? { $undefined: true } : toWire(v, depth + 1)));
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) if (v !== undefined) out[k] = toWire(v, depth + 1);
    return out;
  }
  return value;
}

export function fromWire(value: unknown, depth = 0): unknown {
  if (depth > MAX_DEPTH) throw usageError('value nested too deeply');
  if (Array.isArray(value)) return value.map((v) => fromWire(v, depth + 1));
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value);
    // Canonical base64 only; any other spelling stays an object, which no schema takes for bytes.
    if (entries.length === 1 && entries[0]![0] === '$b64' && typeof entries[0]![1] === 'string') {
      const bytes = Buffer.from(entries[0]![1], 'base64');
      if (bytes.toString('base64') === entries[0]![1]) return bytes;
    }
    if (entries.length === 1 && entries[0]![0] === '$undefined' && entries[0]![1] === true) return undefined;
    const out: Record<string, unknown> = Object.create(null);
    for (const [k, v] of entries) out[k] = fromWire(v, depth + 1);
    return out;
  }
  return value;
}

export function encodeMessage(value: unknown): Buffer {
  return frame(Buffer.from(JSON.stringify(toWire(value))));
}

export function decodeMessage(payload: Buffer): unknown {
  return fromWire(JSON.parse(payload.toString('utf8')));
}

export function errorResponse(err: unknown): ControlResponse {
  if (err instanceof KeyholdError) {
    return { ok: false, error: { message: err.message, ...(err.hint ? { hint: err.hint } : {}), exitCode: err.exitCode } };
  }
  return { ok: false, error: { message: `daemon error: ${err instanceof Error ? err.message : String(err)}`, exitCode: EXIT.ERROR } };
}

export function errorFromResponse(error: { message: string; hint?: string; exitCode: number }): KeyholdError {
  // A failure is never 0; anything outside the contract's codes is a plain error.
  const codes = (Object.values(EXIT) as number[]).filter((c) => c !== EXIT.OK);
  const exitCode = (codes.includes(error.exitCode) ? error.exitCode : EXIT.ERROR) as ExitCode;
  return new KeyholdError(String(error.message), error.hint === undefined ? undefined : String(error.hint), exitCode);
}
