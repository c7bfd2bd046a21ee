// Every vault operation the CLI performs, in one interface with two implementations: on a vault
// opened in this process, or through the control socket of a daemon that holds it unlocked (so
// the private keys and the master key stay in the daemon).
import { generatePrivateKey, parsePkcs8, type KeyKind } from './key-material.js';
import type { EnrolledFactor, Factor } from './keyring.js';
import type { AddKeyResult, KeyRecord, ScopeSummary, SecretInfo, SecretValue, Vault } from './vault.js';
import type { TokenRecord } from '../tokens/tokens.js';

export interface AddedKey {
  added: AddKeyResult;
  record: KeyRecord;
}

export interface VaultApi {
  generateKey(scope: string, kind: KeyKind, bits: number | undefined, comment: string): Promise<AddedKey>;
  /** Adds a private key given as PKCS#8 DER. */
  importKey(scope: string, pkcs8: Buffer, comment: string): Promise<AddedKey>;
  listKeys(scope?: string): Promise<KeyRecord[]>;
  assign(scope: string, fingerprint: string): Promise<void>;
  unassign(scope: string, fingerprint: string): Promise<void>;
  removeKey(fingerprint: string): Promise<void>;
  scopes(): Promise<ScopeSummary[]>;
  issueToken(scope: string, subject: string, ttlMs: number | null): Promise<{ token: string; record: TokenRecord }>;
  listTokens(scope?: string): Promise<TokenRecord[]>;
  revokeToken(id: string): Promise<TokenRecord>;
  revokeTokens(scope: string, subject?: string): Promise<number>;
  setSecret(scope: string, name: string, value: Buffer): Promise<{ created: boolean }>;
  getSecret(scope: string, name: string): Promise<Buffer>;
  listSecrets(scope: string): Promise<SecretInfo[]>;
  removeSecret(scope: string, name: string): Promise<void>;
  /** Every secret of these scopes, values included (for `env` and `export`). */
  secretValues(scopes: string[]): Promise<SecretValue[]>;
  addFactor(enrolled: EnrolledFactor): Promise<Factor>;
  removeFactor(id: string): Promise<void>;
  replaceFactor(enrolled: EnrolledFactor): Promise<Factor>;
}

export type VaultMethod = keyof VaultApi;

/** The methods a daemon serves over its control socket. */
export const VAULT_METHODS: readonly VaultMethod[] = [
  'generateKey',
  'importKey',
  'listKeys',
  'assign',
  'unassign',
  'removeKey',
  'scopes',
  'issueToken',
  'listTokens',
  'revokeToken',
  'revokeTokens',
  'setSecret',
  'getSecret',
  'listSecrets',
  'removeSecret',
  'secretValues',
  'addFactor',
  'removeFactor',
  'replaceFactor',
];

export function localVaultApi(vault: Vault): VaultApi {
  const added = (result: AddKeyResult): AddedKey => ({
    added: result,
    record: vault.listKeys().find((k) => k.fingerprint === result.fingerprint)!,
  });
  return {
    async generateKey(scope, kind, bits, comment) {
      return added(vault.addKey(scope, await generatePrivateKey(kind, bits), comment));
    },
    async importKey(scope, pkcs8, comment) {
      try {
        return added(vault.addKey(scope, parsePkcs8(pkcs8), comment));
      } finally {
        pkcs8.fill(0);
      }
    },
    async listKeys(scope) {
      return vault.listKeys(scope);
    },
    async assign(scope, fp) {
      vault.assign(scope, fp);
    },
    async unassign(scope, fp) {
      vault.unassign(scope, fp);
    },
    async removeKey(fp) {
      vault.removeKey(fp);
    },
    async scopes() {
      return vault.scopes();
    },
    async issueToken(scope, subject, ttlMs) {
      return vault.issueToken(scope, subject, ttlMs);
    },
    async listTokens(scope) {
      return vault.listTokens(scope);
    },
    async revokeToken(id) {
      return vault.revokeToken(id);
    },
    async revokeTokens(scope, subject) {
      return vault.revokeTokens(scope, subject);
    },
    async setSecret(scope, name, value) {
      return vault.setSecret(scope, name, value);
    },
    async getSecret(scope, name) {
      return vault.getSecret(scope, name);
    },
    async listSecrets(scope) {
      return vault.listSecrets(scope);
    },
    async removeSecret(scope, name) {
      vault.removeSecret(scope, name);
    },
    async secretValues(scopes) {
      if (!Array.isArray(scopes)) throw new TypeError('scopes must be a list');
      return vault.secretValues(scopes);
    },
    async addFactor(enrolled) {
      try {
        return vault.addFactor(enrolled);
      } finally {
        enrolled.kek.fill(0);
      }
    },
    async removeFactor(id) {
      vault.removeFactor(id);
    },
    async replaceFactor(enrolled) {
      try {
        return vault.replaceFactor(enrolled);
      } finally {
        enrolled.kek.fill(0);
      }
    },
  };
}
