import { isatty } from 'node:tty';
import { hostname, userInfo } from 'node:os';
import { basename } from 'node:path';
import type { Argv } from 'yargs';
import { authorizedKeyLine, fingerprint } from '../agent-protocol/public-key.js';
import { readCapped } from '../read-capped.js';
import { EXIT, KeyholdError, notFound, usageError } from '../errors.js';
import {
  describeSupportedKey,
  KEY_TYPES,
  toPkcs8,
  KeyPassphraseNeeded,
  parsePrivateKeyFile,
  type KeyKind,
  type ParsedKeyFile,
} from '../vault/key-material.js';
import { checkScopeName, type AddKeyResult, type CertificateRecord, type KeyRecord } from '../vault/vault.js';
import { describeCertificate, epochSeconds, parseCertificate } from '../agent-protocol/certificate.js';
import { printJson, printLines, table, withVault, type GlobalArgs } from './common.js';
import { promptHidden, readPassphraseFile } from './passphrase.js';

/** `ssh-ed25519` → `ed25519`, `ecdsa-sha2-nistp256` → `ecdsa`: the names `--type` takes. */
export function keyKind(sshType: string): string {
  if (sshType === 'ssh-ed25519') return 'ed25519';
  if (sshType === 'ssh-rsa') return 'rsa';
  return 'ecdsa';
}

function keyJson(record: Pick<KeyRecord, 'fingerprint' | 'type' | 'bits' | 'comment' | 'scopes' | 'publicBlob' | 'expires'>) {
  return {
    fingerprint: record.fingerprint,
    type: keyKind(record.type),
    bits: record.bits,
    comment: record.comment,
    scopes: record.scopes,
    ...(record.expires ? { expires: record.expires } : {}),
    public: authorizedKeyLine(record.publicBlob, record.comment),
  };
}

/** A stored certificate for people (an expired one is still served: the server judges it). */
function certificateSummary(blob: Buffer): string {
  try {
    return describeCertificate(parseCertificate(blob));
  } catch {
    return 'unreadable certificate';
  }
}

function certificateJson(record: CertificateRecord) {
  // `expires`: when its ssh-add lifetime ends; `expired` (below): whether the certificate's own validity has.
  const base = {
    scope: record.scope,
    comment: record.comment,
    ...(record.expires ? { expires: record.expires } : {}),
    public: authorizedKeyLine(record.blob, record.comment),
  };
  try {
    const cert = parseCertificate(record.blob);
    const now = epochSeconds();
    return {
      ...base,
      kind: cert.kind,
      key_id: cert.keyId,
      serial: cert.serial.toString(),
      principals: cert.principals,
      valid_after: cert.validAfter.toString(),
      valid_before: cert.validBefore.toString(),
      expired: now >= cert.validBefore,
      ca: fingerprint(cert.signatureKey),
    };
  } catch {
    return base;
  }
}

const defaultComment = () => {
  try {
    return `${userInfo().username}@${hostname()}`;
  } catch {
    return hostname();
  }
};

function reportAdded(args: GlobalArgs, scope: string, added: AddKeyResult, record: KeyRecord): void {
  if (args.json) {
    printJson({ ...keyJson(record), created: added.created });
    return;
  }
  if (!added.created) process.stderr.write(`keyhold: the vault already held ${added.fingerprint}; assigned it to ${scope}\n`);
  process.stdout.write(authorizedKeyLine(added.publicBlob, added.comment) + '\n');
}

/** Key files are small (an RSA-16384 key is about 12 KB): anything far larger is not one. */
const MAX_KEY_FILE = 1024 * 1024;

function readKeyFile(file: string): Buffer {
  return readCapped(file, MAX_KEY_FILE, 'key file');
}

async function parseKeyFile(file: string, passphraseFile: string | undefined): Promise<ParsedKeyFile> {
  const bytes = readKeyFile(file);
  const passphrase = passphraseFile ? readPassphraseFile(passphraseFile, 'key passphrase file') : undefined;
  try {
    return parsePrivateKeyFile(bytes, file, passphrase);
  } catch (err) {
    if (!(err instanceof KeyPassphraseNeeded) || passphrase || !isatty(0)) throw err;
    const typed = await promptHidden(`Passphrase for ${file}: `);
    try {
      return parsePrivateKeyFile(bytes, file, typed);
    } finally {
      typed.fill(0);
    }
  } finally {
    bytes.fill(0);
    passphrase?.fill(0);
  }
}

