// The load generator: the same code drives OpenSSH's ssh-agent and keyhold. N connections each
// keep D sign requests in flight for a fixed time; every reply is timed. Frames are written by
// hand here, independently of keyhold's codec.
import { connect, type Socket } from 'node:net';

export type Endpoint = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number; token: string };

export interface LoadResult {
  signs: number;
  failures: number;
  seconds: number;
  perSecond: number;
  p50Ms: number;
  p99Ms: number;
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}
const sshString = (b: Buffer) => Buffer.concat([u32(b.length), b]);

export function signRequest(keyBlob: Buffer, data: Buffer, flags: number): Buffer {
  const body = Buffer.concat([Buffer.of(13), sshString(keyBlob), sshString(data), u32(flags)]);
  return Buffer.concat([u32(body.length), body]);
}
export const IDENTITIES_REQUEST = Buffer.from([0, 0, 0, 1, 11]);

export function handshake(token: string): Buffer {
  return sshString(Buffer.from(token));
}

export function open(endpoint: Endpoint): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = endpoint.kind === 'unix' ? connect(endpoint.path) : connect({ host: endpoint.host, port: endpoint.port });
    socket.setNoDelay?.(true);
    socket.once('error', reject);
    socket.once('connect', () => {
      socket.off('error', reject);
      if (endpoint.kind === 'tcp') socket.write(handshake(endpoint.token));
      resolve(socket);
    });
  });
}

/** Calls `onReply(type)` for every complete reply frame. */
function replies(socket: Socket, onReply: (type: number) => void): void {
  let pending: Buffer = Buffer.alloc(0);
  socket.on('data', (chunk: Buffer) => {
    pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
    let offset = 0;
    while (pending.length - offset >= 5) {
      const length = pending.readUInt32BE(offset);
      if (pending.length - offset < 4 + length) break;
      onReply(pending[offset + 4]!);
      offset += 4 + length;
    }
    pending = offset === pending.length ? Buffer.alloc(0) : pending.subarray(offset);
  });
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!;
}

/** `connections` × `depth` pipelined sign requests for `seconds`. */
export async function signLoad(endpoint: Endpoint, request: Buffer, connections: number, depth: number, seconds: number): Promise<LoadResult> {
  const sockets = await Promise.all(Array.from({ length: connections }, () => open(endpoint)));
  let latencies = new Float64Array(1 << 16);
  let count = 0;
  let failures = 0;
  const start = process.hrtime.bigint();
  const deadline = start + BigInt(Math.round(seconds * 1e9));
  let stopping = false;
  const done = sockets.map(
    (socket) =>
      new Promise<void>((resolve) => {
        const sentAt: bigint[] = [];
        let head = 0;
        const send = () => {
          sentAt.push(process.hrtime.bigint());
          socket.write(request);
        };
        replies(socket, (type) => {
          const now = process.hrtime.bigint();
          const latency = Number(now - sentAt[head++]!) / 1e6;
          if (head > 4096) {
            sentAt.splice(0, head);
            head = 0;
          }
          if (type === 14) {
            if (count === latencies.length) {
              const grown = new Float64Array(latencies.length * 2);
              grown.set(latencies);
              latencies = grown;
            }
            latencies[count++] = latency;
          } else failures++;
          if (now < deadline && !stopping) send();
          else if (head === sentAt.length) {
            socket.destroy();
            resolve();
          }
        });
        socket.on('close', () => resolve());
        socket.on('error', () => resolve());
        for (let i = 0; i < depth; i++) send();
      }),
  );
  const guard = setTimeout(() => {
    stopping = true;
    for (const s of sockets) s.destroy();
  }, seconds * 1000 + 10_000);
  await Promise.all(done);
  clearTimeout(guard);
  const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  const sorted = latencies.subarray(0, count).sort();
  return { signs: count, failures, seconds: elapsed, perSecond: count / elapsed, p50Ms: percentile(sorted, 0.5), p99Ms: percentile(sorted, 0.99) };
}

/** Fresh connections for `seconds` (4 at a time): connect (+ token handshake), identities, one sign, close. */
export async function freshConnections(endpoint: Endpoint, request: Buffer, seconds: number, parallel = 4): Promise<LoadResult> {
  const deadline = Date.now() + seconds * 1000;
  const latencies: number[] = [];
  let failures = 0;
  const start = process.hrtime.bigint();
  const worker = async () => {
    while (Date.now() < deadline) {
      const t0 = process.hrtime.bigint();
      try {
        const socket = await open(endpoint);
        await new Promise<void>((resolve, reject) => {
          let seen = 0;
          replies(socket, (type) => {
            if (++seen === 2) {
              if (type !== 14) failures++;
              socket.destroy();
              resolve();
            }
          });
          socket.once('close', () => (seen < 2 ? reject(new Error('closed early')) : resolve()));
          socket.write(Buffer.concat([IDENTITIES_REQUEST, request]));
        });
        latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
      } catch {
        failures++;
      }
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
  const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  const sorted = Float64Array.from(latencies).sort();
  return { signs: latencies.length, failures, seconds: elapsed, perSecond: latencies.length / elapsed, p50Ms: percentile(sorted, 0.5), p99Ms: percentile(sorted, 0.99) };
}
