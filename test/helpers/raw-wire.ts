// Hand-written agent wire bytes and raw connections for tests that talk to a real daemon.
// Deliberately independent of src/agent-protocol: these encoders and decoders are a second,
// separate reading of the protocol, so a bug in the production codec cannot hide itself here.
import { spawn } from 'node:child_process';
import { createPublicKey, verify } from 'node:crypto';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { expect } from 'vitest';

// ---------------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------------

/** uint32, big-endian (wraps like `n >>> 0`). */
export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** SSH string: uint32 length + bytes. */
export function sshString(b: Buffer | string): Buffer {
  const bytes = typeof b === 'string' ? Buffer.from(b) : b;
  return Buffer.concat([u32(bytes.length), bytes]);
}

/** uint32 length + payload (an agent frame, or a control-socket frame). */
export function frame(payload: Buffer): Buffer {
  return Buffer.concat([u32(payload.length), payload]);
}

/** SSH_AGENTC_REQUEST_IDENTITIES, framed. */
export function identitiesFrame(): Buffer {
  return frame(Buffer.of(11));
}

/** SSH_AGENTC_SIGN_REQUEST payload (not framed). */
export function signPayload(blob: Buffer, data: Buffer, flags = 0): Buffer {
  return Buffer.concat([Buffer.of(13), sshString(blob), sshString(data), u32(flags)]);
}

/** SSH_AGENTC_SIGN_REQUEST, framed. */
export function signRequestFrame(blob: Buffer, data: Buffer, flags = 0): Buffer {
  return frame(signPayload(blob, data, flags));
}

/** The token listener's handshake: uint32 n + the token's bytes. */
export function tokenHandshake(token: string | Buffer): Buffer {
  return sshString(token);
}

// ---------------------------------------------------------------------------------------------
// Decoders
// ---------------------------------------------------------------------------------------------

/** An SSH string at `offset`: its bytes and the offset after it. */
export function readString(buf: Buffer, offset: number): [Buffer, number] {
  if (offset + 4 > buf.length) throw new Error('truncated length in reply');
  const len = buf.readUInt32BE(offset);
  if (offset + 4 + len > buf.length) throw new Error('truncated string in reply');
  return [buf.subarray(offset + 4, offset + 4 + len), offset + 4 + len];
}

/** SSH_AGENT_IDENTITIES_ANSWER payload (asserts its type and that nothing trails). */
export function parseIdentities(payload: Buffer): { blob: Buffer; comment: string }[] {
  expect(payload[0], 'IDENTITIES_ANSWER').toBe(12);
  const count = payload.readUInt32BE(1);
  let off = 5;
  const out: { blob: Buffer; comment: string }[] = [];
  for (let i = 0; i < count; i++) {
    const [blob, o1] = readString(payload, off);
    const [comment, o2] = readString(payload, o1);
    out.push({ blob: Buffer.from(blob), comment: comment.toString() });
    off = o2;
  }
  expect(off).toBe(payload.length);
  return out;
}

/** Verifies an SSH_AGENT_SIGN_RESPONSE payload for an ed25519 key blob with node:crypto. */
export function verifyEd25519(blob: Buffer, data: Buffer, reply: Buffer): boolean {
  expect(reply[0], 'SIGN_RESPONSE').toBe(14);
  const [sigBlob] = readString(reply, 1);
  const [alg, o] = readString(sigBlob, 0);
  expect(alg.toString()).toBe('ssh-ed25519');
  const [sig] = readString(sigBlob, o);
  const [, ko] = readString(blob, 0);
  const [raw] = readString(blob, ko);
  const key = createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') }, format: 'jwk' });
  return verify(null, data, key, sig);
}

// ---------------------------------------------------------------------------------------------
// A raw connection (Unix or TCP on 127.0.0.1) with event-driven waits
// ---------------------------------------------------------------------------------------------

export type Target = { kind: 'tcp'; port: number; localAddress?: string } | { kind: 'unix'; path: string };