export function keyCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command('key', 'manage the keys in the vault', (y) =>
    y
      .command(
        'generate <scope>',
        'generate a key in the vault and print its public line',
        (c) =>
          c
            .positional('scope', { type: 'string', demandOption: true })
            .option('type', { choices: KEY_TYPES, default: 'ed25519' as KeyKind, describe: 'key type' })
            .option('bits', { type: 'number', describe: 'rsa: 2048-16384 (default 3072); ecdsa: 256, 384 or 521' })
            .option('comment', { type: 'string', describe: 'comment (default user@host)' }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          if (args.bits !== undefined && !Number.isInteger(args.bits)) throw usageError('--bits takes a whole number');
          const { added, record } = await withVault(args, (api) => api.generateKey(scope, args.type, args.bits, args.comment ?? defaultComment()));
          reportAdded(args, scope, added, record);
        },
      )
      .command(
        'import <scope> <file>',
        'import a private key file (OpenSSH, PEM PKCS#1/SEC1, PKCS#8)',
        (c) =>
          c
            .positional('scope', { type: 'string', demandOption: true })
            .positional('file', { type: 'string', demandOption: true })
            .option('comment', { type: 'string', describe: "comment (default: the file's own, else its name)" })
            .option('key-passphrase-file', { type: 'string', describe: 'passphrase of an encrypted key file (- for stdin)' }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          const parsed = await parseKeyFile(args.file, args['key-passphrase-file']);
          const comment = args.comment ?? parsed.comment ?? basename(args.file);
          describeSupportedKey(parsed.key);
          const { added, record } = await withVault(args, (api) => api.importKey(scope, toPkcs8(parsed.key), comment));
          reportAdded(args, scope, added, record);
        },
      )
      .command(
        'list',
        'list the keys, with their scopes',
        (c) => c.option('scope', { type: 'string', describe: 'only keys of this scope' }),
        async (args) => {
          const scope = args.scope === undefined ? undefined : checkScopeName(args.scope);
          const keys = await withVault(args, (api) => api.listKeys(scope));
          if (args.json) return printJson(keys.map((k) => ({ ...keyJson(k), certificates: k.certificates.map(certificateJson) })));
          printLines(
            table(
              ['FINGERPRINT', 'TYPE', 'BITS', 'SCOPES', 'COMMENT'],
              // An assignment ssh-add -t gave a lifetime: `web (until 2026-12-01T23:00:00.000Z)`.
              keys.map((k) => [
                k.fingerprint,
                keyKind(k.type),
                String(k.bits),
                k.scopes.map((scope) => (k.expires?.[scope] ? `${scope} (until ${k.expires[scope]})` : scope)).join(','),
                k.comment,
              ]),
            ),
          );
          // Certificates are identities of their own in a scope: one line each, under the table.
          const certificateLines = keys.flatMap((k) =>
            k.certificates.map((c) => `  ${k.fingerprint} in ${c.scope}${c.expires ? ` (until ${c.expires})` : ''}: ${certificateSummary(c.blob)}`),
          );
          if (certificateLines.length > 0) printLines(['certificates:', ...certificateLines]);
        },
      )
      .command(
        'pub <scope>',
        "print a scope's public keys as authorized_keys lines",
        (c) => c.positional('scope', { type: 'string', demandOption: true }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          // The public keys are inside the vault, which SQLCipher encrypts as a whole; a clear-text
          // copy beside it would leak the scopes and could be swapped unnoticed (pasted into
          // authorized_keys), so `pub` reads them from a running, unlocked daemon or opens the vault.
          const keys = await withVault(args, (api) => api.listKeys(scope)).catch((err: unknown) => {
            if (err instanceof KeyholdError && err.exitCode === EXIT.LOCKED) {
              throw new KeyholdError(
                `cannot read the public keys of ${scope}, which are inside the encrypted vault: ${err.message}`,
                `run \`keyhold unlock\` once: while the daemon stays unlocked \`key pub\` needs no passphrase; or ${err.hint ?? 'give a passphrase source'}`,
                EXIT.LOCKED,
              );
            }
            throw err;
          });
          if (keys.length === 0) throw notFound(`scope ${scope} has no keys`, `generate one with \`keyhold key generate ${scope}\``);
          if (args.json) return printJson(keys.map(keyJson));
          printLines(keys.map((k) => authorizedKeyLine(k.publicBlob, k.comment)));
        },
      )
      .command(
        'assign <scope> <fingerprint>',
        'offer a key of the vault in another scope too',
        (c) => c.positional('scope', { type: 'string', demandOption: true }).positional('fingerprint', { type: 'string', demandOption: true }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          await withVault(args, (api) => api.assign(scope, args.fingerprint));
          if (args.json) printJson({ scope: args.scope, fingerprint: args.fingerprint, assigned: true });
        },
      )
      .command(
        'unassign <scope> <fingerprint>',
        'stop offering a key in a scope (the key stays in the vault)',
        (c) => c.positional('scope', { type: 'string', demandOption: true }).positional('fingerprint', { type: 'string', demandOption: true }),
        async (args) => {
          const scope = checkScopeName(args.scope);
          await withVault(args, (api) => api.unassign(scope, args.fingerprint));
          if (args.json) printJson({ scope: args.scope, fingerprint: args.fingerprint, assigned: false });
        },
      )
      .command(
        'rm <fingerprint>',
        'delete a key from the vault and every scope',
        (c) => c.positional('fingerprint', { type: 'string', demandOption: true }),
        async (args) => {
          await withVault(args, (api) => api.removeKey(args.fingerprint));
          if (args.json) printJson({ fingerprint: args.fingerprint, removed: true });
        },
      )
      .demandCommand(1, 'name a key command: generate, import, list, pub, assign, unassign, rm'),
  );
}
