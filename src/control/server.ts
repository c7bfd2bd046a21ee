// The daemon's end of the control socket: 0600 in the private runtime dir, peers checked with
// SO_PEERCRED (our uid or root), one request at a time per connection, every failure answered.
import type { Server, Socket } from 'node:net';
import type { Logger } from 'pino';
import { FrameReader } from '../agent-protocol/framing.js';
import { usageError } from '../errors.js';
import { listenUnix, sameUserOrRoot, type ConnectionLimit } from '../signer/unix-listener.js';
import type { Peer } from '../signer/backend.js';
import { CONTROL_MAX_FRAME, decodeMessage, encodeMessage, errorResponse } from './protocol.js';
import { parseControlRequest, type ControlRequest } from './requests.js';

export { parseControlRequest };

export type ControlHandler = (request: ControlRequest, peer: Peer) => Promise<unknown>;

const IDLE_TIMEOUT_MS = 10 * 60_000;

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
