// vault.db.keys: wrapping the master key per factor, and refusing anything tampered with.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EXIT, formatError, KeyholdError } from '../../src/errors.js';
import { enrollPassphrase, type PassphraseFactor } from '../../src/unlock/passphrase.js';
import {
  MAX_KEYRING_BYTES,
  newVaultId,
  parseKeyring,
  serializeKeyring,
  readKeyring,
  sealKeyring,
  writeKeyring,
  type Keyring,
} from '../../src/vault/keyring.js';
import { unwrapWithPassphrase } from '../../src/unlock/prove.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';

const COST = { log2n: 14, r: 1, p: 1 }; // the cheapest cost within bounds: many derivations below
const PASS = 'unit-test passphrase';
const pass = (s = PASS) => Buffer.from(s);

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'keyhold-keyring-'));
  process.env.KEYHOLD_KDF_LOG2N = '14';
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** A passphrase factor already wrapping `masterKey` (policy `any`). */
async function passphraseFactor(vaultId: string, masterKey: Buffer, passphrase: Buffer, cost: typeof COST): Promise<PassphraseFactor> {
  const enrolled = await enrollPassphrase(passphrase, cost);
  try {
    return sealKeyring(vaultId, 'any', [enrolled], masterKey).factors[0] as PassphraseFactor;
  } finally {
    enrolled.kek.fill(0);
  }
}

async function makeKeyring(passphrases: string[] = [PASS]): Promise<{ keyring: Keyring; masterKey: Buffer }> {
  const masterKey = randomBytes(32);
  const vaultId = newVaultId();
  const factors = [];
  for (const p of passphrases) factors.push(await passphraseFactor(vaultId, masterKey, pass(p), COST));
  return { keyring: { format: 'keyhold-keys', version: 1, vault_id: vaultId, policy: 'any', factors }, masterKey };
}

type Outcome = 'opened' | 'opened-other-key' | 'denied' | 'malformed' | `error: ${string}`;

/** What keyhold makes of a key file's text with the right passphrase. */
async function attempt(text: string, masterKey: Buffer, passphrase = PASS): Promise<Outcome> {
  try {
    const keyring = parseKeyring(text);
    const key = await unwrapWithPassphrase(keyring, pass(passphrase));
    return key.equals(masterKey) ? 'opened' : 'opened-other-key';
  } catch (err) {
    if (!(err instanceof KeyholdError)) return `error: ${String(err)}`;
    if (err.exitCode === EXIT.DENIED) return 'denied';
    if (/malformed/.test(err.message)) return 'malformed';
    return `error: ${err.message}`;
  }
}

async function expectThrowsKeyhold(p: Promise<unknown>): Promise<KeyholdError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(KeyholdError);
    return err as KeyholdError;
  }
  throw new Error('expected a KeyholdError, got success');
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const B64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

/** Another character of the same alphabet whose top bit differs: always changes the decoded bytes. */
function flipTopBit(ch: string, alphabet: string): string {
  const v = alphabet.indexOf(ch);
  if (v < 0) return 'A'; // '=' padding → a data character
  return alphabet[v ^ 0b100000]!;
}

