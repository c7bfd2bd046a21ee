// Unlock factors: passphrase and ssh-agent factors under policies `any` and `all`, the key file's
// resistance to tampering, and factor changes on a real vault (rewrap, never re-encrypt).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash, generateKeyPairSync, randomBytes, sign, type KeyObject } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describeKey, fingerprint } from '../../src/agent-protocol/public-key.js';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { enrollPassphrase, passphraseKek, passphraseKeks, type PassphraseFactor } from '../../src/unlock/passphrase.js';
import { newSshAgentFactor, sshAgentKek, sshAgentMessage, type AgentKeyRef, type SshAgentFactor } from '../../src/unlock/ssh-agent.js';
import {
  newVaultId,
  parseKeyring,
  readKeyring,
  sealKeyring,
  unwrapMasterKey,
  withFactorAdded,
  withFactorRemoved,
  withFactorReplaced,
  writeKeyring,
  type EnrolledFactor,
  type Factor,
  type FactorKeks,
  type Keyring,
  type Policy,
} from '../../src/vault/keyring.js';
import { vaultPaths, type VaultPaths } from '../../src/vault/paths.js';
import { Vault } from '../../src/vault/vault.js';

const COST = { log2n: 14, r: 8, p: 1 };
const pass = (s: string) => Buffer.from(s);

// ---------------------------------------------------------------------------------------------
// Helpers

/** A key "in the agent": its private half signs here exactly as ssh-agent would. */
interface AgentKey {
  name: string;
  priv: KeyObject;
  ref: AgentKeyRef;
}

function agentKey(kind: 'ed25519' | 'rsa', name: string = kind): AgentKey {
  const { privateKey, publicKey } =
    kind === 'ed25519' ? generateKeyPairSync('ed25519') : generateKeyPairSync('rsa', { modulusLength: 2048 });
  const info = describeKey(publicKey);
  return {
    name,
    priv: privateKey,
    ref: { type: kind === 'ed25519' ? 'ssh-ed25519' : 'ssh-rsa', fingerprint: fingerprint(info.blob), blob: info.blob.toString('base64') },
  };
}

/** The raw signature the agent returns: ed25519, or rsa-sha2-512 (PKCS#1 v1.5 over SHA-512). */
function agentSign(key: AgentKey, message: Buffer): Buffer {
  return sign(key.ref.type === 'ssh-rsa' ? 'sha512' : null, message, key.priv);
}

function agentKekFor(key: AgentKey, vaultId: string, factor: Pick<SshAgentFactor, 'id' | 'challenge'>): Buffer {
  return sshAgentKek(vaultId, factor.id, agentSign(key, sshAgentMessage(vaultId, factor.id, factor.challenge)));
}

/** Enrolls an ssh-agent factor by hand: what enrollSshAgent does with a real agent. */
function enrollAgent(key: AgentKey, vaultId: string, id?: string): EnrolledFactor {
  const factor = newSshAgentFactor(key.ref, id);
  return { factor, kek: agentKekFor(key, vaultId, factor) };
}

function copy(enrolled: EnrolledFactor): EnrolledFactor {
  return { factor: enrolled.factor, kek: Buffer.from(enrolled.kek) };
}

function keks(...entries: [string, Buffer][]): FactorKeks {
  return new Map(entries.map(([id, kek]) => [id, Buffer.from(kek)]));
}

function catchError(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected an error, got success');
}

async function catchErrorAsync(fn: () => Promise<unknown>): Promise<unknown> {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected an error, got success');
}

function expectKeyhold(err: unknown, exitCode: number, message?: RegExp): KeyholdError {
  expect(err).toBeInstanceOf(KeyholdError);
  const e = err as KeyholdError;
  expect(e.exitCode, e.message).toBe(exitCode);
  if (message) expect(e.message).toMatch(message);
  return e;
}

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/**
 * Not re-encrypted: SQLCipher's salt (the first 16 bytes) is the same, and all but a few pages are
 * byte for byte the same. A factor change writes its audit line and moves the audit anchor in
 * the meta table (a page or two, plus the header page); a rekey would change every page.
 */
function expectNotReencrypted(path: string, before: Buffer, what: string): void {
  const after = readFileSync(path);
  expect(after.subarray(0, 16).equals(before.subarray(0, 16)), `${what}: salt`).toBe(true);
  const page = 4096;
  const pages = Math.min(before.length, after.length) / page;
  let changed = 0;
  for (let i = 0; i < pages; i++) if (!after.subarray(i * page, (i + 1) * page).equals(before.subarray(i * page, (i + 1) * page))) changed++;
  expect(pages, `${what}: pages to compare`).toBeGreaterThan(6);
  expect(changed, `${what}: pages changed of ${pages}`).toBeLessThanOrEqual(3);
}

let dir: string;
let ed: AgentKey;
let ed2: AgentKey;
let rsa: AgentKey;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'keyhold-factors-'));
  ed = agentKey('ed25519', 'ed');
  ed2 = agentKey('ed25519', 'ed2');
  rsa = agentKey('rsa');
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------

