// The secret-service unlock factor: a random secret kept in the user's Secret Service default
// collection (GNOME Keyring, KWallet, KeePassXC), so a desktop session whose login keyring is
// unlocked unlocks keyhold without a prompt. The item is found by its attributes
// (application=keyhold, vault=<vault id>, factor=<factor id>); the KEK is derived from its secret,
// bound to this vault and factor. Nothing secret is stored in vault.db.keys.
//
// Not there (no session bus, no provider, no answer in time), locked, or without the item: "not
// mine", so `unlock` goes on to the next source; with `unlock --factor secret-service` (or policy
// `all`) it is an error naming the reason: exit 3 when there was nobody to ask, 4 when the keyring
// said no (locked, no such item).
import { hkdfSync, randomBytes } from 'node:crypto';
import * as v from 'valibot';
import { EXIT, KeyholdError } from '../errors.js';
import { SecretServiceError, withSecretService, type SecretAttributes } from '../platform/secret-service.js';
import { newFactorId, type EnrolledFactor, type FactorBase, type FactorKeks, type FactorKind } from './factor-kind.js';

export const SECRET_SERVICE_KDF_INFO = 'keyhold-secret-service-factor-v1';
const SECRET_BYTES = 32;
export const SECRET_SERVICE_ID_PREFIX = 'ss';

export interface SecretServiceFactor extends FactorBase {
  type: 'secret-service';
  /** The Secret Service alias the item was stored under; only `default` for now. */
  collection: 'default';
}

/** The attributes that find a factor's item: not secret (any process on the session bus may search). */
export function secretServiceAttributes(vaultId: string, factorId: string): SecretAttributes {
  return { application: 'keyhold', vault: vaultId, factor: factorId };
}

/** KEK = HKDF-SHA256(item secret, salt = vault id, info = versioned label + factor id). */
export function secretServiceKek(vaultId: string, factorId: string, secret: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', secret, Buffer.from(vaultId), `${SECRET_SERVICE_KDF_INFO}\0${factorId}`, 32));
}

function itemLabel(vaultId: string, factorId: string): string {
  return `keyhold unlock key (vault ${vaultId}, factor ${factorId})`;
}

/** A failure that means "this source is not here" rather than "it answered wrong". */
function isAbsence(err: unknown): err is SecretServiceError {
  return err instanceof SecretServiceError && err.reason !== 'refused';
}

export const secretServiceKind: FactorKind<SecretServiceFactor> = {
  type: 'secret-service',
  idPrefix: SECRET_SERVICE_ID_PREFIX,
  summary: "a random key kept in the desktop's Secret Service (GNOME Keyring, KWallet, KeePassXC) default collection",
  source: 'the Secret Service (an unlocked desktop keyring on DBUS_SESSION_BUS_ADDRESS)',
  fields: { collection: v.literal('default') },
  addOptions: {},

  describe: (factor) => `${factor.id} (secret-service)`,

  details: (factor) => ({ column: `Secret Service ${factor.collection} collection`, json: { collection: factor.collection } }),

  async enroll(context): Promise<EnrolledFactor<SecretServiceFactor>> {
    const id = newFactorId(SECRET_SERVICE_ID_PREFIX);
    const secret = randomBytes(SECRET_BYTES);
    try {
      await withSecretService({ env: context.env }, (client) =>
        client.store(itemLabel(context.vaultId, id), secretServiceAttributes(context.vaultId, id), secret),
      );
      return {
        factor: { id, type: 'secret-service', created: new Date().toISOString(), collection: 'default' },
        kek: secretServiceKek(context.vaultId, id, secret),
      };
    } catch (err) {
      if (err instanceof SecretServiceError) {
        throw new KeyholdError(`cannot enroll a secret-service factor: ${err.message}`, err.hint, err.exitCode);
      }
      throw err;
    } finally {
      secret.fill(0);
    }
  },

  async prove(factors, context): Promise<FactorKeks> {
    const keks: FactorKeks = new Map();
    if (factors.length === 0) return keks;
    const vaultId = context.keyring.vault_id;
    const failures: SecretServiceError[] = [];
    try {
      await withSecretService({ env: context.env }, async (client) => {
        for (const factor of factors) {
          let secret: Buffer;
          try {
            secret = await client.lookup(secretServiceAttributes(vaultId, factor.id));
          } catch (err) {
            // A missing item is this factor's absence; a locked keyring or a dead bus is every one's.
            if (err instanceof SecretServiceError && err.reason === 'missing') {
              failures.push(err);
              continue;
            }
            throw err;
          }
          try {
            keks.set(factor.id, secretServiceKek(vaultId, factor.id, secret));
          } finally {
            secret.fill(0);
          }
        }
      });
    } catch (err) {
      // Under policy any (not required) a provider that answers oddly is one source that did not
      // apply: the passphrase prompt still comes after it.
      if (!isAbsence(err) && (context.required || !(err instanceof SecretServiceError))) {
        for (const kek of keks.values()) kek.fill(0);
        throw err;
      }
      failures.push(err as SecretServiceError);
    }
    // `any` needs one factor, `all` needs each of them.
    const short = context.keyring.policy === 'all' ? keks.size < factors.length : keks.size === 0;
    if (!context.required && keks.size === 0 && failures[0]) {
      context.notApplied?.push({ reason: `secret-service: ${failures[0].message}`, refused: failures[0].exitCode === EXIT.DENIED });
    }
    if (context.required && short && failures[0]) {
      for (const kek of keks.values()) kek.fill(0);
      const first = failures[0];
      const which = first.reason === 'missing' ? `for ${factors.map((f) => f.id).join(', ')}: ` : '';
      throw new KeyholdError(
        `secret-service factor: ${which}${first.message}`,
        first.reason === 'missing' ? 'the item was deleted from the keyring: remove the factor (`keyhold factor rm ID`) and add it again' : first.hint,
        first.exitCode,
      );
    }
    return keks;
  },

  async forget(factor, context): Promise<void> {
    try {
      await withSecretService({ env: context.env }, (client) => client.remove(secretServiceAttributes(context.vaultId, factor.id)));
    } catch {
      // Best effort: a locked or absent keyring keeps an item that unlocks nothing any more (its
      // factor, and so the wrap its KEK opened, is gone from vault.db.keys).
    }
  },
};
