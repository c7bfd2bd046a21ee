// The unlocked vault: keys, scope assignments and the version counter that lets a running daemon
// notice any change (its own or another process's) with one cheap check.
import { existsSync, mkdirSync, unlinkSync } from 'node:fs';
import { auditKey, AuditWriter, readAnchor, verifyAuditFile, type AuditEvent, type AuditFailure, type AuditLogger, type AuditPeer, type VerifyResult } from '../audit/audit-log.js';
import { removeStaleTemps } from './atomic-file.js';
import { Worker } from 'node:worker_threads';
import type { VerifyJob, VerifyReply } from '../audit/verify-worker.js';
import { dirname } from 'node:path';
import { randomBytes } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { fingerprint } from '../agent-protocol/public-key.js';
import { parseCertificate, parseVerifiedCertificate } from '../agent-protocol/certificate.js';
import { WireFormatError } from '../agent-protocol/wire.js';
import { EXIT, KeyholdError, notFound, usageError } from '../errors.js';
import { checkDatabaseFile, openDatabase, type Db } from './database.js';
import { describeSupportedKey, toPkcs8 } from './key-material.js';
import {
  MASTER_KEY_BYTES,
  newVaultId,
  readKeyring,
  sealKeyring,
  serializeKeyring,
  unwrapMasterKey,
  withFactorAdded,
  withFactorRemoved,
  withFactorReplaced,
  writeKeyring,
  writeKeyringBytes,
  zeroKeks,
  type EnrolledFactor,
  type Factor,
  type FactorKeks,
  type Keyring,
  type Policy,
} from './keyring.js';
import type { VaultPaths } from './paths.js';
import { enrollPassphrase, passphraseKeks } from '../unlock/passphrase.js';
import { checkPolicyDocument, MAX_POLICY_SOURCE, type PolicyDocument } from '../policy/policy.js';
import type { StoredConstraints, StoredDestination } from '../policy/ssh-add-constraints.js';
import { mintToken, newTokenId, TOKEN_SHOWN_CHARS, tokenHash, type TokenRecord } from '../tokens/tokens.js';

export const SCOPE_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function checkScopeName(scope: string): string {
  if (typeof scope !== 'string' || !SCOPE_PATTERN.test(scope)) {
    throw usageError(
      `invalid scope name ${JSON.stringify(String(scope).slice(0, 80))}`,
      'a scope is 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit',
    );
  }
  return scope;
}

export interface KeyRecord {
  fingerprint: string;
  type: string;
  bits: number;
  comment: string;
  scopes: string[];
  publicBlob: Buffer;
  /** Scopes whose assignment expires (ssh-add -t): scope → ISO time. */
  expires?: Record<string, string>;
  /** The key's certificates, each in its scope (a certificate is an identity apart from the key's assignment). */
  certificates: CertificateRecord[];
}

/** What a listing or the audit log says of a certificate: never key material. */
export interface CertificateFacts {
  key_id: string;
  serial: string;
}

/** An identity's ssh-add constraints (a key's assignment, or a certificate), as `policy show` prints them. */
export interface ScopeConstraintRecord {
  fingerprint: string;
  comment: string;
  /** Set when the constrained identity is a certificate of the key. */
  certificate?: CertificateFacts;
  constraints: StoredConstraints;
}

/** An assignment (or a certificate) removed because its ssh-add lifetime ran out. */
export interface ExpiredAssignment {
  scope: string;
  fingerprint: string;
  /** Set when what expired is a certificate of the key (the key's own assignment is apart). */
  certificate?: CertificateFacts;
}

export interface CertificateRecord {
  scope: string;
  /** The certificate blob as added. */
  blob: Buffer;
  comment: string;
  /** When its ssh-add lifetime (-t) ends (ISO); absent: it does not expire. */
  expires?: string;
}

/** Key id and serial of a stored certificate (checked when it was added; a damaged one says so). */
export function certificateFactsOf(blob: Buffer): CertificateFacts {
  try {
    const cert = parseCertificate(blob);
    return { key_id: cert.keyId, serial: cert.serial.toString() };
  } catch {
    return { key_id: '(unreadable)', serial: '' };
  }
}

export interface ScopeKeyRow {
  scope: string;
  fingerprint: string;
  type: string;
  comment: string;
  /** The identity's blob: the plain public key, or for a certificate the certificate. */
  publicBlob: Buffer;
  privatePkcs8: Buffer;
  /** ssh-add's constraints on this identity (see ssh-add-constraints.ts). */
  expires_at: string | null;
  confirm: number;
  destinations: string | null;
  /** 1 when `publicBlob` is a certificate of the key. */
  certificate: 0 | 1;
}

export interface AddCertificateResult {
  /** The certified key's fingerprint. */
  fingerprint: string;
  /** The key was new to the vault. */
  keyCreated: boolean;
  /** The certificate was new to the scope. */
  created: boolean;
}

export interface ScopeSummary {
  name: string;
  keys: number;
  secrets: number;
  tokens: number;
  /** Whether the scope has a policy. */
  policy: boolean;
  /** Keys of the scope with ssh-add constraints (-c, -t, -h); absent when none. */
  constrained?: number;
}

