// The Secret Service client against a real gnome-keyring-daemon on a private session bus, and
// against the ways a session can fail it: no provider, no bus, a bus that never answers.
import { getDiffieHellman, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import dbus from 'dbus-native';
import { EXIT } from '../../src/errors.js';
import {
  DH_ALGORITHM,
  RFC2409_MODP1024_PRIME,
  SecretServiceClient,
  SecretServiceError,
  withSecretService,
  type SecretServiceOptions,
} from '../../src/platform/secret-service.js';
import { startGnomeKeyring, startSessionBus, stopAllSecretServices, type GnomeKeyringHandle } from '../helpers/secret-service.js';

afterAll(stopAllSecretServices);

/** The SecretServiceError a promise rejects with, and how long it took. */
async function failure(promise: Promise<unknown>): Promise<{ error: SecretServiceError; ms: number }> {
  const started = Date.now();
  try {
    await promise;
  } catch (error) {
    if (!(error instanceof SecretServiceError)) throw error;
    return { error, ms: Date.now() - started };
  }
  throw new Error('expected a SecretServiceError');
}

it('uses the RFC 2409 1024-bit MODP group the specification names', () => {
  expect(RFC2409_MODP1024_PRIME.equals(getDiffieHellman('modp2').getPrime())).toBe(true);
});

describe('against gnome-keyring-daemon', () => {
  let keyring: GnomeKeyringHandle;
  const attributes = { application: 'keyhold', vault: 'test-vault', factor: 'ss-00000001' };
  let options: SecretServiceOptions;

  beforeAll(async () => {
    keyring = await startGnomeKeyring();
    options = { env: keyring.env };
  });
  afterAll(() => keyring?.stop());

  it('stores, looks up (DH and plain sessions alike), replaces and deletes an item', async () => {
    const secret = randomBytes(32);
    const algorithm = await withSecretService(options, async (client) => {
      await client.store('keyhold test item', attributes, secret);
      return client.algorithm;
    });
    // gnome-keyring offers the DH session; the secret crossed the bus encrypted.
    expect(algorithm).toBe(DH_ALGORITHM);
    // Read back in a plain session: what DH stored is the secret itself, not a ciphertext.
    const plain = await withSecretService({ ...options, algorithm: 'plain' }, async (client) => {
      expect(client.algorithm).toBe('plain');
      return client.lookup(attributes);
    });
    expect(plain.equals(secret)).toBe(true);

    // Stored through a plain session, read through DH; replace=true keeps one item.
    const second = randomBytes(32);
    await withSecretService({ ...options, algorithm: 'plain' }, (client) => client.store('keyhold test item', attributes, second));
    expect(await keyring.countItems(attributes)).toBe(1);
    const viaDh = await withSecretService(options, (client) => client.lookup(attributes));
    expect(viaDh.equals(second)).toBe(true);

    expect(await withSecretService(options, (client) => client.remove(attributes))).toBe(1);
    expect(await keyring.countItems(attributes)).toBe(0);
    const { error } = await failure(withSecretService(options, (client) => client.lookup(attributes)));
    expect(error.reason).toBe('missing');
    expect(error.exitCode).toBe(EXIT.DENIED);
    expect(error.message).toContain('factor=ss-00000001');
  });

  it('reports a locked collection at once, never prompting, and never with the secret', async () => {
    const secret = randomBytes(32);
    await withSecretService(options, (client) => client.store('keyhold test item', attributes, secret));
    await keyring.lockDefaultCollection();

    const attempts: Array<(client: SecretServiceClient) => Promise<unknown>> = [
      (client) => client.lookup(attributes),
      (client) => client.store('keyhold test item', attributes, secret),
    ];
    for (const attempt of attempts) {
      const { error, ms } = await failure(withSecretService(options, attempt));
      expect(error.reason).toBe('locked');
      expect(error.exitCode).toBe(EXIT.DENIED);
      expect(error.message).toMatch(/keyring is locked/);
      expect(error.hint).toContain('gnome-keyring-daemon --unlock');
      // Answered, not timed out: under the client's 3 s deadline (the reason says which, too).
      expect(ms).toBeLessThan(2900);
      expect(`${error.message} ${error.hint}`).not.toContain(secret.toString('hex'));
    }
  });
});

it('falls back to a plain session when the provider answers NotSupported to the DH one', async () => {
  // gnome-keyring offers DH; a provider without it is stood in for by one that has only
  // OpenSession, on a real bus: enough to see the negotiation, nothing to store.
  const bus = await startSessionBus();
  const provider = dbus.createClient({ busAddress: bus.address, authMethods: ['EXTERNAL'] });
  provider.connection.on('error', () => {});
  const asked: string[] = [];
  try {
    const service = dbus.defineInterface({
      name: 'org.freedesktop.Secret.Service',
      methods: {
        OpenSession: {
          in: { algorithm: 's', input: 'v' },
          out: { output: 'v', result: 'o' },
          handler: ({ algorithm }: { algorithm: string }) => {
            asked.push(algorithm);
            if (algorithm !== 'plain') throw Object.assign(new Error('Algorithm is not supported'), { dbusName: 'org.freedesktop.DBus.Error.NotSupported' });
            return { output: new dbus.Variant('s', ''), result: '/org/freedesktop/secrets/session/plain1' };
          },
        },
      },
    });
    await provider.export('/org/freedesktop/secrets', service);
    await provider.requestName('org.freedesktop.secrets', 0);
    const algorithm = await withSecretService({ env: bus.env }, async (client) => client.algorithm);
    expect(algorithm).toBe('plain');
    expect(asked).toEqual([DH_ALGORITHM, 'plain']);
  } finally {
    provider.connection.stream.destroy();
    await bus.stop();
  }
});

it('no provider on the bus is exit 3', async () => {
  const bus = await startSessionBus();
  try {
    const { error, ms } = await failure(SecretServiceClient.open({ env: bus.env }));
    expect(error.reason).toBe('no-provider');
    expect(error.exitCode).toBe(EXIT.LOCKED);
    expect(error.message).toContain('org.freedesktop.secrets');
    expect(ms).toBeLessThan(2900);
  } finally {
    await bus.stop();
  }
});

it('no session bus is exit 3: DBUS_SESSION_BUS_ADDRESS unset, or naming a socket nobody listens on', async () => {
  const unset = await failure(SecretServiceClient.open({ env: {} }));
  expect(unset.error.reason).toBe('no-bus');
  expect(unset.error.exitCode).toBe(EXIT.LOCKED);
  expect(unset.error.message).toContain('DBUS_SESSION_BUS_ADDRESS is not set');

  const dir = mkdtempSync(join(tmpdir(), 'keyhold-nobus-'));
  try {
    const gone = await failure(SecretServiceClient.open({ env: { DBUS_SESSION_BUS_ADDRESS: `unix:path=${join(dir, 'bus')}` } }));
    expect(gone.error.reason).toBe('no-bus');
    expect(gone.error.exitCode).toBe(EXIT.LOCKED);
    expect(gone.error.message).toContain('ENOENT');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

it('a bus that accepts and never answers is a timeout within the deadline, and the connection is dropped', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'keyhold-silentbus-'));
  const path = join(dir, 'bus');
  const connections: Socket[] = [];
  let closed = 0;
  const server: Server = createServer((socket) => {
    connections.push(socket);
    socket.on('close', () => closed++);
    socket.resume();
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  try {
    const { error, ms } = await failure(SecretServiceClient.open({ env: { DBUS_SESSION_BUS_ADDRESS: `unix:path=${path}` }, timeoutMs: 500 }));
    expect(error.reason).toBe('timeout');
    expect(error.exitCode).toBe(EXIT.LOCKED);
    expect(error.message).toMatch(/did not answer .* within 0\.5 s/);
    expect(ms).toBeGreaterThanOrEqual(450);
    expect(ms, "the 0.5 s deadline, not the default 3 s").toBeLessThan(2900);
    await new Promise((r) => setTimeout(r, 100));
    expect(connections.length).toBe(1);
    expect(closed).toBe(1);
  } finally {
    for (const socket of connections) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
    rmSync(dir, { recursive: true, force: true });
  }
});
