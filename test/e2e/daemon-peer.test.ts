// A scope socket serves only the daemon's uid (or root), checked with SO_PEERCRED: opening the
// file mode up does not let another user in.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chmodSync, statSync } from 'node:fs';
import { join } from 'node:path';
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
import { connectAs } from '../helpers/raw-wire.js';

const NOBODY = 65534;

describe('scope socket peer check', () => {
  let k: KeyholdEnv;
  let serve: ServeHandle;

  beforeAll(async () => {
    k = makeKeyholdEnv('keyhold-daemon-peer-');
    initVault(k);
    keyholdOk(k, ['key', 'generate', 'web', '--comment', 'peer-key']);
    serve = await startServe(k);
  });

  afterAll(async () => {
    await stopAllServes();
    k?.cleanup();
  });

  it('refuses a peer of another uid even with the socket opened up to 0666, and still serves root', async () => {
    if (process.getuid!() !== 0) {
      throw new Error(
        `this test must run as root (uid 0) to connect as uid ${NOBODY}; it runs as uid ${process.getuid!()}. CI runs it as root.`,
      );
    }
    const sock = serve.socket('web');
    // The daemon made everything private; open it up so that only SO_PEERCRED stands in the way.
    expect(statSync(sock).mode & 0o777).toBe(0o600);
    for (const dir of [k.dir, k.runtime, join(k.runtime, 'scopes')]) chmodSync(dir, 0o755);
    chmodSync(sock, 0o666);

    const report = await connectAs(NOBODY, sock, frameBytes(Buffer.of(11)), 2000);
    expect(report.uid).toBe(NOBODY);
    // The kernel let it connect (so the refusal is the daemon's, not the file mode's)...
    expect(report.connected).toBe(true);
    expect(report.error).not.toBe('EACCES');
    // ...and the daemon closed it without a byte.
    expect(report.bytes).toBe('');
    expect(report.closed).toBe(true);
    expect(serve.stderr()).toMatch(/refused connection from another user/);

    // The same socket still serves root (a peer of the daemon's own uid).
    const c = await RawAgentClient.connect(sock);
    c.send(frameBytes(Buffer.of(11)));
    const reply = await c.reply();
    c.close();
    expect(reply[0]).toBe(12);
    expect(reply.readUInt32BE(1)).toBe(1);
    expect(reply.includes(Buffer.from('peer-key'))).toBe(true);

    for (const dir of [k.dir, k.runtime, join(k.runtime, 'scopes')]) chmodSync(dir, 0o700);
    chmodSync(sock, 0o600);
  });
});
