// `keyhold token issue | list | revoke` through the real CLI: output shapes, hash-only storage,
// masked listings, expiry, revocation by id / scope / subject, and exit codes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { TokenCache } from '../../src/tokens/token-cache.js';
import { openDatabase } from '../../src/vault/database.js';
import { readKeyring } from '../../src/vault/keyring.js';
import { unwrapWithPassphrase } from '../../src/unlock/prove.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';
import { initVault, keyhold, keyholdOk, makeKeyholdEnv, type KeyholdEnv } from '../helpers/keyhold.js';

const TOKEN_RE = /^khp_[A-Za-z0-9_-]{43}$/;

interface Issued {
  id: string;
  token: string;
  scope: string;
  subject: string;
  expires: string | null;
}

interface Listed {
  id: string;
  scope: string;
  subject: string;
  created: string;
  expires: string | null;
  revoked: string | null;
  prefix: string;
}

let k: KeyholdEnv;

beforeAll(() => {
  k = makeKeyholdEnv('keyhold-token-cli-');
  initVault(k);
});
afterAll(() => k?.cleanup());

function issue(scope: string, extra: string[] = []): Issued {
  return JSON.parse(keyholdOk(k, ['token', 'issue', scope, '--json', ...extra])) as Issued;
}

function list(extra: string[] = []): Listed[] {
  return JSON.parse(keyholdOk(k, ['token', 'list', '--json', ...extra])) as Listed[];
}

function byId(id: string): Listed {
  const found = list().find((t) => t.id === id);
  if (!found) throw new Error(`token ${id} not listed`);
  return found;
}

/** Every 9-character window of the token: a listing may show at most its first 8 characters. */
function leaksMoreThan8(text: string, token: string): string | null {
  for (let i = 0; i + 9 <= token.length; i++) {
    const window = token.slice(i, i + 9);
    if (text.includes(window)) return window;
  }
  return null;
}

async function openDirect(): Promise<Vault> {
  return Vault.open(vaultPaths(k.vault), async () => Buffer.from(k.passphrase));
}

describe('token issue', () => {
  it('--json has exactly id, token, scope, subject, expires; the token has the contract format', () => {
    const out = issue('web', ['--subject', 'ci-42']);
    const again = issue('web', ['--subject', 'ci-42']);
    expect(again.token).not.toBe(out.token);
    expect(again.id).not.toBe(out.id);
    expect(Object.keys(out).sort()).toEqual(['expires', 'id', 'scope', 'subject', 'token']);
    expect(out.token).toMatch(TOKEN_RE);
    expect(typeof out.id).toBe('string');
    expect(out.id.length).toBeGreaterThan(0);
    expect(out.id).not.toContain(out.token.slice(4, 12));
    expect(out.scope).toBe('web');
    expect(out.subject).toBe('ci-42');
    expect(out.expires).toBeNull();
  });

  it('--ttl 8h sets an expiry 8 hours from now', () => {
    const before = Date.now();
    const out = issue('web', ['--ttl', '8h']);
    const after = Date.now();
    const expires = Date.parse(out.expires!);
    expect(Number.isNaN(expires)).toBe(false);
    expect(expires).toBeGreaterThanOrEqual(before + 8 * 3_600_000 - 1000);
    expect(expires).toBeLessThanOrEqual(after + 8 * 3_600_000 + 1000);
  });

  it('without --json prints only the token and a newline', () => {
    const r = keyhold(k, ['token', 'issue', 'web', '--subject', 'plain']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^khp_[A-Za-z0-9_-]{43}\n$/);
  });

  it('a bad --ttl is a usage error (exit 2) and issues nothing', () => {
    const count = list().length;
    for (const ttl of ['5', '0s', '2w', 'abc', '1.5h', '-1h', '10 m']) {
      const r = keyhold(k, ['token', 'issue', 'web', `--ttl=${ttl}`]);
      expect(r.status, `--ttl ${JSON.stringify(ttl)}: ${r.stderr}`).toBe(2);
      expect(r.stdout, `--ttl ${JSON.stringify(ttl)}`).toBe('');
      expect(r.stderr).toMatch(/^keyhold: /);
      expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
    }
    expect(list().length).toBe(count);
  });

  it('an invalid scope name is a usage error (exit 2)', () => {
    const r = keyhold(k, ['token', 'issue', 'bad/scope']);
    expect(r.status, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/^keyhold: invalid scope/);
    expect(r.stdout).toBe('');
  });
});

