// A running `keyhold serve` follows changes made by other processes (the CLI) without a restart:
// new scopes get sockets, removed/unassigned keys vanish from open connections, and a scope that
// loses its last key keeps its socket (no identities) while the daemon runs.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPublicKey, verify } from 'node:crypto';
import { existsSync } from 'node:fs';
import {
  frameBytes,
  initVault,
  keyhold,
  keyholdOk,
  makeKeyholdEnv,
  RawAgentClient,
  startServe,
  stopAllServes,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';
import { identitiesFrame, parseIdentities, signRequestFrame, verifyEd25519 } from '../helpers/raw-wire.js';

const REQUEST_IDENTITIES = identitiesFrame();
const signRequest = signRequestFrame;
const blobOfLine = (line: string) => Buffer.from(line.trim().split(' ')[1]!, 'base64');

async function identities(client: RawAgentClient) {
  client.send(REQUEST_IDENTITIES);
  return parseIdentities(await client.reply());
}

/** Polls (bounded) until `check` holds; returns the elapsed milliseconds. */
async function within(ms: number, check: () => boolean, what: string): Promise<number> {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > ms) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return Date.now() - start;
}

function fingerprintOf(k: KeyholdEnv, line: string): string {
  const keys = JSON.parse(keyholdOk(k, ['key', 'list', '--json'])) as { fingerprint: string; public: string }[];
  const found = keys.find((key) => key.public.split(' ')[1] === line.trim().split(' ')[1]);
  if (!found) throw new Error(`key ${line} not listed`);
  return found.fingerprint;
}

describe('daemon follows vault changes live', () => {
  let k: KeyholdEnv;
  let serve: ServeHandle;
  const clients: RawAgentClient[] = [];
  const open = async (scope: string) => {
    const c = await RawAgentClient.connect(serve.socket(scope));
    clients.push(c);
    return c;
  };

  beforeAll(async () => {
    k = makeKeyholdEnv('keyhold-daemon-live-');
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web', '--comment', 'web-keep']);
    serve = await startServe(k);
  });

  afterAll(async () => {
    for (const c of clients) c.close();
    await stopAllServes();
    k?.cleanup();
  });

  it('a key generated in a new scope gets a socket within 1 s that offers that key', async () => {
    const sock = serve.socket('newscope');
    expect(existsSync(sock)).toBe(false);
    const line = keyholdOk(k, ['key', 'generate', 'newscope', '--comment', 'fresh-scope-key']);
    await within(1000, () => existsSync(sock), 'newscope.sock appears');
    const c = await open('newscope');
    const ids = await identities(c);
    expect(ids.map((i) => i.comment)).toEqual(['fresh-scope-key']);
    expect(ids[0]!.blob.equals(blobOfLine(line))).toBe(true);
    // and it signs with it
    const data = Buffer.from('live data');
    c.send(signRequest(ids[0]!.blob, data));
    expect(verifyEd25519(ids[0]!.blob, data, await c.reply())).toBe(true);
  });

  it('`key rm` by another process takes the key off an already-open connection', async () => {
    const line = keyholdOk(k, ['key', 'generate', 'web', '--comment', 'web-doomed']);
    const blob = blobOfLine(line);
    const fp = fingerprintOf(k, line);
    const c = await open('web');
    const before = await identities(c);
    expect(before.map((i) => i.comment).sort()).toEqual(['web-doomed', 'web-keep']);
    const data = Buffer.from('before rm');
    c.send(signRequest(blob, data));
    expect(verifyEd25519(blob, data, await c.reply())).toBe(true);

    keyholdOk(k, ['key', 'rm', fp]);

    const after = await identities(c);
    expect(after.map((i) => i.comment)).toEqual(['web-keep']);
    expect(after.some((i) => i.blob.equals(blob))).toBe(false);
    c.send(signRequest(blob, Buffer.from('after rm')));
    expect([...(await c.reply())]).toEqual([5]);
    expect(c.closed).toBe(false);
  });

  it('`key unassign` takes the key off that scope only, on an open connection', async () => {
    const line = keyholdOk(k, ['key', 'generate', 'web', '--comment', 'web-shared']);
    const blob = blobOfLine(line);
    const fp = fingerprintOf(k, line);
    keyholdOk(k, ['key', 'assign', 'shared', fp]);
    await within(1000, () => existsSync(serve.socket('shared')), 'shared.sock appears');
    const c = await open('web');
    expect((await identities(c)).some((i) => i.blob.equals(blob))).toBe(true);

    keyholdOk(k, ['key', 'unassign', 'web', fp]);

    expect((await identities(c)).some((i) => i.blob.equals(blob))).toBe(false);
    c.send(signRequest(blob, Buffer.from('after unassign')));
    expect([...(await c.reply())]).toEqual([5]);
    // still offered and usable in the other scope
    const s = await open('shared');
    const ids = await identities(s);
    expect(ids.map((i) => i.comment)).toEqual(['web-shared']);
    const data = Buffer.from('shared scope');
    s.send(signRequest(blob, data));
    expect(verifyEd25519(blob, data, await s.reply())).toBe(true);
  });

  it('a scope that loses its last key keeps its socket, which answers no identities until a key comes back', async () => {
    const line = keyholdOk(k, ['key', 'generate', 'lonely', '--comment', 'lonely-key']);
    const fp = fingerprintOf(k, line);
    const sock = serve.socket('lonely');
    await within(1000, () => existsSync(sock), 'lonely.sock appears');
    const c = await open('lonely');
    expect((await identities(c)).length).toBe(1);

    keyholdOk(k, ['key', 'unassign', 'lonely', fp]);
    // the open connection and a new one both get an empty answer; the path stays
    expect(await identities(c)).toEqual([]);
    const fresh = await open('lonely');
    expect(await identities(fresh)).toEqual([]);
    expect(existsSync(sock)).toBe(true);

    // assigned again, the same socket offers it again; deleting its only key (`key rm`) empties it again
    keyholdOk(k, ['key', 'assign', 'lonely', fp]);
    expect((await identities(c)).map((i) => i.comment)).toEqual(['lonely-key']);
    keyholdOk(k, ['key', 'rm', fp]);
    expect(await identities(c)).toEqual([]);
    await new Promise((r) => setTimeout(r, 600)); // past a few scope syncs
    expect(existsSync(sock)).toBe(true);
    expect(keyhold(k, ['key', 'pub', 'lonely']).status).toBe(5);
    // the other scopes are untouched
    const w = await open('web');
    expect((await identities(w)).map((i) => i.comment)).toContain('web-keep');
  });

  it('emptying a scope while a client holds a connection to it does not stall later changes', async () => {
    const line = keyholdOk(k, ['key', 'generate', 'held', '--comment', 'held-key']);
    const fp = fingerprintOf(k, line);
    const sock = serve.socket('held');
    await within(1000, () => existsSync(sock), 'held.sock appears');
    const c = await open('held'); // an idle client (e.g. a long-running ssh) keeps this open
    expect((await identities(c)).length).toBe(1);

    keyholdOk(k, ['key', 'rm', fp]);
    // the open connection stays, and no longer offers the deleted key
    expect(await identities(c)).toEqual([]);
    expect(c.closed).toBe(false);

    // a later change must still be picked up while that connection stays open
    const later = keyholdOk(k, ['key', 'generate', 'afterheld', '--comment', 'after-held']);
    await within(1200, () => existsSync(serve.socket('afterheld')), 'afterheld.sock appears while a client of a removed scope is connected');
    const a = await open('afterheld');
    expect((await identities(a))[0]!.blob.equals(blobOfLine(later))).toBe(true);
  });
});