/** A stored policy as `policy show` and `policy check` get it. */
export interface PolicyRecord {
  scope: string;
  document: PolicyDocument;
  /** The TOML file as it was given to `policy set`. */
  source: string;
  updated: string;
}

/** A policies row as stored: `document` is JSON text, checked by whoever uses it. */
export interface PolicyRow {
  scope: string;
  document: string;
  source: string;
  updated: string;
}

export interface SecretInfo {
  scope: string;
  name: string;
  created: string;
  updated: string;
}

export interface SecretValue {
  scope: string;
  name: string;
  value: Buffer;
}

export const SECRET_NAME_PATTERN = /^[A-Za-z_][A-Za-z0-9_]{0,255}$/;
export const MAX_SECRET_BYTES = 1024 * 1024;

export function checkSecretName(name: string): string {
  if (typeof name !== 'string' || !SECRET_NAME_PATTERN.test(name)) {
    throw usageError(
      `invalid secret name ${JSON.stringify(String(name).slice(0, 80))}`,
      'a secret name is 1-256 characters of A-Z a-z 0-9 _, not starting with a digit',
    );
  }
  return name;
}

export interface AddKeyResult {
  fingerprint: string;
  /** False when the vault already held the key; it was then only assigned to the scope. */
  created: boolean;
  publicBlob: Buffer;
  comment: string;
}

const now = () => new Date().toISOString();

/** expires_at, confirm and destinations: ssh-add's constraints as key_scopes and certificates store them. */
function constraintColumns(constraints: StoredConstraints): [string | null, number, string | null] {
  return [constraints.expiresAt, constraints.confirm ? 1 : 0, constraints.destinations === null ? null : JSON.stringify(constraints.destinations)];
}

export class Vault {
  private readonly statements;
  private lastDataVersion: number;
  private lastSeenVersion: number;
  private currentKeyring: Keyring;
  /** Held while open for factor changes (and zeroed at close): the master key, and the KEKs proved. */
  private readonly masterKey: Buffer;
  private readonly keks: FactorKeks;
  private readonly audit: AuditWriter;
  private readonly auditMacKey: Buffer;

  private constructor(
    readonly paths: VaultPaths,
    keyring: Keyring,
    private readonly db: Db,
    masterKey: Buffer,
    keks: FactorKeks,
  ) {
    this.currentKeyring = keyring;
    this.masterKey = Buffer.alloc(MASTER_KEY_BYTES);
    masterKey.copy(this.masterKey);
    this.keks = new Map([...keks].map(([id, kek]) => [id, Buffer.from(kek)]));
    this.auditMacKey = auditKey(masterKey, keyring.vault_id);
    this.audit = new AuditWriter(paths.audit, db, this.auditMacKey);
    this.statements = {
      dataVersion: db.prepare('PRAGMA data_version').pluck(),
      version: db.prepare(`SELECT value FROM meta WHERE name = 'version'`).pluck(),
      bump: db.prepare(`UPDATE meta SET value = value + 1 WHERE name = 'version'`),
    };
    this.lastDataVersion = this.statements.dataVersion.get() as number;
    this.lastSeenVersion = this.version();
  }

  get keyring(): Keyring {
    return this.currentKeyring;
  }

  /** Refuses to create a vault over existing files. */
  static checkAbsent(paths: VaultPaths): void {
    for (const file of [paths.db, paths.keys]) {
      if (existsSync(file)) {
        throw new KeyholdError(`${file} already exists`, 'pass another --vault, or remove the old vault first');
      }
    }
  }

  /** Creates a new vault with one passphrase factor. Refuses to overwrite anything. */
  static async create(paths: VaultPaths, passphrase: Buffer): Promise<Vault> {
    const enrolled = await enrollPassphrase(passphrase);
    try {
      return Vault.createWithFactors(paths, 'any', [enrolled]);
    } finally {
      enrolled.kek.fill(0);
    }
  }

  /** Creates a new vault whose master key is wrapped by `enrolled` under `policy`. */
  static createWithFactors(paths: VaultPaths, policy: Policy, enrolled: EnrolledFactor[], vaultId = newVaultId()): Vault {
    Vault.checkAbsent(paths);
    mkdirSync(dirname(paths.db), { recursive: true, mode: 0o700 });
    const masterKey = randomBytes(MASTER_KEY_BYTES);
    const keyring = sealKeyring(vaultId, policy, enrolled, masterKey);
    // The key file first: a crash then leaves a key file without a database, which `init`
    // reports, rather than a database nobody can open.
    writeKeyring(paths.keys, keyring);
    try {
      const db = openDatabase(paths.db, masterKey, { create: true });
      db.prepare(`INSERT INTO meta (name, value) VALUES ('vault_id', ?)`).run(vaultId);
      return new Vault(paths, keyring, db, masterKey, new Map(enrolled.map((e) => [e.factor.id, e.kek])));
    } catch (err) {
      for (const file of [paths.db, `${paths.db}-wal`, `${paths.db}-shm`, paths.keys]) {
        try {
          unlinkSync(file);
        } catch {
          /* already gone */
        }
      }
      throw err;
    } finally {
      masterKey.fill(0);
    }
  }