describe('keyring wrap / unwrap', () => {
  it('a passphrase factor unwraps the master key; a wrong passphrase is refused with exit 4', async () => {
    const { keyring, masterKey } = await makeKeyring();
    expect((await unwrapWithPassphrase(keyring, pass())).equals(masterKey)).toBe(true);
    const err = await expectThrowsKeyhold(unwrapWithPassphrase(keyring, pass('wrong')));
    expect(err.exitCode).toBe(EXIT.DENIED);
    expect(formatError(err)).not.toContain('wrong ' + PASS);
    // nothing secret in the clear in the serialized form
    const text = JSON.stringify(keyring);
    expect(text).not.toContain(PASS);
    expect(text).not.toContain(masterKey.toString('base64'));
    expect(text).not.toContain(masterKey.toString('hex'));
  });

  it('each wrap uses a fresh salt and nonce', async () => {
    const masterKey = randomBytes(32);
    const id = newVaultId();
    const f1 = await passphraseFactor(id, masterKey, pass(), COST);
    const f2 = await passphraseFactor(id, masterKey, pass(), COST);
    expect(f1.kdf.salt).not.toBe(f2.kdf.salt);
    expect(f1.wrap!.nonce).not.toBe(f2.wrap!.nonce);
    expect(f1.wrap!.ciphertext).not.toBe(f2.wrap!.ciphertext);
    expect(f1.id).not.toBe(f2.id);
  });

  it('round-trips through writeKeyring / readKeyring as a 0600 file', async () => {
    const { keyring, masterKey } = await makeKeyring();
    const path = join(dir, 'roundtrip.keys');
    writeKeyring(path, keyring);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const back = readKeyring(path);
    expect(back).toEqual(keyring);
    expect((await unwrapWithPassphrase(back, pass())).equals(masterKey)).toBe(true);
  });

  it('with two passphrase factors either opens it, and neither other passphrase does', async () => {
    const { keyring, masterKey } = await makeKeyring(['first pass', 'second pass']);
    expect((await unwrapWithPassphrase(keyring, pass('first pass'))).equals(masterKey)).toBe(true);
    expect((await unwrapWithPassphrase(keyring, pass('second pass'))).equals(masterKey)).toBe(true);
    expect((await expectThrowsKeyhold(unwrapWithPassphrase(keyring, pass('third pass')))).exitCode).toBe(EXIT.DENIED);
  });

  it('a wrap is bound to its vault id and factor id (moved or relabelled → refused)', async () => {
    const a = await makeKeyring();
    const b = await makeKeyring();
    // a's factor pasted into b's key file
    const moved: Keyring = { ...b.keyring, factors: [a.keyring.factors[0]!] };
    expect(await attempt(JSON.stringify(moved), a.masterKey)).toBe('denied');
    // a's factor relabelled with another valid id
    const relabelled: Keyring = { ...a.keyring, factors: [{ ...a.keyring.factors[0]!, id: 'pp-00000000' }] };
    expect(await attempt(JSON.stringify(relabelled), a.masterKey)).toBe('denied');
    // the untouched file opens
    expect(await attempt(JSON.stringify(a.keyring), a.masterKey)).toBe('opened');
  });
});

