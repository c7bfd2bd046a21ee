// Every vault operation the CLI performs, in one interface with two implementations: on a vault
// opened in this process, or through the control socket of a daemon that holds it unlocked (so
// the private keys and the master key stay in the daemon).
import { generatePrivateKey, parsePkcs8, type KeyKind } from './key-material.js';
import { parseCertificate } from '../agent-protocol/certificate.js';
import type { EnrolledFactor, Factor } from './keyring.js';
import type {
  AddCertificateResult,
  AddKeyResult,
  ExpiredAssignment,
  KeyRecord,
  ScopeConstraintRecord,
  PolicyRecord,
  ScopeSummary,
  SecretInfo,
  SecretValue,
  Vault,
} from './vault.js';
import type { PolicyDocument } from '../policy/policy.js';
import type { StoredConstraints } from '../policy/ssh-add-constraints.js';
import type { TokenRecord } from '../tokens/tokens.js';
import { readlinkSync } from 'node:fs';
import type { AuditEvent, AuditPeer, VerifyResult } from '../audit/audit-log.js';

export interface AddedKey {
  added: AddKeyResult;
  record: KeyRecord;
}

export interface VaultApi {
  generateKey(scope: string, kind: KeyKind, bits: number | undefined, comment: string): Promise<AddedKey>;
  /** Adds a private key given as PKCS#8 DER. */
  importKey(scope: string, pkcs8: Buffer, comment: string): Promise<AddedKey>;
  /**
   * Adds an OpenSSH certificate to a scope, with its private key (PKCS#8 DER), stored in the vault
   * if new but not assigned to the scope by this: the certificate is an identity of its own.
   */
  importCertificate(scope: string, pkcs8: Buffer, certificate: Buffer, comment: string): Promise<AddCertificateResult>;
  /** Removes one certificate from a scope; its key and the key's other identities stay. */
  removeCertificate(scope: string, certificate: Buffer): Promise<void>;
  listKeys(scope?: string): Promise<KeyRecord[]>;
  /** The ssh-add constraints (-c, -t, -h) of a scope's keys. */
  scopeConstraints(scope: string): Promise<ScopeConstraintRecord[]>;
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
  /** Stores a scope's policy (host names already resolved) and the TOML it came from. */
  setPolicy(scope: string, document: PolicyDocument, source: string): Promise<PolicyRecord>;
  getPolicy(scope: string): Promise<PolicyRecord>;
  removePolicy(scope: string): Promise<void>;
  addFactor(enrolled: EnrolledFactor): Promise<Factor>;
  removeFactor(id: string): Promise<void>;
  replaceFactor(enrolled: EnrolledFactor): Promise<Factor>;
  verifyAudit(): Promise<VerifyResult>;
}

/** What only the daemon does, for ssh-add on a scope socket and its own housekeeping (not on the control socket). */
export interface DaemonVaultApi extends VaultApi {
  /** ssh-add's add: the key stored and assigned with exactly these constraints (a plain re-add clears them). */
  addAgentKey(scope: string, pkcs8: Buffer, comment: string, constraints: StoredConstraints, audited: AuditedConstraints | null): Promise<AddedKey>;
  /**
   * ssh-add's add of a certificate: stored in the scope (its key in the vault) with exactly these
   * constraints, as `addAgentKey` does for a key's assignment (ssh-add sends both, alike).
   */
  addAgentCertificate(
    scope: string,
    pkcs8: Buffer,
    certificate: Buffer,
    comment: string,
    constraints: StoredConstraints,
    audited: AuditedConstraints | null,
  ): Promise<AddCertificateResult>;
  /**
   * Removes the assignments and certificates whose ssh-add lifetime has ended, each audited as
   * `key-expired` or `certificate-expired`.
   */
  expireAssignments(at: Date): Promise<ExpiredAssignment[]>;
}

/** What the audit log says of a constrained add: never key material. */
export interface AuditedConstraints {
  confirm?: true;
  lifetime_s?: number;
  hosts?: string[];
}

