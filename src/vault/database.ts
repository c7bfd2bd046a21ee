// The encrypted SQLite file: SQLCipher 4 format keyed with the raw 256-bit master key, WAL,
// foreign keys, and forward-only schema migrations tracked in PRAGMA user_version.
import Database from 'better-sqlite3-multiple-ciphers';
import { accessSync, closeSync, constants, openSync, statSync } from 'node:fs';
import { checkPrivateMode } from '../read-capped.js';
import { dirname } from 'node:path';
import { EXIT, KeyholdError } from '../errors.js';

export type Db = Database.Database;

/** Another connection holds the lock this statement needs (SQLITE_BUSY and its extended codes). */
export function isBusyError(err: unknown): boolean {
  return String((err as { code?: unknown } | null)?.code ?? '').startsWith('SQLITE_BUSY');
}

interface Migration {
  version: number;
  up(db: Db): void;
}

const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    up(db) {
      db.exec(`
        CREATE TABLE meta (
          name TEXT PRIMARY KEY,
          value ANY
        ) STRICT;
        INSERT INTO meta (name, value) VALUES ('version', 0);

        CREATE TABLE keys (
          id INTEGER PRIMARY KEY,
          fingerprint TEXT NOT NULL UNIQUE,
          type TEXT NOT NULL,
          bits INTEGER NOT NULL,
          public_blob BLOB NOT NULL,
          private_pkcs8 BLOB NOT NULL,
          comment TEXT NOT NULL DEFAULT '',
          created_at TEXT NOT NULL
        ) STRICT;

        CREATE TABLE key_scopes (
          scope TEXT NOT NULL,
          key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
          assigned_at TEXT NOT NULL,
          PRIMARY KEY (scope, key_id)
        ) STRICT, WITHOUT ROWID;
        CREATE INDEX key_scopes_by_key ON key_scopes(key_id);
      `);
    },
  },
  {
    version: 2,
    up(db) {
      // Only the token's SHA-256 is kept; `prefix` is its first 8 characters, for listings.
      db.exec(`
        CREATE TABLE tokens (
          id TEXT PRIMARY KEY,
          hash BLOB NOT NULL UNIQUE,
          prefix TEXT NOT NULL,
          scope TEXT NOT NULL,
          subject TEXT NOT NULL,
          created_at TEXT NOT NULL,
          expires_at TEXT,
          revoked_at TEXT
        ) STRICT;
        CREATE INDEX tokens_by_scope ON tokens(scope, subject);
      `);
    },
  },
  {
    version: 3,
    up(db) {
      // Values are bytes (binary-safe); the whole file is encrypted, so they are not in the clear.
      db.exec(`
        CREATE TABLE secrets (
          scope TEXT NOT NULL,
          name TEXT NOT NULL,
          value BLOB NOT NULL,
          created_at TEXT NOT NULL,
          updated_at TEXT NOT NULL,
          PRIMARY KEY (scope, name)
        ) STRICT, WITHOUT ROWID;
      `);
    },
  },
  {
    version: 4,
    up(db) {
      // `document` is the validated PolicyDocument as JSON (host names already resolved), what the
      // daemon compiles; `source` is the TOML file as given, kept for people, never evaluated.
      db.exec(`
        CREATE TABLE policies (
          scope TEXT PRIMARY KEY,
          document TEXT NOT NULL,
          source TEXT NOT NULL,
          updated_at TEXT NOT NULL
        ) STRICT;
      `);
    },
  },
  {
    version: 5,
    up(db) {
      // ssh-add's constraints live with the assignment they constrain (-c, -t, -h): unassigning
      // drops them. `destinations` is the restrict-destination hops as JSON (host keys base64).
      db.exec(`
        ALTER TABLE key_scopes ADD COLUMN expires_at TEXT;
        ALTER TABLE key_scopes ADD COLUMN confirm INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE key_scopes ADD COLUMN destinations TEXT;
      `);
    },
  },
  // Version 6 touches only its own table, so it applies on top of 5 (columns of key_scopes).
  {
    version: 6,
    up(db) {
      // A certificate is an identity of its own in a scope, as in OpenSSH's agent: it is listed
      // and removed apart from its key's plain assignment. The private key is kept once, in
      // `keys` (deleting the key deletes its certificates). `blob` is the certificate as added.
      // expires_at, confirm and destinations are the same constraints as key_scopes' (ssh-add -t,
      // -c, -h given with a certificate).
      db.exec(`
        CREATE TABLE certificates (
          id INTEGER PRIMARY KEY,
          scope TEXT NOT NULL,
          key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
          blob BLOB NOT NULL,
          comment TEXT NOT NULL DEFAULT '',
          assigned_at TEXT NOT NULL,
          expires_at TEXT,
          confirm INTEGER NOT NULL DEFAULT 0,
          destinations TEXT,
          UNIQUE (scope, blob)
        ) STRICT;
        CREATE INDEX certificates_by_key ON certificates(key_id);
      `);
    },
  },
];

export const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]!.version;

function keyPragma(masterKey: Buffer): string {
  // A raw key (x'…') skips SQLCipher's own PBKDF2: the master key is already uniformly random.
  return `key = "x'${masterKey.toString('hex')}'"`;
}