describe('tampered vault.db.keys', () => {
  let keyring: Keyring;
  let masterKey: Buffer;
  let text: string;

  beforeAll(async () => {
    ({ keyring, masterKey } = await makeKeyring());
    const path = join(dir, 'tamper.keys');
    writeKeyring(path, keyring);
    text = readFileSync(path, 'utf8');
    expect(await attempt(text, masterKey)).toBe('opened');
  });

  /** Every position of the JSON string value `value` in the file text, one at a time, replaced. */
  async function tamperField(value: string, replace: (ch: string, index: number) => string): Promise<Map<string, Outcome>> {
    const quoted = JSON.stringify(value);
    const at = text.indexOf(quoted);
    expect(at, `field ${value} found once`).toBeGreaterThan(0);
    expect(text.indexOf(quoted, at + 1)).toBe(-1);
    const results = new Map<string, Outcome>();
    for (let i = 0; i < value.length; i++) {
      const replacement = replace(value[i]!, i);
      expect(replacement).not.toBe(value[i]);
      const tampered = text.slice(0, at + 1 + i) + replacement + text.slice(at + 2 + i);
      expect(tampered.length).toBe(text.length);
      results.set(`${value} @${i} ${value[i]}→${replacement}`, await attempt(tampered, masterKey));
    }
    return results;
  }

  const refused = (results: Map<string, Outcome>) =>
    [...results].filter(([, outcome]) => outcome !== 'denied' && outcome !== 'malformed');

  it('any single character of salt, nonce, ciphertext or tag changed → refused (4 or malformed), never opened', async () => {
    const factor = keyring.factors[0] as PassphraseFactor;
    for (const value of [factor.kdf.salt, factor.wrap!.nonce, factor.wrap!.ciphertext, factor.wrap!.tag]) {
      const results = await tamperField(value, (ch) => flipTopBit(ch, B64));
      expect(refused(results), `accepted tamperings of ${value}`).toEqual([]);
    }
  });

  it('any single character of the vault id or factor id changed → refused', async () => {
    const factor = keyring.factors[0] as PassphraseFactor;
    const vaultIdResults = await tamperField(keyring.vault_id, (ch) => flipTopBit(ch, B64URL));
    expect(refused(vaultIdResults)).toEqual([]);
    const hex = '0123456789abcdef';
    const idResults = await tamperField(factor.id, (ch) =>
      hex.includes(ch) ? hex[(hex.indexOf(ch) + 1) % 16]! : ch === '-' ? '_' : String.fromCharCode(ch.charCodeAt(0) + 1),
    );
    expect(refused(idResults)).toEqual([]);
    // and characters outside the alphabet → malformed
    expect(await attempt(text.replace(JSON.stringify(keyring.vault_id), JSON.stringify('!' + keyring.vault_id.slice(1))), masterKey)).toBe('malformed');
  });

  it('a non-canonical spelling of a base64 field (unused padding bits set) is refused too', async () => {
    // tag (16 bytes, "==") and salt (16 bytes) end in a character with 4 unused low bits; the
    // ciphertext (32 bytes, "=") in one with 2: flipping the lowest bit keeps the decoded bytes.
    const factor = keyring.factors[0] as PassphraseFactor;
    const outcomes: [string, Outcome][] = [];
    for (const value of [factor.wrap!.tag, factor.kdf.salt, factor.wrap!.ciphertext]) {
      const last = value.replace(/=+$/, '').length - 1;
      const ch = value[last]!;
      const alt = B64[B64.indexOf(ch) ^ 1]!;
      const tampered = text.replace(JSON.stringify(value), JSON.stringify(value.slice(0, last) + alt + value.slice(last + 1)));
      expect(tampered).not.toBe(text);
      outcomes.push([`${value} @${last} ${ch}→${alt}`, await attempt(tampered, masterKey)]);
    }
    expect(outcomes.filter(([, o]) => o !== 'denied' && o !== 'malformed')).toEqual([]);
  });

  it('Vault.open refuses a vault whose key file was tampered with, and does not touch it', async () => {
    const vdir = mkdtempSync(join(dir, 'vault-'));
    const paths = vaultPaths(join(vdir, 'vault.db'));
    const v = await Vault.create(paths, pass());
    v.close();
    const original = readFileSync(paths.keys, 'utf8');
    const doc = JSON.parse(original) as Keyring;
    const tag = doc.factors[0]!.wrap!.tag;
    const tampered = original.replace(tag, flipTopBit(tag[0]!, B64) + tag.slice(1));
    writeFileSync(paths.keys, tampered);
    const err = await expectThrowsKeyhold(Vault.open(paths, async () => pass()));
    expect(err.exitCode).toBe(EXIT.DENIED);
    expect(readFileSync(paths.keys, 'utf8')).toBe(tampered);
    writeFileSync(paths.keys, original);
    const ok = await Vault.open(paths, async () => pass());
    ok.close();
  });
});