describe('wrap / unwrap per factor (policy any)', () => {
  let vaultId: string;
  let masterKey: Buffer;
  let pp: EnrolledFactor;
  let saEd: EnrolledFactor;
  let saRsa: EnrolledFactor;
  let keyring: Keyring;

  beforeAll(async () => {
    vaultId = newVaultId();
    masterKey = randomBytes(32);
    pp = await enrollPassphrase(pass('correct horse'), COST);
    saEd = enrollAgent(ed, vaultId);
    saRsa = enrollAgent(rsa, vaultId);
    keyring = sealKeyring(vaultId, 'any', [pp, saEd, saRsa], masterKey);
  });

  it('signatures are deterministic (ed25519 and RSA PKCS#1 v1.5 / SHA-512), so the KEK is reproducible', () => {
    for (const [key, enrolled] of [[ed, saEd], [rsa, saRsa]] as const) {
      const again = agentKekFor(key, vaultId, enrolled.factor as SshAgentFactor);
      expect(again.equals(enrolled.kek), key.name).toBe(true);
      expect(enrolled.kek.length).toBe(32);
    }
    expect(pp.factor.id).toMatch(/^pp-[0-9a-f]{8}$/);
    expect(saEd.factor.id).toMatch(/^sa-[0-9a-f]{8}$/);
  });

  it('each factor alone unwraps the same master key', async () => {
    expect(keyring.policy).toBe('any');
    expect(keyring.wrap).toBeUndefined();
    for (const f of keyring.factors) expect(f.wrap, f.id).toBeDefined();
    expect(unwrapMasterKey(keyring, keks([pp.factor.id, pp.kek])).equals(masterKey)).toBe(true);
    expect(unwrapMasterKey(keyring, keks([saEd.factor.id, saEd.kek])).equals(masterKey)).toBe(true);
    expect(unwrapMasterKey(keyring, keks([saRsa.factor.id, saRsa.kek])).equals(masterKey)).toBe(true);
    // re-deriving from the secrets, as an unlock does
    const ppFactor = keyring.factors[0] as PassphraseFactor;
    expect(unwrapMasterKey(keyring, keks([ppFactor.id, await passphraseKek(ppFactor, pass('correct horse'))])).equals(masterKey)).toBe(true);
    expect(unwrapMasterKey(keyring, await passphraseKeks(keyring, pass('correct horse'))).equals(masterKey)).toBe(true);
    const edFactor = keyring.factors[1] as SshAgentFactor;
    expect(unwrapMasterKey(keyring, keks([edFactor.id, agentKekFor(ed, vaultId, edFactor)])).equals(masterKey)).toBe(true);
    // all of them together too
    expect(unwrapMasterKey(keyring, keks([pp.factor.id, pp.kek], [saEd.factor.id, saEd.kek], [saRsa.factor.id, saRsa.kek])).equals(masterKey)).toBe(true);
  });

  it('a wrong KEK is refused with exit 4, for every factor type', async () => {
    for (const f of [pp, saEd, saRsa]) {
      expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([f.factor.id, randomBytes(32)]))), EXIT.DENIED);
    }
    // a wrong passphrase
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([pp.factor.id, Buffer.alloc(32)]))), EXIT.DENIED);
    const wrongPass = await passphraseKeks(keyring, pass('wrong horse'));
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, wrongPass)), EXIT.DENIED, /wrong passphrase/);
    // another key in the agent signing the same message
    const edFactor = saEd.factor as SshAgentFactor;
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([edFactor.id, agentKekFor(ed2, vaultId, edFactor)]))), EXIT.DENIED);
    const rsaFactor = saRsa.factor as SshAgentFactor;
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([rsaFactor.id, agentKekFor(ed, vaultId, rsaFactor)]))), EXIT.DENIED);
    // RSA signed with SHA-256 instead of SHA-512: another signature, another KEK
    const sha256Sig = sign('sha256', sshAgentMessage(vaultId, rsaFactor.id, rsaFactor.challenge), rsa.priv);
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([rsaFactor.id, sshAgentKek(vaultId, rsaFactor.id, sha256Sig)]))), EXIT.DENIED);
    // a right KEK presented under another factor's id
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([saEd.factor.id, pp.kek]))), EXIT.DENIED);
    // a KEK for an id the keyring does not have; no KEK at all
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks(['sa-00000000', saEd.kek]))), EXIT.DENIED);
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, new Map())), EXIT.DENIED);
  });
});

describe('policy all', () => {
  let vaultId: string;
  let masterKey: Buffer;
  let pp: EnrolledFactor;
  let sa: EnrolledFactor;
  let keyring: Keyring;

  beforeAll(async () => {
    vaultId = newVaultId();
    masterKey = randomBytes(32);
    pp = await enrollPassphrase(pass('all pass'), COST);
    sa = enrollAgent(ed, vaultId);
    keyring = sealKeyring(vaultId, 'all', [pp, sa], masterKey);
  });

  it('one combined wrap; factors carry none', () => {
    expect(keyring.policy).toBe('all');
    expect(keyring.wrap).toBeDefined();
    for (const f of keyring.factors) expect(f.wrap, f.id).toBeUndefined();
    // and it survives the file format
    const back = parseKeyring(JSON.stringify(keyring, null, 2));
    expect(back).toEqual(keyring);
  });

  it('both KEKs unwrap the master key', async () => {
    expect(unwrapMasterKey(keyring, keks([pp.factor.id, pp.kek], [sa.factor.id, sa.kek])).equals(masterKey)).toBe(true);
    // in the other insertion order too, and re-derived from the secrets
    const derived = await passphraseKeks(keyring, pass('all pass'));
    derived.set(sa.factor.id, agentKekFor(ed, vaultId, sa.factor as SshAgentFactor));
    expect(unwrapMasterKey(keyring, keks([sa.factor.id, sa.kek], [pp.factor.id, pp.kek])).equals(masterKey)).toBe(true);
    expect(unwrapMasterKey(keyring, derived).equals(masterKey)).toBe(true);
  });

  it('only one of the two → exit 4 naming the missing factor', () => {
    const onlyPp = expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([pp.factor.id, pp.kek]))), EXIT.DENIED);
    expect(onlyPp.message).toContain(sa.factor.id);
    expect(onlyPp.message).not.toContain(pp.factor.id);
    const onlySa = expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([sa.factor.id, sa.kek]))), EXIT.DENIED);
    expect(onlySa.message).toContain(pp.factor.id);
    expect(onlySa.message).not.toContain(sa.factor.id);
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, new Map())), EXIT.DENIED, new RegExp(`${pp.factor.id}.*${sa.factor.id}`));
  });

  it('a wrong one of the two → exit 4', async () => {
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([pp.factor.id, randomBytes(32)], [sa.factor.id, sa.kek]))), EXIT.DENIED);
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([pp.factor.id, pp.kek], [sa.factor.id, randomBytes(32)]))), EXIT.DENIED);
    const wrongPass = await passphraseKeks(keyring, pass('not all pass'));
    wrongPass.set(sa.factor.id, Buffer.from(sa.kek));
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, wrongPass)), EXIT.DENIED);
    // another agent key
    expectKeyhold(
      catchError(() => unwrapMasterKey(keyring, keks([pp.factor.id, pp.kek], [sa.factor.id, agentKekFor(ed2, vaultId, sa.factor as SshAgentFactor)]))),
      EXIT.DENIED,
    );
    // the two KEKs swapped between the ids
    expectKeyhold(catchError(() => unwrapMasterKey(keyring, keks([pp.factor.id, sa.kek], [sa.factor.id, pp.kek]))), EXIT.DENIED);
  });

  it('two passphrase factors under all are refused (seal and add)', async () => {
    const pp2 = await enrollPassphrase(pass('second'), COST);
    const sealErr = catchError(() => sealKeyring(vaultId, 'all', [pp, pp2], masterKey));
    expect(sealErr).toBeInstanceOf(KeyholdError);
    expect((sealErr as KeyholdError).message).toMatch(/passphrase/);
    const sealErr3 = catchError(() => sealKeyring(vaultId, 'all', [pp, sa, pp2], masterKey));
    expect(sealErr3).toBeInstanceOf(KeyholdError);
    const addErr = catchError(() => withFactorAdded(keyring, masterKey, pp2, keks([pp.factor.id, pp.kek], [sa.factor.id, sa.kek])));
    expect(addErr).toBeInstanceOf(KeyholdError);
    expect((addErr as KeyholdError).message).toMatch(/passphrase/);
    // while two ssh-agent factors and one passphrase are fine
    const three = sealKeyring(vaultId, 'all', [pp, sa, enrollAgent(rsa, vaultId)], masterKey);
    expect(three.factors).toHaveLength(3);
    // and under any, two passphrases are fine
    expect(sealKeyring(vaultId, 'any', [pp, pp2], masterKey).factors).toHaveLength(2);
  });
});

