// End-to-end: the secret-service unlock factor against a real gnome-keyring-daemon on a private
// session bus, through the real CLI and daemon (bin/keyhold). Enroll, lock keyhold, unlock with no
// passphrase source and no terminal (no prompt); a locked keyring is exit 4 naming it, no provider
// is exit 3; `factor rm` deletes the item from the keyring.
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { keyhold, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, stopBackgroundDaemon, type KeyholdEnv, type RunResult } from '../helpers/keyhold.js';
import { startGnomeKeyring, stopAllSecretServices, type GnomeKeyringHandle } from '../helpers/secret-service.js';
import { agentFingerprints } from '../helpers/ssh-agent.js';
import { enrollPassphrase } from '../../src/unlock/passphrase.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';

const envs: KeyholdEnv[] = [];

afterEach(async () => {
  await stopAllServes();
  await Promise.all(envs.map((k) => stopBackgroundDaemon(k.runtime)));
  await stopAllSecretServices();
  for (const k of envs.splice(0)) k.cleanup();
}, 30_000);

interface FactorJson {
  id: string;
  type: string;
  policy: string;
  collection?: string;
}

/** A fresh vault location whose keyhold processes see `keyring`'s session bus. */
function freshEnv(keyring: GnomeKeyringHandle): KeyholdEnv {
  const k = makeKeyholdEnv('keyhold-e2e-secret-service-');
  envs.push(k);
  k.env.DBUS_SESSION_BUS_ADDRESS = keyring.address;
  return k;
}

/** No passphrase source (no file, credential, KEYHOLD_PASSPHRASE) and no SSH agent: only the keyring. */
function keyringOnly(k: KeyholdEnv): KeyholdEnv {
  const env: NodeJS.ProcessEnv = { ...k.env };
  for (const name of ['KEYHOLD_PASSPHRASE_FILE', 'KEYHOLD_PASSPHRASE', 'CREDENTIALS_DIRECTORY', 'SSH_AUTH_SOCK']) delete env[name];
  return { ...k, env };
}

