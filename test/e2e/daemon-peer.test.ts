// A scope socket serves only the daemon's uid (or root), checked with SO_PEERCRED: opening the
// file mode up does not let another user in.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
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

const NOBODY = 65534;

/** Connects as `uid`, sends REQUEST_IDENTITIES, reports what came back. */
const CLIENT_SCRIPT = `
const net = require('node:net');
const out = { uid: process.getuid(), connected: false, bytes: '', closed: false, error: null };
const s = net.connect(process.argv[1]);
const done = () => { process.stdout.write(JSON.stringify(out)); process.exit(0); };
s.on('connect', () => { out.connected = true; s.write(Buffer.from([0, 0, 0, 1, 11])); });
s.on('data', (d) => { out.bytes += d.toString('hex'); });
s.on('error', (e) => { out.error = e.code || e.message; });
s.on('close', () => { out.closed = true; setTimeout(done, 50); });
setTimeout(done, 2000);
`;

interface ClientReport {
  uid: number;
  connected: boolean;
  bytes: string;
  closed: boolean;
  error: string | null;
}

function connectAs(uid: number, path: string): Promise<ClientReport> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', CLIENT_SCRIPT, path], {
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

    const report = await connectAs(NOBODY, sock);
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