describe('key file validation', () => {
  let keyring: Keyring;
  let masterKey: Buffer;
  beforeAll(async () => {
    ({ keyring, masterKey } = await makeKeyring());
  });

  const withKdf = (kdf: Record<string, unknown>) =>
    JSON.stringify({ ...keyring, factors: [{ ...keyring.factors[0]!, kdf: { ...(keyring.factors[0] as PassphraseFactor).kdf, ...kdf } }] });

  it('scrypt parameters out of bounds are malformed, and refused without deriving (fast)', async () => {
    for (const kdf of [
      { log2n: 30 },
      { r: 0 },
      { p: 100 },
      { log2n: 13 },
      { log2n: 14.5 },
      { r: 33 },
      { p: 0 },
      { log2n: 20, r: 32 }, // 4 GiB
      { log2n: -1 },
      { name: 'argon2id' },
      { salt: 'c2hvcnQ=' }, // 5 bytes
    ]) {
      const start = Date.now();
      expect(await attempt(withKdf(kdf), masterKey), JSON.stringify(kdf)).toBe('malformed');
      expect(Date.now() - start, `${JSON.stringify(kdf)} took too long`).toBeLessThan(1000);
    }
    expect(() => parseKeyring(withKdf({ log2n: 30 }))).toThrow(/malformed/);
  });

  it('an unknown version is refused with an error naming an upgrade', () => {
    for (const version of [2, 99, 0, '1']) {
      let err: unknown;
      try {
        parseKeyring(JSON.stringify({ ...keyring, version }));
      } catch (e) {
        err = e;
      }
      expect(err, `version ${JSON.stringify(version)}`).toBeInstanceOf(KeyholdError);
      const line = formatError(err as KeyholdError);
      expect(line).toMatch(/version/);
      if (version === 2 || version === 99) expect(line).toMatch(/upgrade/i);
    }
  });

  it('other malformations are refused as malformed', async () => {
    const f = keyring.factors[0]!;
    const cases: Record<string, string> = {
      'not JSON': '{"format":',
      'array': '[]',
      'wrong format': JSON.stringify({ ...keyring, format: 'something-else' }),
      'no factors': JSON.stringify({ ...keyring, factors: [] }),
      'duplicate factor ids': JSON.stringify({ ...keyring, factors: [f, f] }),
      'unknown factor type': JSON.stringify({ ...keyring, factors: [{ ...f, type: 'magic' }] }),
      'unknown policy': JSON.stringify({ ...keyring, policy: 'none' }),
      'short nonce': JSON.stringify({ ...keyring, factors: [{ ...f, wrap: { ...f.wrap, nonce: 'AAAA' } }] }),
      'wrong alg': JSON.stringify({ ...keyring, factors: [{ ...f, wrap: { ...f.wrap, alg: 'A128GCM' } }] }),
      'bad vault id': JSON.stringify({ ...keyring, vault_id: 'short' }),
    };
    for (const [name, text] of Object.entries(cases)) expect(await attempt(text, masterKey), name).toBe('malformed');
  });

  it('readKeyring of a missing file names `keyhold init`', () => {
    let err: unknown;
    try {
      readKeyring(join(dir, 'absent.keys'));
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KeyholdError);
    expect(formatError(err as KeyholdError)).toMatch(/keyhold init/);
  });
});