describe('hash-only storage', () => {
  it('the token (as text, base64, hex, raw bytes) is in none of the vault files; the decrypted DB holds only its SHA-256', async () => {
    const issued = [issue('web', ['--subject', 'store-1']), issue('api', ['--subject', 'store-2', '--ttl', '1h'])];
    const dir = dirname(k.vault);
    const files = readdirSync(dir)
      .filter((name) => name.startsWith('vault.db'))
      .map((name) => join(dir, name));
    expect(files).toContain(k.vault);
    expect(files).toContain(`${k.vault}.keys`);
    for (const { token } of issued) {
      const body = token.slice(4);
      const forms: [string, Buffer][] = [
        ['text', Buffer.from(token)],
        ['body', Buffer.from(body)],
        ['base64', Buffer.from(Buffer.from(token).toString('base64'))],
        ['hex', Buffer.from(Buffer.from(token).toString('hex'))],
        ['raw bits', Buffer.from(body, 'base64url')],
        ['raw bits hex', Buffer.from(Buffer.from(body, 'base64url').toString('hex'))],
        ['utf16', Buffer.from(token, 'utf16le')],
      ];
      for (const file of files) {
        const contents = readFileSync(file);
        for (const [name, needle] of forms) expect(contents.includes(needle), `${name} form of the token in ${file}`).toBe(false);
      }
    }

    // Decrypted: no column of any table holds the token in any form; tokens.hash is its SHA-256.
    const paths = vaultPaths(k.vault);
    const masterKey = await unwrapWithPassphrase(readKeyring(paths.keys), Buffer.from(k.passphrase));
    const db = openDatabase(paths.db, masterKey);
    masterKey.fill(0);
    try {
      const tables = db.prepare(`SELECT name FROM sqlite_master WHERE type = 'table'`).pluck().all() as string[];
      expect(tables).toContain('tokens');
      const dump: string[] = [];
      for (const table of tables) {
        for (const row of db.prepare(`SELECT * FROM "${table}"`).all() as Record<string, unknown>[]) {
          for (const value of Object.values(row)) {
            if (Buffer.isBuffer(value)) dump.push(value.toString('latin1'), value.toString('hex'), value.toString('base64'));
            else dump.push(String(value));
          }
        }
      }
      const text = dump.join('\n');
      for (const { id, token } of issued) {
        const body = token.slice(4);
        expect(text.includes(token), 'token text in the decrypted vault').toBe(false);
        expect(text.includes(body), 'token body in the decrypted vault').toBe(false);
        expect(text.includes(Buffer.from(body, 'base64url').toString('latin1')), 'raw token bits in the decrypted vault').toBe(false);
        expect(text.includes(Buffer.from(body, 'base64url').toString('hex')), 'raw token bits (hex) in the decrypted vault').toBe(false);
        expect(leaksMoreThan8(text, token), 'more than 8 characters of the token in the decrypted vault').toBeNull();
        const row = db.prepare('SELECT hash FROM tokens WHERE id = ?').get(id) as { hash: Buffer } | undefined;
        expect(row, `row for ${id}`).toBeDefined();
        expect(Buffer.from(row!.hash).equals(createHash('sha256').update(token).digest())).toBe(true);
      }
    } finally {
      db.close();
    }
  });
});

