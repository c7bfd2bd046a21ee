// A client for another SSH agent (the operator's, at SSH_AUTH_SOCK), over keyhold's own codec.
// One request at a time; every wait is bounded.
import { connect, type Socket } from 'node:net';
import { frame, FrameReader } from './agent-protocol/framing.js';
import { encodeRequest, parseResponse, type AgentRequest, type AgentResponse, type Identity } from './agent-protocol/messages.js';

export class AgentClientError extends Error {
  override name = 'AgentClientError';
}

export class AgentClient {
  private readonly reader = new FrameReader();
  private pending: { resolve: (r: AgentResponse) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | null = null;
  private failure: Error | null = null;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      try {
        this.reader.push(chunk, (payload) => this.settle(null, parseResponse(payload)));
      } catch (err) {
        this.fail(new AgentClientError(`the agent sent a malformed reply: ${(err as Error).message}`));
      }
    });
    socket.on('error', (err) => this.fail(new AgentClientError(`agent connection failed: ${err.message}`)));
    socket.on('close', () => this.fail(new AgentClientError('the agent closed the connection')));
  }

  /** Connects to the agent socket at `path`; rejects with an AgentClientError naming the cause. */
  static connect(path: string, timeoutMs = 5_000): Promise<AgentClient> {
    return new Promise((resolve, reject) => {
      const socket = connect(path);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new AgentClientError(`no answer from the agent at ${path}`));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve(new AgentClient(socket));
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new AgentClientError(`cannot reach the agent at ${path}: ${err.code ?? err.message}`));
      });
    });
  }

  /**
   * Sends one request and waits for its reply. The timeout is generous because an agent may ask
   * its user to confirm (ssh-add -c) before it signs.
   */
  request(request: AgentRequest, timeoutMs = 60_000): Promise<AgentResponse> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.pending) return Promise.reject(new AgentClientError('one request at a time'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new AgentClientError('the agent did not answer in time')), timeoutMs);
      this.pending = { resolve, reject, timer };
      this.socket.write(frame(encodeRequest(request)));
    });
  }

  async identities(): Promise<Identity[]> {
    const response = await this.request({ type: 'request-identities' });
    if (response.type !== 'identities') throw new AgentClientError('the agent refused to list its keys');
    return response.identities;
  }

  /** The signature blob, or null when the agent answers SSH_AGENT_FAILURE (refused). */
  async sign(keyBlob: Buffer, data: Buffer, flags: number): Promise<Buffer | null> {
    const response = await this.request({ type: 'sign', keyBlob, data, flags });
    if (response.type === 'signature') return response.signature;
    if (response.type === 'failure') return null;
    throw new AgentClientError(`unexpected reply to a sign request: ${response.type}`);
  }

  close(): void {
    this.socket.destroy();
  }

  private settle(err: Error | null, response?: AgentResponse): void {
    const pending = this.pending;
    if (!pending) {
      if (!err) this.fail(new AgentClientError('the agent sent a reply nobody asked for'));
      return;
    }
    this.pending = null;
    clearTimeout(pending.timer);
    if (err) pending.reject(err);
    else pending.resolve(response!);
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.socket.destroy();
    this.settle(err);
  }
}
