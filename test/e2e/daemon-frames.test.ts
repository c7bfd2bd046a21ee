// Hostile and unusual frames on a scope socket of a real `keyhold serve`.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createPublicKey, generateKeyPairSync, verify } from 'node:crypto';
import {
  frameBytes,
  initVault,
  keyholdOk,
  makeKeyholdEnv,
  RawAgentClient,
  startServe,
  stopAllServes,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';
import { identitiesFrame, parseIdentities, readString, signPayload, sshString, u32, verifyEd25519 } from '../helpers/raw-wire.js';

const REQUEST_IDENTITIES = identitiesFrame();
const extension = (name: string, contents: Buffer = Buffer.alloc(0)) => frameBytes(Buffer.concat([Buffer.of(27), sshString(name), contents]));

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('scope socket against hostile frames', () => {
  let k: KeyholdEnv;
  let serve: ServeHandle;
  let keyBlob: Buffer;
  const clients: RawAgentClient[] = [];
  const open = async () => {
    const c = await RawAgentClient.connect(serve.socket('web'));
    clients.push(c);
    return c;
  };

  /** A fresh client still gets the scope's identities: the daemon survived. */
  const expectDaemonServes = async () => {
    expect(serve.proc.exitCode).toBeNull();
    const c = await open();
    c.send(REQUEST_IDENTITIES);
    const ids = parseIdentities(await c.reply());
    expect(ids.map((i) => i.comment)).toEqual(['frames-key']);
    c.close();
  };

  /** The connection answers a following REQUEST_IDENTITIES: it was not closed. */
  const expectStillAnswers = async (c: RawAgentClient) => {
    c.send(REQUEST_IDENTITIES);
    expect(parseIdentities(await c.reply()).length).toBe(1);
    expect(c.closed).toBe(false);
  };

  beforeAll(async () => {
    k = makeKeyholdEnv('keyhold-daemon-frames-');
    initVault(k);
    const line = keyholdOk(k, ['key', 'generate', 'web', '--comment', 'frames-key']);
    keyBlob = Buffer.from(line.split(' ')[1]!, 'base64');
    serve = await startServe(k);
  });

  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
  });

  afterAll(async () => {
    await stopAllServes();
    k?.cleanup();
  });

  it('a zero-length frame closes the connection with nothing written', async () => {
    const c = await open();
    c.send(u32(0));
    await c.waitClosed(3000);
    expect(c.pendingBytes).toBe(0);
    await expectDaemonServes();
  });

  it('a frame longer than 256 KiB is refused as soon as its header arrives', async () => {
    const c = await open();
    c.send(u32(256 * 1024 + 1)); // 0x00040001, and no body at all
    await c.waitClosed(3000);
    expect(c.pendingBytes).toBe(0);
    const huge = await open();
    huge.send(Buffer.from([0xff, 0xff, 0xff, 0xff]));
    await huge.waitClosed(3000);
    expect(huge.pendingBytes).toBe(0);
    await expectDaemonServes();
  });

  it('a frame of exactly 256 KiB is accepted (an unknown type gets FAILURE)', async () => {
    const c = await open();
    const payload = Buffer.alloc(256 * 1024);
    payload[0] = 0xf0;
    c.send(frameBytes(payload));
    expect([...(await c.reply())]).toEqual([5]);
    await expectStillAnswers(c);
  });

  it('a truncated frame keeps the connection open without a reply; completing it gets one', async () => {
    const c = await open();
    const body = Buffer.alloc(100, 0x41);
    body[0] = 11; // REQUEST_IDENTITIES with 99 trailing bytes: malformed once complete
    c.send(Buffer.concat([u32(100), body.subarray(0, 10)]));
    await sleep(300);
    expect(c.pendingBytes).toBe(0);
    expect(c.closed).toBe(false);
    c.send(body.subarray(10));
    expect([...(await c.reply())]).toEqual([5]);
    await expectStillAnswers(c);
    await expectDaemonServes();
  });

  it('an unknown message type gets FAILURE and the connection goes on', async () => {
    const c = await open();
    c.send(frameBytes(Buffer.of(0xff)));
    expect([...(await c.reply())]).toEqual([5]);
    await expectStillAnswers(c);
    await expectDaemonServes();
  });

  it('REQUEST_IDENTITIES with trailing bytes gets FAILURE', async () => {
    const c = await open();
    c.send(frameBytes(Buffer.of(11, 0)));
    expect([...(await c.reply())]).toEqual([5]);
    await expectStillAnswers(c);
  });

  it('a malformed sign request gets FAILURE and the connection goes on', async () => {
    const c = await open();
    // key blob announced as 50 bytes, 2 present
    c.send(frameBytes(Buffer.of(13, 0, 0, 0, 50, 1, 2)));
    expect([...(await c.reply())]).toEqual([5]);
    // complete blob and data but no flags
    c.send(frameBytes(Buffer.concat([Buffer.of(13), sshString(keyBlob), sshString('data')])));
    expect([...(await c.reply())]).toEqual([5]);
    // trailing garbage after the flags
    c.send(frameBytes(Buffer.concat([signPayload(keyBlob, Buffer.from('data')), Buffer.of(0)])));
    expect([...(await c.reply())]).toEqual([5]);
    await expectStillAnswers(c);
    await expectDaemonServes();
  });

  it('a sign request for a key the scope does not hold gets FAILURE', async () => {
    const other = generateKeyPairSync('ed25519').publicKey.export({ format: 'jwk' });
    const foreignBlob = Buffer.concat([sshString('ssh-ed25519'), sshString(Buffer.from(other.x!, 'base64url'))]);
    const c = await open();
    c.send(frameBytes(signPayload(foreignBlob, Buffer.from('data'))));
    expect([...(await c.reply())]).toEqual([5]);
    // a blob that is not even a key
    c.send(frameBytes(signPayload(Buffer.from('garbage'), Buffer.from('data'))));
    expect([...(await c.reply())]).toEqual([5]);
    await expectStillAnswers(c);
    await expectDaemonServes();
  });

  it('frames split byte by byte still get answers', async () => {
    const c = await open();
    const data = Buffer.from('byte by byte');
    const bytes = Buffer.concat([REQUEST_IDENTITIES, frameBytes(signPayload(keyBlob, data))]);
    for (const byte of bytes) {
      c.send(Buffer.of(byte));
      await sleep(1);
    }
    expect(parseIdentities(await c.reply()).length).toBe(1);
    expect(verifyEd25519(keyBlob, data, await c.reply())).toBe(true);
    expect(c.pendingBytes).toBe(0);
  });

  it('pipelined requests in one write are answered in order', async () => {
    const c = await open();
    const d1 = Buffer.from('first');
    const d2 = Buffer.from('second');
    c.send(
      Buffer.concat([
        REQUEST_IDENTITIES,
        frameBytes(Buffer.of(0xfe)),
        frameBytes(signPayload(keyBlob, d1)),
        extension('query'),
        frameBytes(signPayload(keyBlob, d2)),
        REQUEST_IDENTITIES,
      ]),
    );
    expect(parseIdentities(await c.reply()).length).toBe(1);
    expect([...(await c.reply())]).toEqual([5]);
    expect(verifyEd25519(keyBlob, d1, await c.reply())).toBe(true);
    expect((await c.reply())[0]).toBe(29);
    expect(verifyEd25519(keyBlob, d2, await c.reply())).toBe(true);
    expect(parseIdentities(await c.reply()).length).toBe(1);
    await sleep(50);
    expect(c.pendingBytes).toBe(0);
  });

  it('the query extension answers 29 with "query" echoed and lists session-bind@openssh.com', async () => {
    const c = await open();
    c.send(extension('query'));
    const reply = await c.reply();
    expect(reply[0]).toBe(29);
    const [name, off] = readString(reply, 1);
    expect(name.toString()).toBe('query');
    const names: string[] = [];
    let o = off;
    while (o < reply.length) {
      const [n, next] = readString(reply, o);
      names.push(n.toString());
      o = next;
    }
    expect(names).toContain('session-bind@openssh.com');
    await expectStillAnswers(c);
  });

  it('an unknown extension gets FAILURE (5), not EXTENSION_FAILURE', async () => {
    const c = await open();
    c.send(extension('no-such-extension@example.com', sshString('x')));
    expect([...(await c.reply())]).toEqual([5]);
    // an extension message whose name string is truncated is malformed: FAILURE
    c.send(frameBytes(Buffer.of(27, 0, 0, 0, 9, 0x71)));
    expect([...(await c.reply())]).toEqual([5]);
    await expectStillAnswers(c);
    await expectDaemonServes();
  });

  it('a malformed session-bind gets EXTENSION_FAILURE (28) and the connection goes on', async () => {
    const c = await open();
    c.send(extension('session-bind@openssh.com', sshString('not a host key')));
    expect([...(await c.reply())]).toEqual([28]);
    await expectStillAnswers(c);
  });

  it('many hostile connections in a row leave the daemon serving', async () => {
    for (const bytes of [u32(0), u32(0x7fffffff), Buffer.of(0, 0), frameBytes(Buffer.of(13))]) {
      const c = await open();
      c.send(bytes);
      c.close();
    }
    await sleep(100);
    await expectDaemonServes();
  });
});