  /**
   * Opens an existing vault. The passphrase is asked for only once the vault files are known to
   * exist; a wrong one exits 4 and nothing is written.
   */
  static open(paths: VaultPaths, getPassphrase: () => Promise<Buffer>): Promise<Vault> {
    return Vault.openWithKeks(paths, async (keyring) => {
      const passphrase = await getPassphrase();
      try {
        return await passphraseKeks(keyring, passphrase);
      } finally {
        passphrase.fill(0);
      }
    });
  }

  /**
   * Opens an existing vault with the KEKs `getKeks` proves for its factors (asked only once the
   * vault files are known to exist). The KEKs are zeroed here; a wrong one exits 4, nothing written.
   */
  static async openWithKeks(paths: VaultPaths, getKeks: (keyring: Keyring) => Promise<FactorKeks>): Promise<Vault> {
    const keyring = readKeyring(paths.keys);
    // Before any factor is asked for: a missing, unusable or unprotected database ends it here.
    checkDatabaseFile(paths.db);
    const keks = await getKeks(keyring);
    try {
      const masterKey = unwrapMasterKey(keyring, keks);
      try {
        return Vault.openWithMasterKey(paths, keyring, masterKey, keks);
      } finally {
        masterKey.fill(0);
      }
    } finally {
      zeroKeks(keks);
    }
  }

  static openWithMasterKey(paths: VaultPaths, keyring: Keyring, masterKey: Buffer, keks: FactorKeks = new Map()): Vault {
    const db = openDatabase(paths.db, masterKey);
    const storedId = db.prepare(`SELECT value FROM meta WHERE name = 'vault_id'`).pluck().get();
    if (storedId !== keyring.vault_id) {
      db.close();
      throw new KeyholdError(
        `${paths.db} belongs to another key file`,
        'restore vault.db and vault.db.keys together from a backup',
      );
    }
    // A key-file rewrite cut short (kill -9 between temp and rename) leaves its temp file.
    removeStaleTemps(paths.keys);
    return new Vault(paths, keyring, db, masterKey, keks);
  }

  /**
   * Rewrites `vault.db.keys` from its current contents. A write transaction on the database
   * serializes this across processes; the key file itself is replaced atomically.
   *
   * The change is audited before it takes effect: the audit line is written and fsynced before
   * the rename, so a rewrap that took effect always has its line. A crash between the two leaves
   * a line for a rewrap that did not happen; that is the side to err on (the log over-reports a
   * change attempt, it never hides one).
   */
  private changeKeyring(change: (current: Keyring) => Keyring, event: AuditEvent): Keyring {
    return this.db
      .transaction(() => {
        // Every key-file writer holds this write lock, so any temp file now is a dead writer's.
        removeStaleTemps(this.paths.keys, { allWritersExcluded: true });
        const current = readKeyring(this.paths.keys);
        if (current.vault_id !== this.currentKeyring.vault_id) {
          throw new KeyholdError(`${this.paths.keys} now belongs to another vault`, 'restore vault.db and vault.db.keys together');
        }
        const next = change(current);
        const bytes = serializeKeyring(next);
        this.record(event);
        this.flushAudit();
        writeKeyringBytes(this.paths.keys, bytes);
        this.currentKeyring = next;
        return next;
      })
      .immediate();
  }

  /** Under policy `all` every factor's KEK is needed to rewrap; the vault has them if it was opened with them. */
  private keksForRewrap(keyring: Keyring, except?: string): FactorKeks {
    if (keyring.policy !== 'all') return new Map();
    const missing = keyring.factors.filter((f) => f.id !== except && !this.keks.has(f.id));
    if (missing.length > 0) {
      throw new KeyholdError('changing the factors of a policy-all vault needs every factor', 'unlock it with all of its factors first', EXIT.DENIED);
    }
    return this.keks;
  }

  /** `peer`: who asked, for the audit line every factor change writes before it takes effect. */
  addFactor(enrolled: EnrolledFactor, peer?: AuditPeer): Factor {
    this.changeKeyring(
      (current) => withFactorAdded(current, this.masterKey, enrolled, this.keksForRewrap(current)),
      { event: 'factor-added', factor: enrolled.factor.id, type: enrolled.factor.type, ...(peer ? { peer } : {}) },
    );
    this.keks.set(enrolled.factor.id, Buffer.from(enrolled.kek));
    return this.factor(enrolled.factor.id);
  }

  removeFactor(id: string, peer?: AuditPeer): void {
    this.changeKeyring(
      (current) => withFactorRemoved(current, this.masterKey, id, this.keksForRewrap(current, id)),
      { event: 'factor-removed', factor: id, ...(peer ? { peer } : {}) },
    );
    this.keks.get(id)?.fill(0);
    this.keks.delete(id);
  }

  /** Replaces a factor's secret in place (same id): a passphrase change. */
  replaceFactor(enrolled: EnrolledFactor, peer?: AuditPeer): Factor {
    const id = enrolled.factor.id;
    this.changeKeyring(
      (current) => withFactorReplaced(current, this.masterKey, enrolled, this.keksForRewrap(current, id)),
      { event: 'factor-changed', factor: id, type: enrolled.factor.type, ...(peer ? { peer } : {}) },
    );
    this.keks.get(id)?.fill(0);
    this.keks.set(id, Buffer.from(enrolled.kek));
    return this.factor(id);
  }

  private factor(id: string): Factor {
    const { wrap: _wrap, ...rest } = this.currentKeyring.factors.find((f) => f.id === id)!;
    return rest as Factor;
  }