describe('token list (masked)', () => {
  it('--json: id, scope, subject, created, expires, revoked and a prefix of at most 8 characters; never the token', () => {
    const a = issue('listing', ['--subject', 'ci-1']);
    const b = issue('listing', ['--subject', 'ci-2', '--ttl', '30m']);
    const out = keyholdOk(k, ['token', 'list', '--json']);
    const rows = JSON.parse(out) as Listed[];
    expect(Array.isArray(rows)).toBe(true);
    for (const [issued, subject] of [
      [a, 'ci-1'],
      [b, 'ci-2'],
    ] as const) {
      const row = rows.find((r) => r.id === issued.id);
      expect(row, `row for ${issued.id}`).toBeDefined();
      expect(Object.keys(row!).sort()).toEqual(['created', 'expires', 'id', 'prefix', 'revoked', 'scope', 'subject']);
      expect(row!.scope).toBe('listing');
      expect(row!.subject).toBe(subject);
      expect(row!.revoked).toBeNull();
      expect(row!.expires).toBe(issued.expires);
      expect(Number.isNaN(Date.parse(row!.created))).toBe(false);
      expect(typeof row!.prefix).toBe('string');
      expect(row!.prefix.length).toBeLessThanOrEqual(8);
      expect(issued.token.startsWith(row!.prefix)).toBe(true);
      for (const [field, value] of Object.entries(row!)) {
        expect(String(value).includes(issued.token), `field ${field} holds the token`).toBe(false);
      }
    }
    for (const issued of [a, b]) expect(leaksMoreThan8(out, issued.token), 'list --json shows more than 8 characters').toBeNull();
  });

  it('text listing shows at most the first 8 characters and the state', () => {
    const a = issue('listing-text', ['--subject', 'who']);
    const out = keyholdOk(k, ['token', 'list', '--scope', 'listing-text']);
    const line = out.split('\n').find((l) => l.includes(a.id));
    expect(line, out).toBeDefined();
    expect(line).toContain('listing-text');
    expect(line).toContain('who');
    expect(line).toMatch(/\bactive\b/);
    expect(leaksMoreThan8(out, a.token), 'text list shows more than 8 characters').toBeNull();
  });

  it('--scope filters', () => {
    const x = issue('filter-x');
    const y = issue('filter-y');
    const rows = list(['--scope', 'filter-x']);
    expect(rows.map((r) => r.id)).toEqual([x.id]);
    expect(rows.every((r) => r.scope === 'filter-x')).toBe(true);
    expect(rows.map((r) => r.id)).not.toContain(y.id);
    expect(list(['--scope', 'filter-none'])).toEqual([]);
  });
});

describe('expiry', () => {
  it('--ttl 5s: accepted now, refused after ~5.5 s; the listing says expired', async () => {
    const issuedAt = Date.now();
    // 5 s: the direct vault open (scrypt) and the lookup must fit before it ends on a loaded machine.
    const t = issue('expiry', ['--ttl', '5s', '--subject', 'short']);
    const expires = Date.parse(t.expires!);
    expect(expires).toBeGreaterThan(issuedAt + 4000);
    expect(expires).toBeLessThanOrEqual(Date.now() + 5000 + 50);

    const vault = await openDirect();
    try {
      const cache = new TokenCache(vault);
      const live = cache.lookup(Buffer.from(t.token));
      expect(live, 'token refused before its expiry').not.toBeNull();
      expect(live!.id).toBe(t.id);
      expect(Date.now()).toBeLessThan(expires);

      // From the expiry the CLI reported: issuing can take a while on a busy machine.
      await new Promise((r) => setTimeout(r, Math.max(0, expires + 500 - Date.now(), issuedAt + 5500 - Date.now())));
      expect(cache.lookup(Buffer.from(t.token)), 'token accepted after its expiry').toBeNull();
      expect(cache.usable(t.id)).toBe(false);
    } finally {
      vault.close();
    }
    const line = keyholdOk(k, ['token', 'list', '--scope', 'expiry'])
      .split('\n')
      .find((l) => l.includes(t.id));
    expect(line).toMatch(/\bexpired\b/);
    // Expired, not revoked.
    expect(byId(t.id).revoked).toBeNull();
  });
});

