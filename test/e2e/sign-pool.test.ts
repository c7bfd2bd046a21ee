// RSA signatures are made on signing threads; replies must still come back in request order,
// mixed with inline (ed25519) ones and with identities, and a lock must take the keys away.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { verifySsh } from '../../src/agent-protocol/signature.js';
import { frameBytes, keyhold, keyholdOk, makeKeyholdEnv, RawAgentClient, startServe, stopAllServes, type KeyholdEnv } from '../helpers/keyhold.js';

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};
const str = (b: Buffer) => Buffer.concat([u32(b.length), b]);
const signFrame = (blob: Buffer, data: Buffer, flags: number) => frameBytes(Buffer.concat([Buffer.of(13), str(blob), str(data), u32(flags)]));
const signatureOf = (payload: Buffer) => payload.subarray(5, 5 + payload.readUInt32BE(1));

describe('signing threads', () => {
  let k: KeyholdEnv;
  let rsa: Buffer;
  let ed: Buffer;
  beforeAll(async () => {
    k = makeKeyholdEnv('keyhold-pool-');
    keyholdOk(k, ['init']);
    rsa = Buffer.from(keyholdOk(k, ['key', 'generate', 'web', '--type', 'rsa', '--bits', '2048']).split(' ')[1]!, 'base64');
    ed = Buffer.from(keyholdOk(k, ['key', 'generate', 'web']).split(' ')[1]!, 'base64');
    await startServe(k);
  });
  afterAll(async () => {
    await stopAllServes();
    k.cleanup();
  });

  it('pipelined RSA, ed25519 and identities requests are answered in order, every signature verifies', async () => {
    const client = await RawAgentClient.connect(join(k.runtime, 'scopes', 'web.sock'));
    const requests: { kind: 'rsa' | 'ed' | 'ids'; data: Buffer }[] = [];
    for (let i = 0; i < 40; i++) {
      const kind = (['rsa', 'ed', 'ids', 'rsa', 'rsa', 'ed'] as const)[i % 6]!;
      requests.push({ kind, data: Buffer.from(`message ${i}`) });
    }
    client.send(
      Buffer.concat(
        requests.map((r) => (r.kind === 'ids' ? frameBytes(Buffer.of(11)) : signFrame(r.kind === 'rsa' ? rsa : ed, r.data, r.kind === 'rsa' ? 4 : 0))),
      ),
    );
    for (const request of requests) {
      const reply = await client.reply();
      if (request.kind === 'ids') {
        expect(reply[0]).toBe(12);
        continue;
      }
      expect(reply[0], `${request.kind} ${request.data}`).toBe(14);
      const blob = request.kind === 'rsa' ? rsa : ed;
      expect(verifySsh(blob, signatureOf(reply), request.data), `${request.kind} ${request.data}`).toBe(true);
      // A reply for the wrong request (out of order) would not verify over this data.
    }
    client.close();
  });

  it('a one-shot client that writes 3 RSA sign requests and half-closes gets its 3 signatures, then EOF', async () => {
    const client = await RawAgentClient.connect(join(k.runtime, 'scopes', 'web.sock'));
    const data = [1, 2, 3].map((i) => Buffer.from(`one-shot ${i}`));
    client.send(Buffer.concat(data.map((d) => signFrame(rsa, d, 4))));
    client.end();
    await client.waitClosed(10_000);
    expect(client.frames).toHaveLength(3);
    client.frames.forEach((reply, i) => {
      expect(reply[0]).toBe(14);
      expect(verifySsh(rsa, signatureOf(reply), data[i]!)).toBe(true);
    });
  });

  const socat = spawnSync('socat', ['-V'], { stdio: 'ignore' }).status === 0;
  it.skipIf(!socat)('socat piping RSA sign requests gets every signature (it half-closes at the end of its input)', () => {
    const data = [1, 2].map((i) => Buffer.from(`socat ${i}`));
    const result = spawnSync('socat', ['-t', '10', 'STDIO', `UNIX-CONNECT:${join(k.runtime, 'scopes', 'web.sock')}`], {
      input: Buffer.concat(data.map((d) => signFrame(rsa, d, 4))),
      timeout: 15_000,
    });
    expect(result.status, result.stderr.toString()).toBe(0);
    const out = result.stdout;
    let offset = 0;
    for (const d of data) {
      const length = out.readUInt32BE(offset);
      const reply = out.subarray(offset + 4, offset + 4 + length);
      expect(reply[0]).toBe(14);
      expect(verifySsh(rsa, signatureOf(reply), d)).toBe(true);
      offset += 4 + length;
    }
    expect(offset).toBe(out.length);
  });

  it('after lock, an RSA sign request fails; after unlock it signs again on the threads', async () => {
    const socket = join(k.runtime, 'scopes', 'web.sock');
    keyholdOk(k, ['lock']);
    const locked = await RawAgentClient.connect(socket);
    locked.send(signFrame(rsa, Buffer.from('x'), 4));
    expect((await locked.reply())[0]).toBe(5);
    locked.close();
    expect(keyhold(k, ['unlock']).status).toBe(0);
    const again = await RawAgentClient.connect(socket);
    again.send(signFrame(rsa, Buffer.from('y'), 4));
    const reply = await again.reply();
    expect(reply[0]).toBe(14);
    expect(verifySsh(rsa, signatureOf(reply), Buffer.from('y'))).toBe(true);
    again.close();
    expect(readFileSync(`${k.vault}.audit.jsonl`, 'utf8')).toContain('"algorithm":"rsa-sha2-512"');
  });
});