function expectCode(r: RunResult, code: number, what: string): void {
  expect(r.status, `${what}: exit ${r.status}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(code);
}

function statusCode(k: KeyholdEnv): number | null {
  return keyhold(keyringOnly(k), ['status', '--quiet']).status;
}

function vaultId(k: KeyholdEnv): string {
  return (JSON.parse(readFileSync(`${k.vault}.keys`, 'utf8')) as { vault_id: string }).vault_id;
}

/** `init` with a passphrase file, then `factor add secret-service`; checks the item is in the keyring. */
async function enroll(keyring: GnomeKeyringHandle): Promise<{ k: KeyholdEnv; factor: FactorJson }> {
  const k = freshEnv(keyring);
  keyholdOk(k, ['init', '--passphrase-file', k.passFile]);
  const factor = JSON.parse(keyholdOk(k, ['factor', 'add', 'secret-service', '--json'])) as FactorJson;
  expect(factor).toMatchObject({ type: 'secret-service', policy: 'any', collection: 'default' });
  expect(factor.id).toMatch(/^ss-[0-9a-f]{8}$/);
  expect(await keyring.countItems({ application: 'keyhold', vault: vaultId(k), factor: factor.id })).toBe(1);
  return { k, factor };
}

describe('secret-service factor', () => {
  it('enroll, lock keyhold, unlock with no prompt; keyring locked → 4; no provider → 3', async () => {
    const keyring = await startGnomeKeyring();
    const { k, factor } = await enroll(keyring);

    const list = keyholdOk(keyringOnly(k), ['factor', 'list']);
    const row = list.split('\n').find((line) => line.startsWith(factor.id));
    expect(row, list).toMatch(/secret-service .*Secret Service default collection/);
    // vault.db.keys names the collection and nothing secret.
    const stored = (JSON.parse(readFileSync(`${k.vault}.keys`, 'utf8')) as { factors: Array<Record<string, unknown>> }).factors.find((f) => f.id === factor.id)!;
    expect(Object.keys(stored).sort()).toEqual(['collection', 'created', 'id', 'type', 'wrap']);

    const vaultKey = (JSON.parse(keyholdOk(k, ['key', 'generate', 'web', '--json'])) as { fingerprint: string }).fingerprint;
    const serve = await startServe(k, ['--locked']);
    expect(statusCode(k)).toBe(3);

    const s = keyringOnly(k);
    // stdin is a pipe, not a terminal: a prompt would fail, so success means none was needed.
    const unlocked = keyhold(s, ['unlock']);
    expectCode(unlocked, 0, 'unlock with only the keyring');
    expect(unlocked.stderr).toMatch(/unlocked/);
    expect(unlocked.stderr).not.toMatch(/passphrase:/i);
    expect(statusCode(k)).toBe(0);
    expect(agentFingerprints(serve.socket('web'))).toEqual([vaultKey]);

    expectCode(keyhold(s, ['lock']), 0, 'lock');
    expect(statusCode(k)).toBe(3);
    expectCode(keyhold(s, ['unlock', '--factor', 'secret-service']), 0, 'unlock --factor secret-service');
    expect(statusCode(k)).toBe(0);
    expectCode(keyhold(s, ['lock']), 0, 'lock');

    // The desktop locks its keyring: keyhold says so (4) at once, and stays locked.
    await keyring.lockDefaultCollection();
    const started = Date.now();
    const refused = keyhold(s, ['unlock', '--factor', 'secret-service']);
    expectCode(refused, 4, 'unlock --factor secret-service, keyring locked');
    expect(refused.stderr).toMatch(/^keyhold: .*keyring is locked.*gnome-keyring-daemon --unlock/);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(statusCode(k)).toBe(3);
    // Without --factor the locked keyring is not a source: nothing else is either (3).
    const noSource = keyhold(s, ['unlock']);
    expectCode(noSource, 3, 'unlock, keyring locked, no other source');
    // ...and says why the keyring did not count, on the one error line.
    expect(noSource.stderr).toMatch(/^keyhold: no passphrase source \(secret-service: .*locked.*\) \(use one of: .*Secret Service/);

    // No Secret Service on the bus at all: 3.
    await keyring.stopKeyring();
    const absent = keyhold(s, ['unlock', '--factor', 'secret-service']);
    expectCode(absent, 3, 'unlock --factor secret-service, no provider');
    expect(absent.stderr).toMatch(/no Secret Service on the session bus/);
    expect(statusCode(k)).toBe(3);
    // The passphrase still unlocks.
    expectCode(keyhold(k, ['unlock']), 0, 'unlock with the passphrase file');
  });

  it('factor rm deletes the item from the keyring', async () => {
    const keyring = await startGnomeKeyring();
    const { k, factor } = await enroll(keyring);
    const attributes = { application: 'keyhold', vault: vaultId(k), factor: factor.id };
    expectCode(keyhold(k, ['factor', 'rm', factor.id]), 0, 'factor rm');
    expect(await keyring.countItems(attributes)).toBe(0);
    expect((JSON.parse(keyholdOk(k, ['factor', 'list', '--json'])) as FactorJson[]).map((f) => f.type)).toEqual(['passphrase']);
  });

  it('a vault whose only factor is the keyring: a locked keyring is a refusal (4) for plain unlock too; serve starts locked', async () => {
    const keyring = await startGnomeKeyring();
    const { k } = await enroll(keyring);
    const passphraseId = (JSON.parse(keyholdOk(k, ['factor', 'list', '--json'])) as FactorJson[]).find((f) => f.type === 'passphrase')!.id;
    keyholdOk(k, ['factor', 'rm', passphraseId]);
    const s = keyringOnly(k);
    await keyring.lockDefaultCollection();
    const refused = keyhold(s, ['unlock']);
    expectCode(refused, 4, 'unlock, keyring locked, the keyring the only factor');
    expect(refused.stderr).toMatch(/^keyhold: no unlock factor available \(secret-service: .*locked/);
    // A daemon starting up (systemd) does not fail on it: it starts locked and waits.
    const serve = await startServe(s);
    expect(statusCode(k)).toBe(3);
    expect(serve.stderr()).toContain('starting locked');
  });

  it('a factor add that fails after the item is stored takes the item out again', async () => {
    const keyring = await startGnomeKeyring();
    const k = freshEnv(keyring);
    // 64 factors is the most a key file holds, so writing a 65th is refused after enrolment.
    const passphrase = Buffer.from(readFileSync(k.passFile, 'utf8').replace(/\r?\n$/, ''));
    const enrolled = [];
    for (let i = 0; i < 64; i++) enrolled.push(await enrollPassphrase(passphrase, { log2n: 14, r: 1, p: 1 }));
    Vault.createWithFactors(vaultPaths(k.vault), 'any', enrolled).close();
    const refused = keyhold(k, ['factor', 'add', 'secret-service']);
    expectCode(refused, 1, 'factor add secret-service as a 65th factor');
    expect(refused.stderr).toMatch(/^keyhold: refusing to write a vault key file/);
    expect(await keyring.countItems({ application: 'keyhold', vault: vaultId(k) })).toBe(0);
  });
});