// ---------------------------------------------------------------------------------------------

describe('tampered key file (every character)', () => {
  interface Case {
    policy: Policy;
    text: string;
    original: Keyring;
    masterKey: Buffer;
    /** The secret behind each factor, by position in the factor list. */
    secrets: ({ passphrase: Buffer } | { agent: AgentKey })[];
  }
  const cases: Case[] = [];
  const scryptCache = new Map<string, Buffer>();

  beforeAll(async () => {
    for (const policy of ['any', 'all'] as const) {
      const vaultId = newVaultId();
      const masterKey = randomBytes(32);
      const passphrase = pass(`tamper ${policy}`);
      const enrolled = [await enrollPassphrase(passphrase, COST), enrollAgent(ed, vaultId), enrollAgent(rsa, vaultId)];
      const keyring = sealKeyring(vaultId, policy, enrolled, masterKey);
      const path = join(dir, `tamper-${policy}.keys`);
      writeKeyring(path, keyring);
      const text = readFileSync(path, 'utf8');
      cases.push({ policy, text, original: parseKeyring(text), masterKey, secrets: [{ passphrase }, { agent: ed }, { agent: rsa }] });
    }
  });

  /** The KEKs an honest unlock derives for this (possibly tampered) keyring from the right secrets. */
  async function rightKeks(c: Case, keyring: Keyring): Promise<FactorKeks> {
    const out: FactorKeks = new Map();
    for (const [i, factor] of keyring.factors.entries()) {
      // the secret of the original factor with this id, else of the one at this position
      const j = c.original.factors.findIndex((f) => f.id === factor.id);
      const secret = c.secrets[j >= 0 ? j : i];
      if (!secret) continue;
      if (factor.type === 'passphrase' && 'passphrase' in secret) {
        const cacheKey = JSON.stringify(factor.kdf);
        let kek = scryptCache.get(cacheKey);
        if (!kek) {
          kek = await passphraseKek(factor, secret.passphrase);
          scryptCache.set(cacheKey, kek);
        }
        out.set(factor.id, Buffer.from(kek));
      } else if (factor.type === 'ssh-agent' && 'agent' in secret) {
        out.set(factor.id, agentKekFor(secret.agent, keyring.vault_id, factor));
      }
    }
    return out;
  }

  /**
   * Fields no wrap authenticates: when they are edited the vault still opens (with the same
   * master key). `created` is informational; the key's fingerprint and blob only tell the CLI
   * which agent key to ask, and the KEK comes from that key's signature anyway.
   * With `factor`, the view of what one factor's wrap depends on (policy any).
   */
  function authenticatedView(keyring: Keyring, factor?: number): string {
    const view = (f: Factor) => {
      const { created: _c, ...rest } = f;
      if (rest.type === 'ssh-agent') return { ...rest, key: { type: rest.key.type } };
      return rest;
    };
    const { factors, ...top } = keyring;
    if (factor !== undefined) return JSON.stringify({ ...top, factor: factors[factor] ? view(factors[factor]) : null });
    return JSON.stringify({ ...top, factors: factors.map(view) });
  }

  type Trial = { kind: 'denied' } | { kind: 'opened'; same: boolean; authenticatedSame: boolean } | { kind: 'bug'; detail: string };
  type Outcome = { kind: 'malformed' } | { kind: 'bug'; detail: string } | { kind: 'parsed'; trials: Trial[] };

  /**
   * What an honest unlock makes of the text. Policy all: one trial with every factor's KEK.
   * Policy any: one trial per factor with that factor's KEK alone (an edit to one factor must
   * not matter to the others, and must make that one refuse).
   */
  async function attempt(c: Case, text: string): Promise<Outcome> {
    let keyring: Keyring;
    try {
      keyring = parseKeyring(text);
    } catch (err) {
      if (err instanceof KeyholdError) return { kind: 'malformed' };
      return { kind: 'bug', detail: `parse threw ${String(err)}` };
    }
    const all = await rightKeks(c, keyring);
    const trials: Trial[] = [];
    const sets: [FactorKeks, number | undefined][] =
      keyring.policy === 'all'
        ? [[all, undefined]]
        : keyring.factors.map((f, i) => [new Map(all.has(f.id) ? [[f.id, all.get(f.id)!]] : []), i]);
    for (const [k, index] of sets) {
      try {
        const key = unwrapMasterKey(keyring, k);
        trials.push({
          kind: 'opened',
          same: key.equals(c.masterKey),
          authenticatedSame: authenticatedView(keyring, index) === authenticatedView(c.original, index),
        });
      } catch (err) {
        if (err instanceof KeyholdError && err.exitCode === EXIT.DENIED) trials.push({ kind: 'denied' });
        else trials.push({ kind: 'bug', detail: `unwrap threw ${String(err)}` });
      }
    }
    return { kind: 'parsed', trials };
  }

  const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

  /** Different single-character edits of `ch` (or '' to delete it). */
  function edits(ch: string): string[] {
    const code = ch.charCodeAt(0);
    const out = new Set<string>([String.fromCharCode(code ^ 1), '']);
    if (ch === ' ' || ch === '\n') out.add('\t');
    else if (B64.includes(ch)) out.add(B64[B64.indexOf(ch) ^ 0b100000]!);
    else out.add('~');
    out.delete(ch);
    return [...out];
  }

  const isJsonWhitespace = (s: string) => s === '' || /^[ \t\n\r]$/.test(s);
  const opensCleanly = (o: Outcome) =>
    o.kind === 'parsed' && o.trials.length > 0 && o.trials.every((t) => t.kind === 'opened' && t.same && t.authenticatedSame);

  for (const policy of ['any', 'all'] as const) {
    it(`policy ${policy}: no single-character edit anywhere opens the vault, except whitespace and unauthenticated metadata`, async () => {
      const c = cases.find((x) => x.policy === policy)!;
      // the untouched file opens (with each factor alone under any): the test can fail
      const untouched = await attempt(c, c.text);
      expect(untouched.kind === 'parsed' && untouched.trials.length).toBe(policy === 'any' ? 3 : 1);
      expect(opensCleanly(untouched), JSON.stringify(untouched)).toBe(true);
      expect(c.original.factors.map((f) => f.type)).toEqual(['passphrase', 'ssh-agent', 'ssh-agent']);
      // a reformatting (whitespace only) still opens with the right key
      expect(opensCleanly(await attempt(c, JSON.stringify(JSON.parse(c.text))))).toBe(true);

      const problems: string[] = [];
      const counts = { edits: 0, malformed: 0, denied: 0, whitespace: 0, metadata: 0 };
      for (let i = 0; i < c.text.length; i++) {
        const ch = c.text[i]!;
        for (const replacement of edits(ch)) {
          counts.edits++;
          const tampered = c.text.slice(0, i) + replacement + c.text.slice(i + 1);
          const outcome = await attempt(c, tampered);
          const where = `@${i} ${JSON.stringify(ch)}→${JSON.stringify(replacement)} near ${JSON.stringify(c.text.slice(Math.max(0, i - 20), i + 20))}`;
          const whitespace = isJsonWhitespace(ch) && isJsonWhitespace(replacement);
          if (outcome.kind === 'bug') {
            problems.push(`${where}: ${outcome.detail}`);
            continue;
          }
          if (outcome.kind === 'malformed') {
            counts.malformed++;
            if (whitespace) problems.push(`${where}: a whitespace-only edit was refused as malformed`);
            continue;
          }
          let denied = false;
          let metadata = false;
          outcome.trials.forEach((t, n) => {
            const trial = `${where} [trial ${n}]`;
            if (t.kind === 'bug') problems.push(`${trial}: ${t.detail}`);
            else if (t.kind === 'denied') {
              denied = true;
              if (whitespace) problems.push(`${trial}: a whitespace-only edit was refused`);
            } else if (!t.same) problems.push(`${trial}: opened with ANOTHER master key`);
            else if (!t.authenticatedSame) problems.push(`${trial}: opened although an authenticated field changed`);
            else if (!whitespace && authenticatedView(parseKeyring(tampered)) !== authenticatedView(c.original)) {
              // an edit elsewhere in the file, which this factor's wrap does not cover (any)
            } else if (!whitespace) metadata = true;
          });
          if (denied) counts.denied++;
          if (whitespace) counts.whitespace++;
          if (metadata) counts.metadata++;
        }
      }
      expect(problems).toEqual([]);
      // the loop really covered the file, and every outcome class happened
      expect(counts.edits).toBeGreaterThan(2 * c.text.length);
      expect(counts.whitespace).toBeGreaterThan(50);
      expect(counts.denied).toBeGreaterThan(50);
      expect(counts.malformed).toBeGreaterThan(c.text.length);
    });
  }

  it('structured edits: a changed challenge, salt, cost, wrap, vault id or (under all) order makes the edited factor refuse', async () => {
    const otherKeyring = sealKeyring(newVaultId(), 'all', [await enrollPassphrase(pass('other'), COST)], randomBytes(32));
    for (const c of cases) {
      const base = JSON.parse(c.text) as Keyring;
      const mutate = (fn: (k: Keyring) => void) => {
        const k = structuredClone(base);
        fn(k);
        return JSON.stringify(k);
      };
      const otherChallenge = randomBytes(32).toString('base64');
      // the factor indexes whose unlock must now be refused
      const variants: [string, string, number[]][] = [
        ['ed25519 challenge replaced', mutate((k) => ((k.factors[1] as SshAgentFactor).challenge = otherChallenge)), [1]],
        ['rsa challenge replaced', mutate((k) => ((k.factors[2] as SshAgentFactor).challenge = otherChallenge)), [2]],
        ['salt replaced', mutate((k) => ((k.factors[0] as PassphraseFactor).kdf.salt = randomBytes(16).toString('base64'))), [0]],
        ['log2n raised', mutate((k) => ((k.factors[0] as PassphraseFactor).kdf.log2n = 15)), [0]],
        ['r changed', mutate((k) => ((k.factors[0] as PassphraseFactor).kdf.r = 4)), [0]],
        ['vault id replaced', mutate((k) => (k.vault_id = newVaultId())), [0, 1, 2]],
      ];
      if (c.policy === 'any') {
        variants.push(['ed25519 wrap replaced by the rsa one', mutate((k) => (k.factors[1]!.wrap = k.factors[2]!.wrap)), [1]]);
        variants.push(['passphrase wrap replaced by the ed25519 one', mutate((k) => (k.factors[0]!.wrap = k.factors[1]!.wrap)), [0]]);
      } else {
        variants.push(['factors reordered', mutate((k) => k.factors.reverse()), [0, 1, 2]]);
        variants.push(['combined wrap from another vault', mutate((k) => (k.wrap = otherKeyring.wrap)), [0, 1, 2]]);
      }
      for (const [name, text, refused] of variants) {
        const outcome = await attempt(c, text);
        const label = `${c.policy} ${name}: ${JSON.stringify(outcome)}`;
        expect(outcome.kind, label).toBe('parsed');
        if (outcome.kind !== 'parsed') continue;
        if (c.policy === 'all') {
          expect(outcome.trials, label).toEqual([{ kind: 'denied' }]);
          continue;
        }
        outcome.trials.forEach((t, i) => {
          if (refused.includes(i)) expect(t, `${label} [factor ${i}]`).toEqual({ kind: 'denied' });
          else expect(t, `${label} [factor ${i}]`).toEqual({ kind: 'opened', same: true, authenticatedSame: true });
        });
      }
      if (c.policy === 'any') {
        // the order of independent wraps does not matter: each factor still opens, with the same key
        const reordered = await attempt(c, mutate((k) => k.factors.reverse()));
        expect(reordered.kind === 'parsed' && reordered.trials.map((t) => t.kind === 'opened' && t.same)).toEqual([true, true, true]);
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe('a wrap is bound to its factor id and vault id', () => {
  it('policy any: a wrap moved to another factor id, or into another vault, is refused (ssh-agent and passphrase)', async () => {
    const vaultA = newVaultId();
    const vaultB = newVaultId();
    const masterKey = randomBytes(32);
    const ppA = await enrollPassphrase(pass('a'), COST);
    const saA = enrollAgent(ed, vaultA);
    const rsaA = enrollAgent(rsa, vaultA);
    const a = sealKeyring(vaultA, 'any', [ppA, saA, rsaA], masterKey);
    const [fpp, fsa, frsa] = a.factors as [PassphraseFactor, SshAgentFactor, SshAgentFactor];
    // control: as sealed, each opens
    for (const e of [ppA, saA, rsaA]) expect(unwrapMasterKey(a, keks([e.factor.id, e.kek])).equals(masterKey)).toBe(true);

    // the ssh-agent wrap relabelled with another valid id (same KEK bytes, or re-derived for the new id)
    for (const [f, key, e] of [[fsa, ed, saA], [frsa, rsa, rsaA]] as const) {
      const relabelled: Keyring = { ...a, factors: [{ ...f, id: 'sa-0badf00d' }] };
      expectKeyhold(catchError(() => unwrapMasterKey(relabelled, keks(['sa-0badf00d', e.kek]))), EXIT.DENIED);
      const rederived = agentKekFor(key, vaultA, { id: 'sa-0badf00d', challenge: f.challenge });
      expectKeyhold(catchError(() => unwrapMasterKey(relabelled, keks(['sa-0badf00d', rederived]))), EXIT.DENIED);
      // and through the file format
      expectKeyhold(catchError(() => unwrapMasterKey(parseKeyring(JSON.stringify(relabelled)), keks(['sa-0badf00d', e.kek]))), EXIT.DENIED);
    }
    // one factor's wrap pasted onto another factor (its KEK presented under the other id)
    const swapped: Keyring = { ...a, factors: [{ ...fpp, wrap: fsa.wrap }, { ...fsa, wrap: fpp.wrap }, frsa] };
    expectKeyhold(catchError(() => unwrapMasterKey(swapped, keks([fpp.id, saA.kek]))), EXIT.DENIED);
    expectKeyhold(catchError(() => unwrapMasterKey(swapped, keks([fsa.id, ppA.kek]))), EXIT.DENIED);
    const rsaOnEd: Keyring = { ...a, factors: [{ ...fsa, wrap: frsa.wrap }] };
    expectKeyhold(catchError(() => unwrapMasterKey(rsaOnEd, keks([fsa.id, rsaA.kek]))), EXIT.DENIED);

    // the factors moved, whole, into another vault's key file
    const b = sealKeyring(vaultB, 'any', [await enrollPassphrase(pass('b'), COST)], randomBytes(32));
    for (const [f, key, e] of [[fsa, ed, saA], [frsa, rsa, rsaA]] as const) {
      const moved: Keyring = { ...b, factors: [f] };
      expectKeyhold(catchError(() => unwrapMasterKey(moved, keks([f.id, e.kek]))), EXIT.DENIED);
      expectKeyhold(catchError(() => unwrapMasterKey(moved, keks([f.id, agentKekFor(key, vaultB, f)]))), EXIT.DENIED);
      expectKeyhold(catchError(() => unwrapMasterKey(parseKeyring(JSON.stringify(moved)), keks([f.id, e.kek]))), EXIT.DENIED);
    }
    const movedPp: Keyring = { ...b, factors: [fpp] };
    expectKeyhold(catchError(() => unwrapMasterKey(movedPp, keks([fpp.id, ppA.kek]))), EXIT.DENIED);
    // the whole file relabelled with another vault id
    const relabelledVault: Keyring = { ...a, vault_id: vaultB };
    for (const e of [ppA, saA, rsaA]) expectKeyhold(catchError(() => unwrapMasterKey(relabelledVault, keks([e.factor.id, e.kek]))), EXIT.DENIED);
  });

  it('the ssh-agent KEK itself depends on vault id and factor id (signature over a bound message)', () => {
    const vaultId = newVaultId();
    const f = newSshAgentFactor(ed.ref);
    const base = agentKekFor(ed, vaultId, f);
    expect(agentKekFor(ed, newVaultId(), f).equals(base)).toBe(false);
    expect(agentKekFor(ed, vaultId, { ...f, id: 'sa-00000000' }).equals(base)).toBe(false);
    expect(agentKekFor(ed, vaultId, { ...f, challenge: randomBytes(32).toString('base64') }).equals(base)).toBe(false);
    const message = sshAgentMessage(vaultId, f.id, f.challenge);
    expect(message.includes(Buffer.from(vaultId))).toBe(true);
    expect(message.includes(Buffer.from(f.id))).toBe(true);
    expect(message.includes(Buffer.from(f.challenge, 'base64'))).toBe(true);
    // same signature, other vault or factor id → other KEK (HKDF salt / info)
    const sig = agentSign(ed, message);
    expect(sshAgentKek(newVaultId(), f.id, sig).equals(sshAgentKek(vaultId, f.id, sig))).toBe(false);
    expect(sshAgentKek(vaultId, 'sa-00000000', sig).equals(sshAgentKek(vaultId, f.id, sig))).toBe(false);
  });

  it('policy all: the combined wrap moved to another vault id, or with a factor relabelled, is refused', async () => {
    const vaultId = newVaultId();
    const masterKey = randomBytes(32);
    const pp = await enrollPassphrase(pass('all bound'), COST);
    const sa = enrollAgent(rsa, vaultId);
    const k = sealKeyring(vaultId, 'all', [pp, sa], masterKey);
    const both = () => keks([pp.factor.id, pp.kek], [sa.factor.id, sa.kek]);
    expect(unwrapMasterKey(k, both()).equals(masterKey)).toBe(true);
    expectKeyhold(catchError(() => unwrapMasterKey({ ...k, vault_id: newVaultId() }, both())), EXIT.DENIED);
    const relabelled: Keyring = { ...k, factors: [k.factors[0]!, { ...k.factors[1]!, id: 'sa-0badf00d' }] };
    expectKeyhold(catchError(() => unwrapMasterKey(relabelled, keks([pp.factor.id, pp.kek], ['sa-0badf00d', sa.kek]))), EXIT.DENIED);
    // the all-wrap pasted into a vault with the same factors but another id
    const other = sealKeyring(newVaultId(), 'all', [pp, sa], randomBytes(32));
    expectKeyhold(catchError(() => unwrapMasterKey({ ...other, wrap: k.wrap }, both())), EXIT.DENIED);
  });
});

// ---------------------------------------------------------------------------------------------

describe('scrypt bounds in the key file', () => {
  let keyring: Keyring;
  beforeAll(async () => {
    keyring = sealKeyring(newVaultId(), 'any', [await enrollPassphrase(pass('bounds'), COST)], randomBytes(32));
  });
  const withKdf = (kdf: Record<string, unknown>) =>
    JSON.stringify({ ...keyring, factors: [{ ...keyring.factors[0]!, kdf: { ...(keyring.factors[0] as PassphraseFactor).kdf, ...kdf } }] });

  it('accepts the bounds themselves', () => {
    for (const kdf of [{ log2n: 14 }, { log2n: 20 }, { r: 1 }, { r: 32 }, { p: 1 }, { p: 16 }, { log2n: 20, r: 8 }]) {
      const parsed = parseKeyring(withKdf(kdf));
      expect((parsed.factors[0] as PassphraseFactor).kdf, JSON.stringify(kdf)).toMatchObject(kdf);
    }
  });

  it('refuses log2n 13 and 21, r 0 and 33, p 0 and 17, non-integers, and too much memory', () => {
    for (const kdf of [
      { log2n: 13 },
      { log2n: 21 },
      { r: 0 },
      { r: 33 },
      { p: 0 },
      { p: 17 },
      { log2n: 14.5 },
      { r: 8.5 },
      { p: 1.5 },
      { log2n: 1e300 },
      { log2n: -14 },
      { log2n: null },
      { r: null },
      { p: 'many' },
      { log2n: undefined },
      { log2n: 20, r: 9 }, // over 1 GiB
      { name: 'pbkdf2' },
    ]) {
      const start = Date.now();
      const err = catchError(() => parseKeyring(withKdf(kdf)));
      expectKeyhold(err, EXIT.ERROR, /malformed/);
      expect(Date.now() - start, `${JSON.stringify(kdf)} took long`).toBeLessThan(2000);
    }
  });

  it('refuses scrypt parameters that are not JSON numbers (no coercion of strings, booleans, arrays)', () => {
    // Number() would turn each of these into an in-bounds integer; the file must say what it means,
    // as it must for base64 (a non-canonical spelling is refused too).
    for (const kdf of [{ log2n: '14' }, { log2n: '0xe' }, { r: true }, { p: [1] }, { r: '8' }, { p: ' 1 ' }]) {
      expectKeyhold(catchError(() => parseKeyring(withKdf(kdf))), EXIT.ERROR, /malformed/);
    }
  });

  it('enrollPassphrase refuses out-of-bounds costs too', async () => {
    for (const cost of [{ log2n: 13, r: 8, p: 1 }, { log2n: 14, r: 33, p: 1 }, { log2n: 14, r: 8, p: 0 }]) {
      expect(await catchErrorAsync(() => enrollPassphrase(pass('x'), cost))).toBeInstanceOf(KeyholdError);
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe('withFactorRemoved', () => {
  it('refuses to remove the last factor (exit 1, says last) and an unknown id (exit 5)', async () => {
    const masterKey = randomBytes(32);
    const vaultId = newVaultId();
    const pp = await enrollPassphrase(pass('only'), COST);
    for (const policy of ['any', 'all'] as const) {
      const single = sealKeyring(vaultId, policy, [pp], masterKey);
      expectKeyhold(catchError(() => withFactorRemoved(single, masterKey, pp.factor.id, keks([pp.factor.id, pp.kek]))), EXIT.ERROR, /last/);
      expectKeyhold(catchError(() => withFactorRemoved(single, masterKey, 'sa-00000000')), EXIT.NOT_FOUND);
    }
    const sa = enrollAgent(ed, vaultId);
    const any = sealKeyring(vaultId, 'any', [pp, sa], masterKey);
    const fewer = withFactorRemoved(any, masterKey, sa.factor.id);
    expect(fewer.factors.map((f) => f.id)).toEqual([pp.factor.id]);
    expectKeyhold(catchError(() => withFactorRemoved(fewer, masterKey, pp.factor.id)), EXIT.ERROR, /last/);
    expectKeyhold(catchError(() => withFactorRemoved(fewer, masterKey, sa.factor.id)), EXIT.NOT_FOUND);
    // the removed factor no longer opens it; the remaining one does
    expectKeyhold(catchError(() => unwrapMasterKey(fewer, keks([sa.factor.id, sa.kek]))), EXIT.DENIED);
    expect(unwrapMasterKey(fewer, keks([pp.factor.id, pp.kek])).equals(masterKey)).toBe(true);
    // the input keyring is not modified
    expect(any.factors).toHaveLength(2);
  });

  it('under all, removal rewraps: the remaining factors unlock and the removed one is not needed', async () => {
    const masterKey = randomBytes(32);
    const vaultId = newVaultId();
    const pp = await enrollPassphrase(pass('all remove'), COST);
    const saEd = enrollAgent(ed, vaultId);
    const saRsa = enrollAgent(rsa, vaultId);
    const three = sealKeyring(vaultId, 'all', [pp, saEd, saRsa], masterKey);
    const remaining = () => keks([pp.factor.id, pp.kek], [saEd.factor.id, saEd.kek]);
    // before: the two remaining are not enough
    expectKeyhold(catchError(() => unwrapMasterKey(three, remaining())), EXIT.DENIED, new RegExp(saRsa.factor.id));
    const two = withFactorRemoved(three, masterKey, saRsa.factor.id, remaining());
    expect(two.factors.map((f) => f.id)).toEqual([pp.factor.id, saEd.factor.id]);
    expect(two.wrap).toBeDefined();
    expect(two.wrap!.ciphertext).not.toBe(three.wrap!.ciphertext);
    expect(unwrapMasterKey(two, remaining()).equals(masterKey)).toBe(true);
    // through the file too
    expect(unwrapMasterKey(parseKeyring(JSON.stringify(two)), remaining()).equals(masterKey)).toBe(true);
    // still all of the remaining ones are needed
    expectKeyhold(catchError(() => unwrapMasterKey(two, keks([pp.factor.id, pp.kek], [saRsa.factor.id, saRsa.kek]))), EXIT.DENIED);
    // removing down to one
    const one = withFactorRemoved(two, masterKey, pp.factor.id, keks([saEd.factor.id, saEd.kek]));
    expect(unwrapMasterKey(one, keks([saEd.factor.id, saEd.kek])).equals(masterKey)).toBe(true);
    expectKeyhold(catchError(() => withFactorRemoved(one, masterKey, saEd.factor.id, keks([saEd.factor.id, saEd.kek]))), EXIT.ERROR, /last/);
  });

  it('withFactorReplaced: same id, new secret; old secret refused (any and all)', async () => {
    const masterKey = randomBytes(32);
    const vaultId = newVaultId();
    const oldPp = await enrollPassphrase(pass('old'), COST);
    const sa = enrollAgent(ed, vaultId);
    const newPp = await enrollPassphrase(pass('new'), COST, oldPp.factor.id);
    for (const policy of ['any', 'all'] as const) {
      const k = sealKeyring(vaultId, policy, [oldPp, sa], masterKey);
      const next = withFactorReplaced(k, masterKey, newPp, keks([sa.factor.id, sa.kek]));
      expect(next.factors.map((f) => f.id)).toEqual([oldPp.factor.id, sa.factor.id]);
      const withPass = async (p: string) => {
        const m = await passphraseKeks(next, pass(p));
        if (policy === 'all') m.set(sa.factor.id, Buffer.from(sa.kek));
        return m;
      };
      expect(unwrapMasterKey(next, await withPass('new')).equals(masterKey), policy).toBe(true);
      const oldKeks = policy === 'all' ? keks([oldPp.factor.id, oldPp.kek], [sa.factor.id, sa.kek]) : keks([oldPp.factor.id, oldPp.kek]);
      expectKeyhold(catchError(() => unwrapMasterKey(next, oldKeks)), EXIT.DENIED);
      const oldDerived = await withPass('old');
      expectKeyhold(catchError(() => unwrapMasterKey(next, oldDerived)), EXIT.DENIED);
      expectKeyhold(catchError(() => withFactorReplaced(k, masterKey, { ...newPp, factor: { ...newPp.factor, id: 'pp-00000000' } })), EXIT.NOT_FOUND);
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe('vault files', () => {
  let n = 0;
  const newPaths = (): VaultPaths => {
    const d = join(dir, `vault-${++n}`);
    return vaultPaths(join(d, 'vault.db'));
  };

  /** The KEK for each named factor kind, re-derived from the secrets against the file's keyring. */
  function proving(secrets: { passphrase?: string; agents?: readonly AgentKey[] }) {
    return async (keyring: Keyring): Promise<FactorKeks> => {
      const out: FactorKeks = new Map();
      for (const f of keyring.factors) {
        if (f.type === 'passphrase' && secrets.passphrase !== undefined) out.set(f.id, await passphraseKek(f, pass(secrets.passphrase)));
        if (f.type === 'ssh-agent') {
          const agent = secrets.agents?.find((a) => a.ref.blob === f.key.blob);
          if (agent) out.set(f.id, agentKekFor(agent, keyring.vault_id, f));
        }
      }
      return out;
    };
  }

  const masterKeyOf = async (paths: VaultPaths, secrets: { passphrase?: string; agents?: readonly AgentKey[] }) => {
    const keyring = readKeyring(paths.keys);
    return unwrapMasterKey(keyring, await proving(secrets)(keyring));
  };

  it('policy any: ssh-agent factor added, opens alone; passphrase change rewraps without touching vault.db; last factor kept', async () => {
    const paths = newPaths();
    const pp = await enrollPassphrase(pass('first passphrase'), COST);
    const ppId = pp.factor.id;
    const vault = Vault.createWithFactors(paths, 'any', [copy(pp)]);
    const vaultId = vault.keyring.vault_id;
    const stored = generateKeyPairSync('ed25519').privateKey;
    const added = vault.addKey('default', stored, 'stored key');
    const sa = enrollAgent(ed, vaultId);
    const saId = sa.factor.id;
    const factor = vault.addFactor(copy(sa));
    expect(factor).toMatchObject({ id: saId, type: 'ssh-agent', key: ed.ref });
    expect((factor as Factor).wrap).toBeUndefined();
    const versionBefore = vault.version();
    vault.close();
    expect(readKeyring(paths.keys).factors.map((f) => f.id)).toEqual([ppId, saId]);

    // reopen with only the ssh-agent KEK
    const byAgent = await Vault.openWithKeks(paths, proving({ agents: [ed] }));
    expect(byAgent.listKeys().map((k) => k.fingerprint)).toEqual([added.fingerprint]);
    expect(byAgent.version()).toBe(versionBefore);
    byAgent.close();
    // another agent key, or no KEK at all, is refused
    expectKeyhold(await catchErrorAsync(() => Vault.openWithKeks(paths, proving({ agents: [ed2, rsa] }))), EXIT.DENIED);
    expectKeyhold(await catchErrorAsync(() => Vault.openWithKeks(paths, async () => new Map())), EXIT.DENIED);

    // passphrase change = replaceFactor with the same id, done from a vault opened by the agent factor
    const masterBefore = await masterKeyOf(paths, { passphrase: 'first passphrase' });
    expect(existsSync(`${paths.db}-wal`)).toBe(false);
    const dbBefore = readFileSync(paths.db);
    const keysBefore = readFileSync(paths.keys, 'utf8');
    const v2 = await Vault.openWithKeks(paths, proving({ agents: [ed] }));
    const replaced = v2.replaceFactor(await enrollPassphrase(pass('second passphrase'), COST, ppId));
    expect(replaced).toMatchObject({ id: ppId, type: 'passphrase' });
    expect(v2.keyring.factors.map((f) => f.id)).toEqual([ppId, saId]);
    v2.close();
    expect(readFileSync(paths.keys, 'utf8')).not.toBe(keysBefore);
    expectNotReencrypted(paths.db, dbBefore, 'vault.db must not be re-encrypted by a factor change');
    const masterAfter = await masterKeyOf(paths, { passphrase: 'second passphrase' });
    expect(masterAfter.equals(masterBefore)).toBe(true);
    expect((await masterKeyOf(paths, { agents: [ed] })).equals(masterBefore)).toBe(true);

    // old passphrase → 4; new one opens with keys and version intact
    expectKeyhold(await catchErrorAsync(() => Vault.open(paths, async () => pass('first passphrase'))), EXIT.DENIED);
    const byNew = await Vault.open(paths, async () => pass('second passphrase'));
    expect(byNew.listKeys().map((k) => [k.fingerprint, k.comment, k.scopes])).toEqual([[added.fingerprint, 'stored key', ['default']]]);
    expect(byNew.version()).toBe(versionBefore);
    // the stored private key is the same one
    const row = byNew.scopeKeys()[0]!;
    expect(row.privatePkcs8.equals(stored.export({ format: 'der', type: 'pkcs8' }))).toBe(true);

    // unknown id → 5, the last factor is refused; either way vault.db.keys is byte-identical
    const keysNow = readFileSync(paths.keys);
    expectKeyhold(catchError(() => byNew.removeFactor('sa-00000000')), EXIT.NOT_FOUND);
    expect(readFileSync(paths.keys).equals(keysNow)).toBe(true);
    byNew.removeFactor(saId);
    expect(byNew.keyring.factors.map((f) => f.id)).toEqual([ppId]);
    const keysOne = readFileSync(paths.keys);
    expectKeyhold(catchError(() => byNew.removeFactor(ppId)), EXIT.ERROR, /last/);
    expect(readFileSync(paths.keys).equals(keysOne)).toBe(true);
    expect(byNew.keyring.factors.map((f) => f.id)).toEqual([ppId]);
    byNew.close();
    // the removed agent factor no longer opens it; the passphrase still does
    expectKeyhold(await catchErrorAsync(() => Vault.openWithKeks(paths, proving({ agents: [ed] }))), EXIT.DENIED);
    const last = await Vault.open(paths, async () => pass('second passphrase'));
    expect(last.listKeys()).toHaveLength(1);
    last.close();
  });

  it('policy all: both KEKs open; one alone → 4 with files untouched; adding a factor then needs all three', async () => {
    const paths = newPaths();
    const pp = await enrollPassphrase(pass('all vault'), COST);
    const vaultId = newVaultId();
    const sa = enrollAgent(ed, vaultId);
    const created = Vault.createWithFactors(paths, 'all', [copy(pp), copy(sa)], vaultId);
    expect(created.keyring.vault_id).toBe(vaultId);
    const fp = created.addKey('ci', generateKeyPairSync('ed25519').privateKey, 'all key').fingerprint;
    created.close();

    const both = await Vault.openWithKeks(paths, proving({ passphrase: 'all vault', agents: [ed] }));
    expect(both.listKeys().map((k) => k.fingerprint)).toEqual([fp]);
    both.close();

    const dbBytes = readFileSync(paths.db);
    const dbHash = sha256(paths.db);
    const keysText = readFileSync(paths.keys, 'utf8');
    for (const [name, secrets] of [
      ['passphrase only', { passphrase: 'all vault' }],
      ['agent only', { agents: [ed] }],
      ['wrong passphrase', { passphrase: 'all vault?', agents: [ed] }],
      ['wrong agent key', { passphrase: 'all vault', agents: [ed2] }],
    ] as const) {
      const err = expectKeyhold(await catchErrorAsync(() => Vault.openWithKeks(paths, proving(secrets))), EXIT.DENIED);
      if (name === 'passphrase only') expect(err.message).toContain(sa.factor.id);
      if (name === 'agent only') expect(err.message).toContain(pp.factor.id);
      expect(sha256(paths.db), name).toBe(dbHash);
      expect(readFileSync(paths.keys, 'utf8'), name).toBe(keysText);
    }
    expect(existsSync(`${paths.db}-wal`)).toBe(false);

    // add a third factor from a vault opened with all KEKs
    const v = await Vault.openWithKeks(paths, proving({ passphrase: 'all vault', agents: [ed] }));
    const third = enrollAgent(rsa, vaultId);
    v.addFactor(copy(third));
    expect(v.keyring.factors.map((f) => f.id)).toEqual([pp.factor.id, sa.factor.id, third.factor.id]);
    v.close();
    expectNotReencrypted(paths.db, dbBytes, 'adding a factor must not re-encrypt vault.db');
    const err = expectKeyhold(await catchErrorAsync(() => Vault.openWithKeks(paths, proving({ passphrase: 'all vault', agents: [ed] }))), EXIT.DENIED);
    expect(err.message).toContain(third.factor.id);
    expectKeyhold(await catchErrorAsync(() => Vault.openWithKeks(paths, proving({ agents: [ed, rsa] }))), EXIT.DENIED);
    const all3 = await Vault.openWithKeks(paths, proving({ passphrase: 'all vault', agents: [ed, rsa] }));
    expect(all3.listKeys().map((k) => k.fingerprint)).toEqual([fp]);
    // a second passphrase factor is refused on a policy-all vault, and the key file is left alone
    const before = readFileSync(paths.keys);
    expect(catchError(() => all3.addFactor({ factor: { ...pp.factor, id: 'pp-0000beef' }, kek: randomBytes(32) }))).toBeInstanceOf(KeyholdError);
    expect(readFileSync(paths.keys).equals(before)).toBe(true);
    all3.close();
  });
});
