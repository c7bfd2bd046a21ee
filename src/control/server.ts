// The daemon's end of the control socket: 0600 in the private runtime dir, peers checked with
// SO_PEERCRED (our uid or root), one request at a time per connection, every failure answered.
import type { Server, Socket } from 'node:net';
import type { Logger } from 'pino';
import { FrameReader } from '../agent-protocol/framing.js';
import { usageError } from '../errors.js';
import { listenUnix, sameUserOrRoot, type ConnectionLimit } from '../signer/unix-listener.js';
import type { Peer } from '../signer/backend.js';
import { VAULT_METHODS } from '../vault/api.js';
import { CONTROL_MAX_FRAME, decodeMessage, encodeMessage, errorResponse, type ControlRequest } from './protocol.js';

export type ControlHandler = (request: ControlRequest, peer: Peer) => Promise<unknown>;

const IDLE_TIMEOUT_MS = 10 * 60_000;

/** Checks the shape of a decoded request; the handler can trust `op` and the types it names. */
export function parseControlRequest(value: unknown): ControlRequest {
  const bad = (what: string) => usageError(`bad control request: ${what}`);
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw bad('not an object');
  const r = value as Record<string, unknown>;
  switch (r.op) {
    case 'status':
    case 'lock':
      return { op: r.op };
    case 'unlock': {
      if (typeof r.vaultId !== 'string') throw bad('vaultId');
      if (r.keks === null || typeof r.keks !== 'object') throw bad('keks');
      const keks: Record<string, Buffer> = Object.create(null);
      for (const [id, kek] of Object.entries(r.keks as object)) {
        if (!Buffer.isBuffer(kek) || kek.length !== 32) throw bad('keks');
        keks[id] = kek;
      }
      const duration = (v: unknown) => v === undefined || v === null || (typeof v === 'number' && Number.isSafeInteger(v) && v > 0);
      if (!duration(r.idleMs) || !duration(r.ttlMs)) throw bad('durations');
      return { op: 'unlock', vaultId: r.vaultId, keks, idleMs: (r.idleMs as number | null) ?? null, ttlMs: (r.ttlMs as number | null) ?? null };
    }
    case 'call':
      if (typeof r.vaultId !== 'string') throw bad('vaultId');
      if (typeof r.method !== 'string' || !(VAULT_METHODS as readonly string[]).includes(r.method)) throw bad('unknown method');
      if (!Array.isArray(r.args) || r.args.length > 8) throw bad('args');
      return { op: 'call', vaultId: r.vaultId, method: r.method, args: r.args };
    default:
      throw bad('unknown op');
  }
}

function serveControlConnection(socket: Socket, peer: Peer, handle: ControlHandler, log: Logger): void {
  const reader = new FrameReader(CONTROL_MAX_FRAME);
  let queue: Promise<void> = Promise.resolve();
  socket.setTimeout(IDLE_TIMEOUT_MS, () => socket.destroy());
  socket.on('error', () => {});
  socket.on('data', (chunk: Buffer) => {
    try {
      reader.push(chunk, (payload) => {
        const copy = Buffer.from(payload);
        queue = queue.then(async () => {
          let response;
          try {
            const request = parseControlRequest(decodeMessage(copy));
            response = { ok: true, result: (await handle(request, peer)) ?? null };
          } catch (err) {
            // Only the kind of an unexpected failure is logged: its message may quote the request,
            // which can hold a KEK or a secret value.
            if (err instanceof SyntaxError) err = usageError('bad control request: not JSON');
            else if (!(err instanceof Error && err.name === 'KeyholdError')) {
              log.error({ error: (err as Error).name, code: (err as NodeJS.ErrnoException).code }, 'control request failed');
            }
            response = errorResponse(err);
          } finally {
            copy.fill(0);
          }
          if (!socket.destroyed) socket.write(encodeMessage(response));
        });
      });
    } catch {
      socket.destroy();
    }
  });
}

export function listenControl(path: string, options: { log: Logger; limit: ConnectionLimit; handle: ControlHandler }): Promise<Server> {
  return listenUnix({
    path,
    log: options.log,
    limit: options.limit,
    allowPeer: sameUserOrRoot,
    onConnection: (socket, peer) => serveControlConnection(socket, peer, options.handle, options.log),
  });
}