/** Send bytes, read framed replies, see whether the peer closed the connection. */
export class RawConn {
  private buffer: Buffer = Buffer.alloc(0);
  /** Every complete frame (payload) received so far, in order; `reply()` reads them in turn. */
  readonly frames: Buffer[] = [];
  private nextRead = 0;
  /** Bytes received in total. */
  received = 0;
  closed = false;
  /** Appended to the errors of `reply()` (e.g. the daemon's log). */
  context: () => string = () => '';
  private readonly waiters = new Set<() => void>();

  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.received += d.length;
      this.buffer = this.buffer.length === 0 ? d : Buffer.concat([this.buffer, d]);
      while (this.buffer.length >= 4 && this.buffer.length >= 4 + this.buffer.readUInt32BE(0)) {
        const length = this.buffer.readUInt32BE(0);
        this.frames.push(Buffer.from(this.buffer.subarray(4, 4 + length)));
        this.buffer = this.buffer.subarray(4 + length);
      }
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => {});
  }

  /** Connects; rejects on a connect error or after `timeoutMs` (null: no connect timeout). */
  static open(target: Target, timeoutMs: number | null = 5000): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const socket =
        target.kind === 'tcp'
          ? connect({ host: '127.0.0.1', port: target.port, ...(target.localAddress ? { localAddress: target.localAddress } : {}) })
          : connect(target.path);
      const timer =
        timeoutMs === null
          ? undefined
          : setTimeout(() => {
              socket.destroy();
              reject(new Error('connect timed out'));
            }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new RawConn(socket));
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
  }

  /** A Unix socket, no connect timeout. */
  static connect(path: string): Promise<RawConn> {
    return RawConn.open({ kind: 'unix', path }, null);
  }

  private wake(): void {
    for (const w of [...this.waiters]) w();
  }

  /** Waits (on socket events, not by polling) until `pred` holds. */
  async until(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (frames ${this.frames.length}, closed ${this.closed})`);
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.waiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, left);
        this.waiters.add(done);
      });
    }
  }

  /** Next reply payload (type byte + body); throws if the connection closes first or after the timeout. */
  async reply(timeoutMs = 5000): Promise<Buffer> {
    await this.until(() => this.frames.length > this.nextRead || this.closed, timeoutMs, 'agent reply');
    if (this.frames.length <= this.nextRead) throw new Error(`connection closed without a reply${this.context()}`);
    return this.frames[this.nextRead++]!;
  }

  /** Same as `reply()`. */
  nextFrame(timeoutMs = 5000): Promise<Buffer> {
    return this.reply(timeoutMs);
  }

  /** Bytes of an incomplete frame. */
  get pending(): number {
    return this.buffer.length;
  }

  /** Bytes received and not yet read by `reply()`: unread complete frames plus an incomplete one. */
  get pendingBytes(): number {
    let n = this.buffer.length;
    for (let i = this.nextRead; i < this.frames.length; i++) n += 4 + this.frames[i]!.length;
    return n;
  }

  /** Throws unless the peer closes the connection within `timeoutMs`. */
  async waitClosed(timeoutMs = 5000): Promise<void> {
    await this.until(() => this.closed, timeoutMs, 'the daemon to close the connection');
  }

  /** Whether the peer closed the connection within `timeoutMs`. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    try {
      await this.waitClosed(timeoutMs);
      return true;
    } catch {
      return false;
    }
  }

  send(bytes: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  /** Half-close: no more bytes from us (the peer then sees EOF). */
  end(): void {
    if (!this.socket.destroyed) this.socket.end();
  }

  close(): void {
    this.socket.destroy();
  }
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

// ---------------------------------------------------------------------------------------------
// Connecting as another user
// ---------------------------------------------------------------------------------------------

/** Connects to argv[1], sends the bytes given in hex (argv[2]), reports what came back; gives up after argv[3] ms. */
const CLIENT_SCRIPT = `
const net = require('node:net');
const out = { uid: process.getuid(), connected: false, bytes: '', closed: false, error: null };
const s = net.connect(process.argv[1]);
const done = () => { process.stdout.write(JSON.stringify(out)); process.exit(0); };
s.on('connect', () => { out.connected = true; s.write(Buffer.from(process.argv[2], 'hex')); });
s.on('data', (d) => { out.bytes += d.toString('hex'); });
s.on('error', (e) => { out.error = e.code || e.message; });
s.on('close', () => { out.closed = true; setTimeout(done, 50); });
setTimeout(done, Number(process.argv[3]));
`;

export interface ClientReport {
  uid: number;
  connected: boolean;
  /** Hex of every byte received. */
  bytes: string;
  closed: boolean;
  error: string | null;
}

/** In a child process running as `uid` (gid too; needs root): connect to `path`, send `bytes`, report. */
export function connectAs(uid: number, path: string, bytes: Buffer = identitiesFrame(), giveUpMs = 3000): Promise<ClientReport> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', CLIENT_SCRIPT, path, bytes.toString('hex'), String(giveUpMs)], {
      uid,
      gid: uid,
      cwd: '/',
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      try {
        resolve(JSON.parse(stdout) as ClientReport);
      } catch {
        reject(new Error(`client as uid ${uid} exited ${code}: ${stdout} ${stderr}`));
      }
    });
  });
}