  /**
   * Queues an audit event: a CLI process writes it at the next flush (at the latest, at close); in
   * daemon mode the promise resolves once its line is in the file (see AuditWriter).
   */
  record(event: AuditEvent, time?: Date, options?: { signature?: boolean }): Promise<void> {
    return this.audit.record(event, time, options);
  }

  /**
   * Daemon mode: audit lines are written every turn of the event loop, before the replies that
   * wait on them, and the database never makes the event loop wait (busy timeout 0; writers retry).
   */
  serveAudit(log: AuditLogger): void {
    this.db.pragma('busy_timeout = 0');
    this.audit.serve(log);
  }

  /** Resolves when everything recorded so far is in the log file; rejects if it cannot be written. */
  auditWritten(): Promise<void> {
    return this.audit.written();
  }

  /** Null while the audit log can be written. */
  get auditFailure(): AuditFailure | null {
    return this.audit.failure;
  }

  countAuditRefusal(): void {
    this.audit.countRefusal();
  }

  /** Events not yet written (the daemon keeps them in memory across a lock). */
  takeUnwrittenAudit(): { time: Date; event: AuditEvent }[] {
    return this.audit.takeUnwritten();
  }

  flushAudit(): void {
    this.audit.flush();
  }

  /**
   * The same check on a thread of its own (the daemon: its event loop goes on answering while a
   * large log is read and checked). The MAC key is copied to the thread and zeroed there.
   */
  async verifyAuditOffThread(): Promise<VerifyResult> {
    this.flushAudit();
    const job: VerifyJob = { path: this.paths.audit, key: Uint8Array.from(this.auditMacKey), anchor: readAnchor(this.db) };
    const reply = await new Promise<VerifyReply>((resolve, reject) => {
      const worker = new Worker(new URL('../audit/verify-worker.js', import.meta.url), { workerData: job });
      worker.once('message', resolve);
      worker.once('error', reject);
      worker.once('exit', (code) => reject(new KeyholdError(`the audit check stopped (exit ${code})`)));
    });
    job.key.fill(0);
    if ('error' in reply) throw new KeyholdError(reply.error.message, reply.error.hint);
    return reply.result;
  }

  /** Checks the whole audit log against this vault's key and anchor. */
  verifyAudit(): VerifyResult {
    this.flushAudit();
    // The anchor first: the file only grows past it while we read (another writer may append).
    return verifyAuditFile(this.paths.audit, this.auditMacKey, readAnchor(this.db));
  }


  /** Flushes the audit log (unless told not to: the daemon flushes first and keeps what fails), then closes. */
  close(options: { flushAudit?: boolean } = {}): void {
    try {
      if (this.db.open && options.flushAudit !== false) this.audit.flush();
    } finally {
      this.audit.close();
      if (this.db.open) this.db.close();
      this.masterKey.fill(0);
      this.auditMacKey.fill(0);
      zeroKeks(this.keks);
    }
  }

  get isOpen(): boolean {
    return this.db.open;
  }

  /** The version counter: advanced by every change to keys, assignments, tokens or policies. */
  version(): number {
    return this.statements.version.get() as number;
  }

  /**
   * The version counter as of now, cheaply: one `PRAGMA data_version` (a shared-memory read, no
   * page read) tells whether another connection committed; only then is the counter re-read.
   */
  observedVersion(): number {
    const dataVersion = this.statements.dataVersion.get() as number;
    if (dataVersion !== this.lastDataVersion) {
      this.lastDataVersion = dataVersion;
      this.lastSeenVersion = this.version();
    }
    return this.lastSeenVersion;
  }

  private write<T>(fn: () => T): T {
    const result = this.db
      .transaction(() => {
        const value = fn();
        this.statements.bump.run();
        return value;
      })
      .immediate();
    // Our own commits do not move data_version for this connection.
    this.lastSeenVersion = this.version();
    return result;
  }

  /**
   * Stores the key if new and assigns it to the scope. With `constraints` (an add through ssh-add)
   * the assignment's constraints become exactly these, replacing any it had, as OpenSSH's agent
   * replaces a re-added key's; without (keyhold key import/generate) an existing assignment stays
   * as it is.
   */
  addKey(scope: string, key: KeyObject, comment: string, constraints?: StoredConstraints): AddKeyResult {
    checkScopeName(scope);
    const info = describeSupportedKey(key);
    const fp = fingerprint(info.blob);
    return this.write(() => {
      const stored = this.storeKey(key, info, fp, comment);
      if (constraints) {
        this.db
          .prepare(
            `INSERT INTO key_scopes (scope, key_id, assigned_at, expires_at, confirm, destinations) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (scope, key_id) DO UPDATE SET expires_at = excluded.expires_at, confirm = excluded.confirm, destinations = excluded.destinations`,
          )
          .run(
            scope,
            stored.id,
            now(),
            ...constraintColumns(constraints),
          );
      } else {
        this.db
          .prepare('INSERT OR IGNORE INTO key_scopes (scope, key_id, assigned_at) VALUES (?, ?, ?)')
          .run(scope, stored.id, now());
      }
      return { fingerprint: fp, created: stored.created, publicBlob: info.blob, comment: stored.comment };
    });
  }

