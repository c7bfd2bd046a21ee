// The secret-service factor kind against a real gnome-keyring-daemon: enroll keeps a secret in
// the default collection, prove derives the same KEK from it without a prompt, forget deletes it;
// an absent or locked keyring is "not mine" unless the factor is required.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as v from 'valibot';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { newVaultId, type Keyring } from '../../src/vault/keyring.js';
import type { ProveContext } from '../../src/unlock/factor-kind.js';
import { FACTOR_KINDS, unsealedFactorSchemaOf } from '../../src/unlock/kinds.js';
import { secretServiceKind, type SecretServiceFactor } from '../../src/unlock/secret-service.js';
import { startGnomeKeyring, startSessionBus, stopAllSecretServices, type GnomeKeyringHandle } from '../helpers/secret-service.js';

afterAll(stopAllSecretServices);

function keyringOf(vaultId: string, policy: 'any' | 'all' = 'any'): Keyring {
  return { format: 'keyhold-keys', version: 1, vault_id: vaultId, policy, factors: [] };
}

async function rejection(promise: Promise<unknown>): Promise<KeyholdError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof KeyholdError) return err;
    throw err;
  }
  throw new Error('expected a KeyholdError');
}

it('stores nothing but the collection, and the schema holds it to that', () => {
  const schema = v.object({ ...secretServiceKind.fields });
  expect(v.is(schema, { collection: 'default' })).toBe(true);
  expect(v.is(schema, { collection: 'login' })).toBe(false);
  expect(v.is(schema, {})).toBe(false);
  expect(secretServiceKind.idPrefix).toBe('ss');
  // Listed, so the key file's schema takes such a factor (and holds it to its prefix and fields).
  expect(FACTOR_KINDS).toContain(secretServiceKind);
  const factor = { id: 'ss-0123abcd', type: 'secret-service', created: new Date().toISOString(), collection: 'default' };
  expect(v.is(unsealedFactorSchemaOf(), factor)).toBe(true);
  expect(v.is(unsealedFactorSchemaOf(), { ...factor, id: 'pp-0123abcd' })).toBe(false);
  expect(v.is(unsealedFactorSchemaOf(), { ...factor, collection: 'login' })).toBe(false);
});

describe('against gnome-keyring-daemon', () => {
  let keyring: GnomeKeyringHandle;
  const vaultId = newVaultId();
  let factor: SecretServiceFactor;
  let kek: Buffer;
  const prove = (required: boolean, env = keyring.env, factors = [factor], policy: 'any' | 'all' = 'any') =>
    secretServiceKind.prove(factors, { keyring: keyringOf(vaultId, policy), env, required } satisfies ProveContext);

  beforeAll(async () => {
    keyring = await startGnomeKeyring();
    const enrolled = await secretServiceKind.enroll({ vaultId, env: keyring.env, options: {} });
    factor = enrolled.factor as SecretServiceFactor;
    kek = enrolled.kek;
  });
  afterAll(() => keyring?.stop());

  it('enrolls one item under application/vault/factor and proves the same KEK without a prompt', async () => {
    expect(factor.id).toMatch(/^ss-[0-9a-f]{8}$/);
    expect(factor).toMatchObject({ type: 'secret-service', collection: 'default' });
    expect(kek.length).toBe(32);
    expect(await keyring.countItems({ application: 'keyhold', vault: vaultId, factor: factor.id })).toBe(1);
    const keks = await prove(false);
    expect([...keks.keys()]).toEqual([factor.id]);
    expect(keks.get(factor.id)!.equals(kek)).toBe(true);
    // Bound to the vault: the same item read for another vault id gives nothing.
    const other = await secretServiceKind.prove([factor], { keyring: keyringOf(newVaultId()), env: keyring.env, required: false });
    expect(other.size).toBe(0);
  });

  it('a factor whose item is gone: not mine, or exit 4 naming it when required', async () => {
    const ghost: SecretServiceFactor = { ...factor, id: 'ss-0badf00d' };
    expect((await prove(false, keyring.env, [ghost])).size).toBe(0);
    const err = await rejection(prove(true, keyring.env, [ghost]));
    expect(err.exitCode).toBe(EXIT.DENIED);
    expect(err.message).toContain('ss-0badf00d');
    // Policy all needs each one: the enrolled factor alone is not enough.
    const all = await rejection(prove(true, keyring.env, [factor, ghost], 'all'));
    expect(all.exitCode).toBe(EXIT.DENIED);
  });

  it('no provider or no bus: not mine, or exit 3 when required', async () => {
    expect((await prove(false, {})).size).toBe(0);
    expect((await rejection(prove(true, {}))).exitCode).toBe(EXIT.LOCKED);
    const bus = await startSessionBus();
    try {
      expect((await prove(false, bus.env)).size).toBe(0);
      const err = await rejection(prove(true, bus.env));
      expect(err.exitCode).toBe(EXIT.LOCKED);
      expect(err.message).toContain('no Secret Service');
    } finally {
      await bus.stop();
    }
  });

  it('forget deletes the item; then a locked keyring is not mine, or exit 4 naming the lock', async () => {
    const second = await secretServiceKind.enroll({ vaultId, env: keyring.env, options: {} });
    second.kek.fill(0);
    const attributes = { application: 'keyhold', vault: vaultId, factor: second.factor.id };
    expect(await keyring.countItems(attributes)).toBe(1);
    await secretServiceKind.forget!(second.factor as SecretServiceFactor, { vaultId, env: keyring.env });
    expect(await keyring.countItems(attributes)).toBe(0);

    await keyring.lockDefaultCollection();
    const started = Date.now();
    expect((await prove(false)).size).toBe(0);
    const err = await rejection(prove(true));
    expect(err.exitCode).toBe(EXIT.DENIED);
    expect(err.message).toMatch(/keyring is locked/);
    expect(err.hint).toContain('gnome-keyring-daemon --unlock');
    expect(Date.now() - started).toBeLessThan(3000);
    // Best effort, never throws, even when the keyring refuses.
    await secretServiceKind.forget!(factor, { vaultId, env: keyring.env });
    const enrolling = await rejection(secretServiceKind.enroll({ vaultId, env: keyring.env, options: {} }));
    expect(enrolling.exitCode).toBe(EXIT.DENIED);
  });
});
