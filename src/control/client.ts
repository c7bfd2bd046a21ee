// The CLI's end of the control socket.
import { existsSync, lstatSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { FrameReader } from '../agent-protocol/framing.js';
import { EXIT, KeyholdError } from '../errors.js';
import { peerCredentials } from '../libc.js';
import { ensurePrivateDir } from '../runtime-dir.js';
import {
  CONTROL_MAX_REPLY,
  controlSocketPath,
  decodeMessage,
  encodeMessage,
  errorFromResponse,
  type ControlResponse,
  type DaemonStatus,
} from './protocol.js';
import { parseControlRequest, type ControlRequest } from './requests.js';

const CALL_TIMEOUT_MS = 120_000;

export class ControlClient {
  /** Replies come from our own daemon and may carry many 1 MiB secrets; requests stay bounded. */
  private readonly reader = new FrameReader(CONTROL_MAX_REPLY);
  private queue: Promise<unknown> = Promise.resolve();
  private waiting: { resolve: (r: ControlResponse) => void; reject: (e: Error) => void } | null = null;
  private closedError: Error | null = null;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      try {
        this.reader.push(chunk, (payload) => {
          const waiting = this.waiting;
          this.waiting = null;
          waiting?.resolve(decodeMessage(payload) as ControlResponse);
        });
      } catch (err) {
        this.fail(new KeyholdError(`bad reply from the daemon: ${(err as Error).message}`));
      }
    });
    socket.on('error', (err) => this.fail(new KeyholdError(`lost the daemon: ${err.message}`)));
    socket.on('close', () => this.fail(new KeyholdError('the daemon closed the control connection', 'see its log; is it still running?')));
  }

  /**
   * Connects to the daemon of `runtime`, or returns null when none runs there. The runtime dir
   * must be private and the daemon must be our own uid (or root): never hand a secret to an
   * impostor listening on a shared path.
   */
  static async connect(runtime: string): Promise<ControlClient | null> {
    if (!existsSync(runtime)) return null;
    ensurePrivateDir(runtime);
    const path = controlSocketPath(runtime);
    try {
      if (!lstatSync(path).isSocket()) return null;
    } catch {
      return null;
    }
    const socket = await new Promise<Socket | null>((resolve) => {
      const s = connect(path);
      const timer = setTimeout(() => {
        s.destroy();
        resolve(null);
      }, 5_000);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', () => {
        clearTimeout(timer);
        resolve(null);
      });
    });
    if (!socket) return null;
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    const cred = typeof fd === 'number' && fd >= 0 ? peerCredentials(fd) : null;
    if (!cred || (cred.uid !== process.getuid!() && cred.uid !== 0)) {
      socket.destroy();
      throw new KeyholdError(`the control socket ${path} belongs to another user`, 'check the runtime dir');
    }
    return new ControlClient(socket);
  }

  /**
   * Sends a request and returns its result; a daemon-side error is rethrown as a KeyholdError. The
   * request is checked against the schema the daemon applies, so a bad one fails here, unsent.
   */
  call<T = unknown>(request: ControlRequest): Promise<T> {
    const run = async (): Promise<T> => {
      if (this.closedError) throw this.closedError;
      const checked = parseControlRequest(request);
      const response = await new Promise<ControlResponse>((resolve, reject) => {
        const timer = setTimeout(() => reject(new KeyholdError('the daemon did not answer in time', 'see its log')), CALL_TIMEOUT_MS);
        this.waiting = {
          resolve: (r) => {
            clearTimeout(timer);
            resolve(r);
          },
          reject: (e) => {
            clearTimeout(timer);
            reject(e);
          },
        };
        this.socket.write(encodeMessage(checked));
      });
      if (!response || typeof response !== 'object' || typeof response.ok !== 'boolean') {
        throw new KeyholdError('bad reply from the daemon');
      }
      if (!response.ok) throw errorFromResponse(response.error);
      return response.result as T;
    };
    const result = this.queue.then(run, run);
    this.queue = result.catch(() => undefined);
    return result;
  }

  status(): Promise<DaemonStatus> {
    return this.call<DaemonStatus>({ op: 'status' });
  }

  close(): void {
    this.closedError ??= new KeyholdError('control connection closed');
    this.socket.destroy();
  }

  private fail(err: Error): void {
    if (!this.closedError) this.closedError = err;
    this.socket.destroy();
    const waiting = this.waiting;
    this.waiting = null;
    waiting?.reject(err);
  }
}

/** The daemon of `runtime` if it runs and serves the vault `vaultId`, else null. */
export async function daemonFor(runtime: string, vaultId: string): Promise<{ client: ControlClient; status: DaemonStatus } | null> {
  const client = await ControlClient.connect(runtime);
  if (!client) return null;
  try {
    const status = await client.status();
    if (status.vault_id === vaultId) return { client, status };
  } catch {
    /* fall through: an unusable daemon is no daemon */
  }
  client.close();
  return null;
}

export const lockedError = () =>
  new KeyholdError('the vault is locked', 'unlock it with `keyhold unlock`', EXIT.LOCKED);