  /** Inside a write: the key's row, inserted if new. */
  private storeKey(key: KeyObject, info: ReturnType<typeof describeSupportedKey>, fp: string, comment: string): { id: number; created: boolean; comment: string } {
    const existing = this.db.prepare('SELECT id, comment FROM keys WHERE fingerprint = ?').get(fp) as { id: number; comment: string } | undefined;
    if (existing) return { id: existing.id, created: false, comment: existing.comment };
    const pkcs8 = toPkcs8(key);
    try {
      const row = this.db
        .prepare(
          `INSERT INTO keys (fingerprint, type, bits, public_blob, private_pkcs8, comment, created_at)
           VALUES (?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(fp, info.type, info.bits, info.blob, pkcs8, comment, now());
      return { id: Number(row.lastInsertRowid), created: true, comment };
    } finally {
      // SQLite has its own copy once bound: ours is wiped.
      pkcs8.fill(0);
    }
  }

  /**
   * Stores a certificate in a scope, and its private key in the vault if new (the key is not
   * assigned to the scope by this: as OpenSSH's agent, the certificate is an identity of its own).
   * The certificate must verify under its CA and certify this key. With `constraints` (an add
   * through ssh-add) the certificate's constraints become exactly these, replacing any it had, as
   * for a key's assignment; without, an existing certificate stays as it is.
   */
  addCertificate(scope: string, key: KeyObject, certificate: Buffer, comment: string, constraints?: StoredConstraints): AddCertificateResult {
    checkScopeName(scope);
    const info = describeSupportedKey(key);
    const fp = fingerprint(info.blob);
    let cert;
    try {
      cert = parseVerifiedCertificate(certificate);
    } catch (err) {
      throw usageError(`not a valid certificate: ${err instanceof WireFormatError ? err.message : 'malformed'}`);
    }
    if (!cert.publicBlob.equals(info.blob)) throw usageError('the certificate does not certify this key');
    return this.write(() => {
      const stored = this.storeKey(key, info, fp, comment);
      const known = this.db.prepare('SELECT 1 FROM certificates WHERE scope = ? AND blob = ?').get(scope, cert.blob) !== undefined;
      if (constraints) {
        this.db
          .prepare(
            `INSERT INTO certificates (scope, key_id, blob, comment, assigned_at, expires_at, confirm, destinations) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (scope, blob) DO UPDATE SET expires_at = excluded.expires_at, confirm = excluded.confirm, destinations = excluded.destinations`,
          )
          .run(
            scope,
            stored.id,
            cert.blob,
            comment,
            now(),
            ...constraintColumns(constraints),
          );
      } else {
        this.db
          .prepare('INSERT OR IGNORE INTO certificates (scope, key_id, blob, comment, assigned_at) VALUES (?, ?, ?, ?, ?)')
          .run(scope, stored.id, cert.blob, comment, now());
      }
      return { fingerprint: fp, keyCreated: stored.created, created: !known };
    });
  }

  /** Removes one certificate from a scope (its key, and the key's other identities, stay). */
  removeCertificate(scope: string, certificate: Buffer): void {
    checkScopeName(scope);
    this.write(() => {
      const result = this.db.prepare('DELETE FROM certificates WHERE scope = ? AND blob = ?').run(scope, certificate);
      if (result.changes === 0) throw notFound(`that certificate is not in scope ${scope}`, 'see `keyhold key list`');
    });
  }

  listKeys(scope?: string): KeyRecord[] {
    if (scope !== undefined) checkScopeName(scope);
    const rows = this.db
      .prepare(
        `SELECT k.id, k.fingerprint, k.type, k.bits, k.comment, k.public_blob AS publicBlob,
                (SELECT group_concat(scope, char(10)) FROM (SELECT scope FROM key_scopes s WHERE s.key_id = k.id ORDER BY scope)) AS scopes,
                (SELECT json_group_object(scope, expires_at) FROM key_scopes s WHERE s.key_id = k.id AND s.expires_at IS NOT NULL) AS expires
         FROM keys k
         WHERE ? IS NULL OR EXISTS (SELECT 1 FROM key_scopes s WHERE s.key_id = k.id AND s.scope = ?)
                         OR EXISTS (SELECT 1 FROM certificates c WHERE c.key_id = k.id AND c.scope = ?)
         ORDER BY k.id`,
      )
      .all(scope ?? null, scope ?? null, scope ?? null) as (Omit<KeyRecord, 'scopes' | 'expires' | 'certificates'> & { id: number; scopes: string | null; expires: string })[];
    const certificates = this.db
      .prepare(`SELECT key_id AS keyId, scope, blob, comment, expires_at AS expires FROM certificates WHERE ? IS NULL OR scope = ? ORDER BY scope, assigned_at, id`)
      .all(scope ?? null, scope ?? null) as (Omit<CertificateRecord, 'expires'> & { keyId: number; expires: string | null })[];
    return rows.map(({ id, expires, ...r }) => {
      const expiring = JSON.parse(expires) as Record<string, string>;
      return {
        ...r,
        scopes: r.scopes ? r.scopes.split('\n') : [],
        ...(Object.keys(expiring).length > 0 ? { expires: expiring } : {}),
        certificates: certificates
          .filter((c) => c.keyId === id)
          .map(({ keyId: _keyId, expires: until, ...c }) => (until === null ? c : { ...c, expires: until })),
      };
    });
  }

  /** Every identity of every scope (plain assignments and certificates) with its private key, for the key cache. */
  scopeKeys(): ScopeKeyRow[] {
    return this.db
      .prepare(
        `SELECT scope, fingerprint, type, comment, publicBlob, privatePkcs8, expires_at, confirm, destinations, certificate FROM (
           SELECT s.scope, k.fingerprint, k.type, k.comment, k.public_blob AS publicBlob, k.private_pkcs8 AS privatePkcs8,
                  s.expires_at, s.confirm, s.destinations, 0 AS certificate, s.assigned_at AS at, k.id AS seq
           FROM key_scopes s JOIN keys k ON k.id = s.key_id
           UNION ALL
           SELECT c.scope, k.fingerprint, k.type, c.comment, c.blob, k.private_pkcs8, c.expires_at, c.confirm, c.destinations, 1, c.assigned_at, c.id
           FROM certificates c JOIN keys k ON k.id = c.key_id
         ) ORDER BY scope, at, certificate, seq`,
      )
      .all() as ScopeKeyRow[];
  }

  /** Accepts a full `SHA256:…` fingerprint or the part after `SHA256:`. */
  private keyId(fp: string): number {
    const full = fp.startsWith('SHA256:') ? fp : `SHA256:${fp}`;
    const row = this.db.prepare('SELECT id FROM keys WHERE fingerprint = ?').get(full) as { id: number } | undefined;
    if (!row) throw notFound(`no key ${fp} in the vault`, 'see `keyhold key list`');
    return row.id;
  }

  assign(scope: string, fp: string): void {
    checkScopeName(scope);
    this.write(() => {
      this.db
        .prepare('INSERT OR IGNORE INTO key_scopes (scope, key_id, assigned_at) VALUES (?, ?, ?)')
        .run(scope, this.keyId(fp), now());
    });
  }

  unassign(scope: string, fp: string): void {
    checkScopeName(scope);
    this.write(() => {
      const result = this.db.prepare('DELETE FROM key_scopes WHERE scope = ? AND key_id = ?').run(scope, this.keyId(fp));
      if (result.changes === 0) throw notFound(`key ${fp} is not assigned to scope ${scope}`, 'see `keyhold key list`');
    });
  }

  /** Removes the assignments and certificates whose ssh-add lifetime ended by `at` (one transaction). */
  expireAssignments(at: Date): ExpiredAssignment[] {
    const cutoff = at.toISOString();
    const due = () =>
      this.db
        .prepare(
          `SELECT scope, fingerprint, certificate FROM (
             SELECT s.scope, k.fingerprint, NULL AS certificate, s.expires_at AS at FROM key_scopes s JOIN keys k ON k.id = s.key_id
             WHERE s.expires_at IS NOT NULL AND s.expires_at <= ?
             UNION ALL
             SELECT c.scope, k.fingerprint, c.blob, c.expires_at FROM certificates c JOIN keys k ON k.id = c.key_id
             WHERE c.expires_at IS NOT NULL AND c.expires_at <= ?
           ) ORDER BY at`,
        )
        .all(cutoff, cutoff) as { scope: string; fingerprint: string; certificate: Buffer | null }[];
    // Nothing due: no write, and the version counter stays (no cache rebuild for nothing).
    if (due().length === 0) return [];
    return this.write(() => {
      const expired = due();
      this.db.prepare('DELETE FROM key_scopes WHERE expires_at IS NOT NULL AND expires_at <= ?').run(cutoff);
      this.db.prepare('DELETE FROM certificates WHERE expires_at IS NOT NULL AND expires_at <= ?').run(cutoff);
      return expired.map(({ scope, fingerprint, certificate }) => ({ scope, fingerprint, ...(certificate ? { certificate: certificateFactsOf(certificate) } : {}) }));
    });
  }

  /** The earliest ssh-add expiry of any assignment or certificate (ISO), or null. */
  nextExpiry(): string | null {
    return (
      (this.db.prepare('SELECT min(at) FROM (SELECT min(expires_at) AS at FROM key_scopes UNION ALL SELECT min(expires_at) FROM certificates)').pluck().get() as
        | string
        | null) ?? null
    );
  }

  /** The ssh-add constraints of a scope's keys, for `policy show`. */
  scopeConstraints(scope: string): ScopeConstraintRecord[] {
    checkScopeName(scope);
    // Listed as the key cache lists identities: by when added, a key before its certificates.
    const rows = this.db
      .prepare(
        `SELECT fingerprint, comment, certificate, expires_at, confirm, destinations FROM (
           SELECT k.fingerprint, k.comment, NULL AS certificate, s.expires_at, s.confirm, s.destinations, s.assigned_at AS at, 0 AS kind, k.id AS seq
           FROM key_scopes s JOIN keys k ON k.id = s.key_id WHERE s.scope = ?
           UNION ALL
           SELECT k.fingerprint, c.comment, c.blob, c.expires_at, c.confirm, c.destinations, c.assigned_at, 1, c.id
           FROM certificates c JOIN keys k ON k.id = c.key_id WHERE c.scope = ?
         )
         WHERE expires_at IS NOT NULL OR confirm != 0 OR destinations IS NOT NULL
         ORDER BY at, kind, seq`,
      )
      .all(scope, scope) as { fingerprint: string; comment: string; certificate: Buffer | null; expires_at: string | null; confirm: number; destinations: string | null }[];
    return rows.map((row) => {
      let destinations: StoredDestination[] | null = null;
      try {
        destinations = row.destinations === null ? null : (JSON.parse(row.destinations) as StoredDestination[]);
      } catch {
        destinations = [];
      }
      return {
        fingerprint: row.fingerprint,
        comment: row.comment,
        ...(row.certificate ? { certificate: certificateFactsOf(row.certificate) } : {}),
        constraints: { expiresAt: row.expires_at, confirm: row.confirm !== 0, destinations },
      };
    });
  }

  removeKey(fp: string): void {
    this.write(() => {
      this.db.prepare('DELETE FROM keys WHERE id = ?').run(this.keyId(fp));
    });
  }

  /** Scopes that hold anything. A scope exists while a key, a secret, a live token or a policy belongs to it. */
  scopes(): ScopeSummary[] {
    const rows = this.db
      .prepare(
        `SELECT name, sum(keys) AS keys, sum(secrets) AS secrets, sum(tokens) AS tokens, max(policy) AS policy, sum(constrained) AS constrained FROM (
           SELECT scope AS name, count(*) AS keys, 0 AS secrets, 0 AS tokens, 0 AS policy,
                  sum(expires_at IS NOT NULL OR confirm != 0 OR destinations IS NOT NULL) AS constrained
             FROM key_scopes GROUP BY scope
           UNION ALL
           SELECT scope, count(*), 0, 0, 0,
                  sum(expires_at IS NOT NULL OR confirm != 0 OR destinations IS NOT NULL)
             FROM certificates GROUP BY scope
           UNION ALL
           SELECT scope, 0, count(*), 0, 0, 0 FROM secrets GROUP BY scope
           UNION ALL
           SELECT scope, 0, 0, count(*), 0, 0 FROM tokens WHERE revoked_at IS NULL GROUP BY scope
           UNION ALL
           SELECT scope, 0, 0, 0, 1, 0 FROM policies
         ) GROUP BY name ORDER BY name`,
      )
      .all() as (Omit<ScopeSummary, 'policy'> & { policy: number })[];
    return rows.map(({ constrained, ...row }) => ({ ...row, policy: row.policy === 1, ...(constrained ? { constrained } : {}) }));
  }

  // Policies move the version counter: the daemon compiles them once per version.

  /** Stores (or replaces) a scope's policy; the document is checked again here, whoever sent it. */
  setPolicy(scope: string, document: PolicyDocument, source: string): PolicyRecord {
    checkScopeName(scope);
    const checked = checkPolicyDocument(document);
    if (typeof source !== 'string') throw usageError('a policy source is text');
    if (Buffer.byteLength(source) > MAX_POLICY_SOURCE) throw usageError('the policy file is over the 1 MiB limit');
    const record: PolicyRecord = { scope, document: checked, source, updated: now() };
    this.write(() => {
      this.db
        .prepare(
          `INSERT INTO policies (scope, document, source, updated_at) VALUES (?, ?, ?, ?)
           ON CONFLICT (scope) DO UPDATE SET document = excluded.document, source = excluded.source, updated_at = excluded.updated_at`,
        )
        .run(scope, JSON.stringify(checked), source, record.updated);
    });
    return record;
  }

  /** A scope's policy, checked against the schema (a damaged row is an error, not a policy). */
  getPolicy(scope: string): PolicyRecord {
    checkScopeName(scope);
    const row = this.db.prepare(`SELECT ${Vault.POLICY_COLUMNS} FROM policies WHERE scope = ?`).get(scope) as PolicyRow | undefined;
    if (!row) throw notFound(`scope ${scope} has no policy`, `set one with \`keyhold policy set ${scope} FILE\``);
    let document: PolicyDocument;
    try {
      document = checkPolicyDocument(JSON.parse(row.document));
    } catch (err) {
      throw new KeyholdError(
        `the stored policy of scope ${scope} is damaged (${err instanceof KeyholdError ? err.message : 'not JSON'}); the daemon denies every request of this scope`,
        `store it again with \`keyhold policy set ${scope} FILE\``,
      );
    }
    return { ...row, document };
  }

  removePolicy(scope: string): void {
    checkScopeName(scope);
    this.write(() => {
      const result = this.db.prepare('DELETE FROM policies WHERE scope = ?').run(scope);
      if (result.changes === 0) throw notFound(`scope ${scope} has no policy`, 'see `keyhold scope list`');
    });
  }

  private static readonly POLICY_COLUMNS = 'scope, document, source, updated_at AS updated';

  /** Every stored policy as written, for the daemon's per-version cache. */
  policies(): PolicyRow[] {
    return this.db.prepare(`SELECT ${Vault.POLICY_COLUMNS} FROM policies ORDER BY scope`).all() as PolicyRow[];
  }

  // Secrets are not cached by the daemon, so they do not move the version counter.

  /** Creates or replaces a secret; the value is stored as given, byte for byte. */
  setSecret(scope: string, name: string, value: Buffer): { created: boolean } {
    checkScopeName(scope);
    checkSecretName(name);
    if (!Buffer.isBuffer(value)) throw usageError('a secret value is bytes');
    if (value.length > MAX_SECRET_BYTES) {
      throw usageError(`secret value of ${value.length} bytes is over the 1 MiB limit`);
    }
    const time = now();
    return this.db
      .transaction(() => {
        const changed = this.db
          .prepare('UPDATE secrets SET value = ?, updated_at = ? WHERE scope = ? AND name = ?')
          .run(value, time, scope, name).changes;
        if (changed > 0) return { created: false };
        this.db
          .prepare('INSERT INTO secrets (scope, name, value, created_at, updated_at) VALUES (?, ?, ?, ?, ?)')
          .run(scope, name, value, time, time);
        return { created: true };
      })
      .immediate();
  }

  getSecret(scope: string, name: string): Buffer {
    checkScopeName(scope);
    checkSecretName(name);
    const value = this.db.prepare('SELECT value FROM secrets WHERE scope = ? AND name = ?').pluck().get(scope, name) as
      | Buffer
      | undefined;
    if (!value) throw notFound(`no secret ${name} in scope ${scope}`, `see \`keyhold secret list ${scope}\``);
    return value;
  }

  listSecrets(scope: string): SecretInfo[] {
    checkScopeName(scope);
    return this.db
      .prepare('SELECT scope, name, created_at AS created, updated_at AS updated FROM secrets WHERE scope = ? ORDER BY name')
      .all(scope) as SecretInfo[];
  }

  removeSecret(scope: string, name: string): void {
    checkScopeName(scope);
    checkSecretName(name);
    const result = this.db.prepare('DELETE FROM secrets WHERE scope = ? AND name = ?').run(scope, name);
    if (result.changes === 0) throw notFound(`no secret ${name} in scope ${scope}`, `see \`keyhold secret list ${scope}\``);
  }

  /** Every secret of the scopes, with values, in scope order then by name. */
  secretValues(scopes: string[]): SecretValue[] {
    const out: SecretValue[] = [];
    const select = this.db.prepare('SELECT scope, name, value FROM secrets WHERE scope = ? ORDER BY name');
    for (const scope of scopes) out.push(...(select.all(checkScopeName(scope)) as SecretValue[]));
    return out;
  }

  /** Issues a token; the token itself is returned once and stored only as its hash. */
  issueToken(scope: string, subject: string, ttlMs: number | null): { token: string; record: TokenRecord } {
    checkScopeName(scope);
    const token = mintToken();
    const record: TokenRecord = {
      id: newTokenId(),
      scope,
      subject,
      created: now(),
      expires: ttlMs === null ? null : new Date(Date.now() + ttlMs).toISOString(),
      revoked: null,
      prefix: token.slice(0, TOKEN_SHOWN_CHARS),
    };
    this.write(() => {
      this.db
        .prepare(
          `INSERT INTO tokens (id, hash, prefix, scope, subject, created_at, expires_at, revoked_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, NULL)`,
        )
        .run(record.id, tokenHash(token), record.prefix, scope, subject, record.created, record.expires);
    });
    return { token, record };
  }

  private static readonly TOKEN_COLUMNS = `id, scope, subject, created_at AS created, expires_at AS expires,
    revoked_at AS revoked, prefix`;

  listTokens(scope?: string): TokenRecord[] {
    if (scope !== undefined) checkScopeName(scope);
    return this.db
      .prepare(`SELECT ${Vault.TOKEN_COLUMNS} FROM tokens WHERE ? IS NULL OR scope = ? ORDER BY created_at, id`)
      .all(scope ?? null, scope ?? null) as TokenRecord[];
  }

  /** Unrevoked tokens with their hashes (expiry is checked at use), for the daemon's cache. */
  activeTokens(): (TokenRecord & { hash: Buffer })[] {
    return this.db
      .prepare(`SELECT ${Vault.TOKEN_COLUMNS}, hash FROM tokens WHERE revoked_at IS NULL`)
      .all() as (TokenRecord & { hash: Buffer })[];
  }

  /**
   * Revoked tokens' ids by hash: the daemon's log names a refused token as revoked (by id) rather
   * than unknown. Nothing here can authenticate.
   */
  revokedTokenHashes(): { id: string; hash: Buffer }[] {
    return this.db.prepare('SELECT id, hash FROM tokens WHERE revoked_at IS NOT NULL').all() as { id: string; hash: Buffer }[];
  }

  revokeToken(id: string): TokenRecord {
    const select = this.db.prepare(`SELECT ${Vault.TOKEN_COLUMNS} FROM tokens WHERE id = ?`);
    return this.write(() => {
      if (!select.get(id)) throw notFound(`no token ${id}`, 'see `keyhold token list`');
      this.db.prepare('UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL').run(now(), id);
      return select.get(id) as TokenRecord;
    });
  }

  /** Revokes every live token of a scope (and subject); returns how many. */
  revokeTokens(scope: string, subject?: string): number {
    checkScopeName(scope);
    return this.write(
      () =>
        this.db
          .prepare('UPDATE tokens SET revoked_at = ? WHERE scope = ? AND (? IS NULL OR subject = ?) AND revoked_at IS NULL')
          .run(now(), scope, subject ?? null, subject ?? null).changes,
    );
  }
}