/** The database does not open under this master key (or is no keyhold vault at all). */
export class VaultKeyMismatchError extends KeyholdError {}

/**
 * Opens (or, with `create`, creates) the vault database. A wrong key or a file that is not a
 * keyhold vault is reported without a stack trace and without touching the file.
 */
export function openDatabase(path: string, masterKey: Buffer, options: { create?: boolean } = {}): Db {
  if (!options.create) checkDatabaseFile(path);
  // Created here, 0600 and empty (SQLite takes an empty file for a new database), so that the
  // database is never readable by others, whatever the umask, and its -wal and -shm, which SQLite
  // creates with the database file's mode, are 0600 too.
  else createPrivateFile(path);
  let db: Db;
  try {
    db = new Database(path, { fileMustExist: !options.create });
  } catch (err) {
    if ((err as { code?: string }).code === 'SQLITE_CANTOPEN') {
      throw new KeyholdError(`no vault database at ${path}`, 'create a vault with `keyhold init`, or pass --vault');
    }
    throw new KeyholdError(`cannot open ${path}: ${(err as Error).message}`);
  }
  try {
    db.pragma(`cipher = 'sqlcipher'`);
    db.pragma('legacy = 4');
    db.pragma(keyPragma(masterKey));
    db.prepare('SELECT count(*) FROM sqlite_master').get();
    // An existing vault has its schema: an empty or foreign file must not be migrated into one.
    if (!options.create && !db.prepare(`SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'`).get()) {
      throw new Error('no schema');
    }
  } catch (err) {
    db.close();
    const code = (err as { code?: string }).code;
    // Anything but "this is not a database under that key" (a busy or failing disk, no file
    // descriptors) says nothing about the key, and must not be taken for a wrong one.
    if (code !== undefined && code !== 'SQLITE_NOTADB' && code !== 'SQLITE_CORRUPT') {
      throw new KeyholdError(`cannot read ${path}: ${(err as Error).message}`, 'try again; check the disk and the process limits');
    }
    throw new VaultKeyMismatchError(
      `${path} is not a keyhold vault or does not match its key file`,
      'check --vault, or restore vault.db and vault.db.keys together from a backup',
    );
  }
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.pragma('foreign_keys = ON');
    db.pragma('busy_timeout = 10000');
    db.pragma('secure_delete = ON');
    migrate(db);
  } catch (err) {
    db.close();
    if (err instanceof KeyholdError) throw err;
    throw new KeyholdError(`cannot prepare vault ${path}: ${(err as Error).message}`);
  }
  return db;
}

function createPrivateFile(path: string): void {
  try {
    closeSync(openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw new KeyholdError(`${path} already exists`, 'pass another --vault, or remove the old vault first');
    throw new KeyholdError(`cannot create ${path}: ${code ?? 'error'}`, 'check the directory and its permissions');
  }
}

/**
 * Errors SQLite would report badly: a missing file as "no vault", an unreadable one the same, a
 * read-only file or directory as a wrong key or a crash at the first write. And what SQLite would
 * not report at all: a vault file others can read or write, refused as ssh refuses an unprotected
 * private key. The -wal holds the same encrypted pages as the database (and a writable -wal or
 * -shm lets others corrupt it), so they follow the same rule when present.
 */
export function checkDatabaseFile(path: string): void {
  let stat;
  try {
    stat = statSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new KeyholdError(`no vault database at ${path}`, 'create a vault with `keyhold init`, or pass --vault', EXIT.NOT_FOUND);
    throw new KeyholdError(`cannot open ${path}: ${code ?? 'error'}`, 'check the path and its permissions');
  }
  if (!stat.isFile()) throw new KeyholdError(`${path} is not a file`, 'pass the vault file with --vault');
  if (stat.size === 0) throw new KeyholdError(`${path} is empty, not a keyhold vault`, 'restore vault.db from a backup');
  checkPrivateMode(stat, path);
  for (const companion of [`${path}-wal`, `${path}-shm`]) {
    let companionStat;
    try {
      companionStat = statSync(companion);
    } catch {
      continue;
    }
    checkPrivateMode(companionStat, companion);
  }
  for (const [target, what] of [
    [path, 'the vault file'],
    [dirname(path), 'its directory (SQLite keeps its journal beside it)'],
  ] as const) {
    try {
      accessSync(target, constants.R_OK | constants.W_OK);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new KeyholdError(`cannot use ${target}: ${code === 'EACCES' || code === 'EROFS' ? 'permission denied' : (code ?? 'error')}`, `keyhold needs to read and write ${what}`);
    }
  }
}

function migrate(db: Db): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  if (current > SCHEMA_VERSION) {
    throw new KeyholdError(
      `vault schema version ${current} is newer than this keyhold understands (${SCHEMA_VERSION})`,
      'upgrade keyhold',
    );
  }
  if (current === SCHEMA_VERSION) return;
  db.transaction(() => {
    // Re-read inside the write lock: another process may have migrated meanwhile.
    const start = db.pragma('user_version', { simple: true }) as number;
    for (const migration of MIGRATIONS) {
      if (migration.version <= start) continue;
      migration.up(db);
      db.pragma(`user_version = ${migration.version}`);
    }
  }).immediate();
}