describe('token revoke', () => {
  it('by id: that token only; --json returns the revoked record without the token', async () => {
    const a = issue('rev-id', ['--subject', 's']);
    const b = issue('rev-id', ['--subject', 's']);
    const out = keyholdOk(k, ['token', 'revoke', a.id, '--json']);
    const record = JSON.parse(out) as Listed;
    expect(record.id).toBe(a.id);
    expect(record.revoked).not.toBeNull();
    expect(leaksMoreThan8(out, a.token)).toBeNull();

    const vault = await openDirect();
    try {
      const cache = new TokenCache(vault);
      expect(cache.lookup(Buffer.from(a.token))).toBeNull();
      expect(cache.lookup(Buffer.from(b.token))).not.toBeNull();
    } finally {
      vault.close();
    }
    const text = keyholdOk(k, ['token', 'list', '--scope', 'rev-id']).split('\n');
    expect(text.find((l) => l.includes(a.id))).toMatch(/\brevoked\b/);
    expect(text.find((l) => l.includes(b.id))).toMatch(/\bactive\b/);
  });

  it('by --scope and --subject: only the matching tokens', () => {
    const m1 = issue('rev-s', ['--subject', 'ci-1']);
    const m2 = issue('rev-s', ['--subject', 'ci-1']);
    const otherSubject = issue('rev-s', ['--subject', 'ci-2']);
    const otherScope = issue('rev-s2', ['--subject', 'ci-1']);
    const out = JSON.parse(keyholdOk(k, ['token', 'revoke', '--scope', 'rev-s', '--subject', 'ci-1', '--json'])) as {
      revoked: number;
    };
    expect(out.revoked).toBe(2);
    const rows = list();
    const revoked = (id: string) => rows.find((t) => t.id === id)!.revoked;
    expect(revoked(m1.id)).not.toBeNull();
    expect(revoked(m2.id)).not.toBeNull();
    expect(revoked(otherSubject.id)).toBeNull();
    expect(revoked(otherScope.id)).toBeNull();
  });

  it('by --scope: every token of that scope, none of another', () => {
    const s1 = issue('rev-all', ['--subject', 'a']);
    const s2 = issue('rev-all', ['--subject', 'b']);
    const keep = issue('rev-keep', ['--subject', 'a']);
    const r = keyhold(k, ['token', 'revoke', '--scope', 'rev-all']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/revoked 2 tokens/);
    const rows = list();
    const revoked = (id: string) => rows.find((t) => t.id === id)!.revoked;
    expect(revoked(s1.id)).not.toBeNull();
    expect(revoked(s2.id)).not.toBeNull();
    expect(revoked(keep.id)).toBeNull();
  });

  it('an unknown id exits 5 and revokes nothing', () => {
    const before = list().filter((t) => t.revoked === null).length;
    const r = keyhold(k, ['token', 'revoke', 'tok_000000000000']);
    expect(r.status, r.stderr).toBe(5);
    expect(r.stderr).toMatch(/^keyhold: /);
    expect(list().filter((t) => t.revoked === null).length).toBe(before);
  });

  it('neither an id nor --scope, or both, is a usage error (exit 2)', () => {
    const t = issue('rev-usage');
    expect(keyhold(k, ['token', 'revoke']).status).toBe(2);
    expect(keyhold(k, ['token', 'revoke', t.id, '--scope', 'rev-usage']).status).toBe(2);
    expect(keyhold(k, ['token', 'revoke', '--subject', 'x']).status).toBe(2);
    expect(byId(t.id).revoked).toBeNull();
  });
});