describe('writeKeyring writes only what readKeyring accepts', () => {
  let keyring: Keyring;
  let masterKey: Buffer;
  beforeAll(async () => {
    ({ keyring, masterKey } = await makeKeyring());
  });

  /** A key file in a directory of its own, holding `keyring`; what is there after `write`. */
  function attemptWrite(bad: Keyring): { err: unknown; text: string; names: string[] } {
    const kdir = mkdtempSync(join(dir, 'write-'));
    const path = join(kdir, 'vault.db.keys');
    writeKeyring(path, keyring);
    const before = readFileSync(path, 'utf8');
    let err: unknown;
    try {
      writeKeyring(path, bad);
    } catch (e) {
      err = e;
    }
    const text = readFileSync(path, 'utf8');
    expect(text, 'the old key file is left as it was').toBe(before);
    return { err, text, names: readdirSync(kdir) };
  }

  const f = () => keyring.factors[0] as PassphraseFactor;
  const cases: [string, () => Keyring][] = [
    ['a malformed factor id', () => ({ ...keyring, factors: [{ ...f(), id: 'pp-NOT-HEX' }] })],
    ['an unknown factor type', () => ({ ...keyring, factors: [{ ...f(), type: 'magic' } as unknown as PassphraseFactor] })],
    ['scrypt cost out of bounds', () => ({ ...keyring, factors: [{ ...f(), kdf: { ...f().kdf, log2n: 30 } }] })],
    ['a wrap with a short nonce', () => ({ ...keyring, factors: [{ ...f(), wrap: { ...f().wrap!, nonce: 'AAAA' } }] })],
    ['no factors', () => ({ ...keyring, factors: [] })],
    ['65 factors', () => ({ ...keyring, factors: Array.from({ length: 65 }, (_, i) => ({ ...f(), id: `pp-${i.toString(16).padStart(8, '0')}` })) })],
    ['a duplicate factor id', () => ({ ...keyring, factors: [f(), f()] })],
    ['a factor wrap under policy all', () => ({ ...keyring, policy: 'all', wrap: f().wrap! })],
    ['a 2 MiB field (over the reader\'s cap)', () => ({ ...keyring, factors: [{ ...f(), created: 'x'.repeat(2 * 1024 * 1024) }] })],
  ];

  it.each(cases)('%s: refused before anything is written (no temp file, the old file intact)', (_name, make) => {
    const { err, names } = attemptWrite(make());
    expect(err).toBeInstanceOf(KeyholdError);
    expect(formatError(err as KeyholdError)).toMatch(/refusing to write a vault key file the reader would refuse/);
    expect(names).toEqual(['vault.db.keys']);
  });

  it('serializeKeyring returns exactly what readKeyring parses back', () => {
    const bytes = serializeKeyring(keyring);
    expect(parseKeyring(bytes.toString('utf8'))).toEqual(keyring);
  });

  it('Vault.addFactor with a malformed factor: refused, key file and audit log untouched, the vault still opens', async () => {
    const vdir = mkdtempSync(join(dir, 'vault-bad-factor-'));
    const paths = vaultPaths(join(vdir, 'vault.db'));
    const v = await Vault.create(paths, pass());
    v.close();
    const keysBefore = readFileSync(paths.keys, 'utf8');
    const auditBefore = existsSync(paths.audit) ? readFileSync(paths.audit, 'utf8') : '';
    const opened = await Vault.open(paths, async () => pass());
    const enrolled = await enrollPassphrase(pass('another'), COST);
    const malformedFactor = { ...enrolled, factor: { ...enrolled.factor, id: 'pp-zzzz' } };
    expect(() => opened.addFactor(malformedFactor)).toThrow(/reader would refuse/);
    opened.close();
    expect(readFileSync(paths.keys, 'utf8')).toBe(keysBefore);
    expect(existsSync(paths.audit) ? readFileSync(paths.audit, 'utf8') : '').toBe(auditBefore);
    const again = await Vault.open(paths, async () => pass());
    again.close();
    void masterKey;
  });
});

describe('readKeyring reads only a private regular file, through a cap', () => {
  it('refuses group/other mode bits, naming the file and the chmod', async () => {
    const { keyring } = await makeKeyring();
    const path = join(dir, 'modes.keys');
    writeKeyring(path, keyring);
    for (const mode of [0o644, 0o640, 0o604, 0o660, 0o602]) {
      chmodSync(path, mode);
      expect(() => readKeyring(path)).toThrow(`${path} is accessible by others (mode 0${mode.toString(8)})`);
    }
    chmodSync(path, 0o600);
    expect(readKeyring(path)).toEqual(keyring);
  });

  it('refuses a link to /dev/zero, a directory and a file over 1 MiB without reading them', () => {
    const zero = join(dir, 'zero.keys');
    symlinkSync('/dev/zero', zero);
    expect(() => readKeyring(zero)).toThrow(/character device, not a regular file/);
    expect(() => readKeyring(dir)).toThrow(/a directory, not a regular file/);
    const big = join(dir, 'big.keys');
    writeFileSync(big, '', { mode: 0o600 });
    truncateSync(big, MAX_KEYRING_BYTES + 1);
    expect(() => readKeyring(big)).toThrow(/over 1048576 bytes/);
  });
});