export type VaultMethod = keyof VaultApi;

/** The methods a daemon serves over its control socket: every method of VaultApi. */
export const VAULT_METHODS = [
  'generateKey',
  'importKey',
  'importCertificate',
  'removeCertificate',
  'listKeys',
  'scopeConstraints',
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
  'setPolicy',
  'getPolicy',
  'removePolicy',
  'addFactor',
  'removeFactor',
  'replaceFactor',
  'verifyAudit',
] as const satisfies readonly VaultMethod[];
const everyMethodListed: Exclude<VaultMethod, (typeof VAULT_METHODS)[number]> extends never ? true : never = true;
void everyMethodListed;

/**
 * The operations on a vault open in this process. `actor` is who asks (this CLI process, or the
 * control socket's peer in the daemon); every change and every secret read goes to the audit log.
 */
export function localVaultApi(vault: Vault, actor: AuditPeer): DaemonVaultApi {
  // In the daemon this resolves once the line is in the log file (a CLI process writes its lines
  // at close): each operation answers only after its own line is written, and fails if it cannot be.
  const audit = (event: AuditEvent) => vault.record({ ...event, peer: actor });
  const added = async (result: AddKeyResult, scope: string, constraints: AuditedConstraints | null = null): Promise<AddedKey> => {
    await audit({ event: result.created ? 'key-added' : 'key-assigned', scope, fingerprint: result.fingerprint, ...(constraints ? { constraints } : {}) });
    return { added: result, record: vault.listKeys().find((k) => k.fingerprint === result.fingerprint)! };
  };
  const certificateAdded = async (result: AddCertificateResult, scope: string, certificate: Buffer, constraints: AuditedConstraints | null = null) => {
    if (result.keyCreated) await audit({ event: 'key-added', fingerprint: result.fingerprint });
    await audit({
      event: result.created ? 'certificate-added' : 'certificate-kept',
      scope,
      fingerprint: result.fingerprint,
      ...certificateFacts(certificate),
      ...(constraints ? { constraints } : {}),
    });
    return result;
  };
  return {
    async generateKey(scope, kind, bits, comment) {
      return added(vault.addKey(scope, await generatePrivateKey(kind, bits), comment), scope);
    },
    async importKey(scope, pkcs8, comment) {
      try {
        return added(vault.addKey(scope, parsePkcs8(pkcs8), comment), scope);
      } finally {
        pkcs8.fill(0);
      }
    },
    async addAgentKey(scope, pkcs8, comment, constraints, audited) {
      try {
        return added(vault.addKey(scope, parsePkcs8(pkcs8), comment, constraints), scope, audited);
      } finally {
        pkcs8.fill(0);
      }
    },
    async importCertificate(scope, pkcs8, certificate, comment) {
      try {
        return await certificateAdded(vault.addCertificate(scope, parsePkcs8(pkcs8), certificate, comment), scope, certificate);
      } finally {
        pkcs8.fill(0);
      }
    },
    async addAgentCertificate(scope, pkcs8, certificate, comment, constraints, audited) {
      try {
        return await certificateAdded(vault.addCertificate(scope, parsePkcs8(pkcs8), certificate, comment, constraints), scope, certificate, audited);
      } finally {
        pkcs8.fill(0);
      }
    },
    async removeCertificate(scope, certificate) {
      vault.removeCertificate(scope, certificate);
      await audit({ event: 'certificate-removed', scope, ...certificateFacts(certificate) });
    },
    async expireAssignments(at) {
      const expired = vault.expireAssignments(at);
      await Promise.all(
        expired.map(({ scope, fingerprint, certificate }) =>
          audit(certificate ? { event: 'certificate-expired', scope, fingerprint, certificate } : { event: 'key-expired', scope, fingerprint }),
        ),
      );
      return expired;
    },
    async listKeys(scope) {
      return vault.listKeys(scope);
    },
    async scopeConstraints(scope) {
      return vault.scopeConstraints(scope);
    },
    async assign(scope, fp) {
      vault.assign(scope, fp);
      await audit({ event: 'key-assigned', scope, fingerprint: fullFingerprint(fp) });
    },
    async unassign(scope, fp) {
      vault.unassign(scope, fp);
      await audit({ event: 'key-unassigned', scope, fingerprint: fullFingerprint(fp) });
    },
    async removeKey(fp) {
      vault.removeKey(fp);
      await audit({ event: 'key-removed', fingerprint: fullFingerprint(fp) });
    },
    async scopes() {
      return vault.scopes();
    },
    async issueToken(scope, subject, ttlMs) {
      const issued = vault.issueToken(scope, subject, ttlMs);
      await audit({ event: 'token-issued', scope, token_id: issued.record.id, subject, ...(issued.record.expires ? { expires: issued.record.expires } : {}) });
      return issued;
    },
    async listTokens(scope) {
      return vault.listTokens(scope);
    },
    async revokeToken(id) {
      const record = vault.revokeToken(id);
      await audit({ event: 'token-revoked', scope: record.scope, token_id: record.id, subject: record.subject });
      return record;
    },
    async revokeTokens(scope, subject) {
      const count = vault.revokeTokens(scope, subject);
      await audit({ event: 'token-revoked', scope, ...(subject !== undefined ? { subject } : {}), count });
      return count;
    },
    async setSecret(scope, name, value) {
      const result = vault.setSecret(scope, name, value);
      await audit({ event: 'secret-set', scope, name });
      return result;
    },
    async getSecret(scope, name) {
      const value = vault.getSecret(scope, name);
      await audit({ event: 'secret-read', scope, name });
      return value;
    },
    async listSecrets(scope) {
      return vault.listSecrets(scope);
    },
    async removeSecret(scope, name) {
      vault.removeSecret(scope, name);
      await audit({ event: 'secret-removed', scope, name });
    },
    async secretValues(scopes) {
      if (!Array.isArray(scopes)) throw new TypeError('scopes must be a list');
      const values = vault.secretValues(scopes);
      for (const scope of new Set(scopes)) {
        const names = values.filter((v) => v.scope === scope).map((v) => v.name);
        if (names.length > 0) await audit({ event: 'secret-read', scope, names });
      }
      return values;
    },
    async setPolicy(scope, document, source) {
      const record = vault.setPolicy(scope, document, source);
      await audit({ event: 'policy-set', scope, rules: record.document.rules.length, default: record.document.default });
      return record;
    },
    async getPolicy(scope) {
      return vault.getPolicy(scope);
    },
    async removePolicy(scope) {
      vault.removePolicy(scope);
      await audit({ event: 'policy-removed', scope });
    },
    async addFactor(enrolled) {
      try {
        // Audited inside the vault, before the rewrap takes effect.
        return vault.addFactor(enrolled, actor);
      } finally {
        enrolled.kek.fill(0);
      }
    },
    async removeFactor(id) {
      vault.removeFactor(id, actor);
    },
    async replaceFactor(enrolled) {
      try {
        return vault.replaceFactor(enrolled, actor);
      } finally {
        enrolled.kek.fill(0);
      }
    },
    async verifyAudit() {
      return vault.verifyAuditOffThread();
    },
  };
}

const fullFingerprint = (fp: string) => (fp.startsWith('SHA256:') ? fp : `SHA256:${fp}`);

/** This process, as the actor of the audit events it causes. */
export function thisProcess(): AuditPeer {
  let exe: string | null = null;
  try {
    exe = readlinkSync('/proc/self/exe');
  } catch {
    /* not on Linux /proc */
  }
  return { kind: 'process', pid: process.pid, uid: process.getuid!(), exe };
}

/** What the audit log says of a certificate: its key's fingerprint, key id and serial. */
function certificateFacts(certificate: Buffer): Omit<AuditEvent, 'event'> {
  try {
    const cert = parseCertificate(certificate);
    return { fingerprint: cert.fingerprint, certificate: { key_id: cert.keyId, serial: cert.serial.toString() } };
  } catch {
    return {};
  }
}
