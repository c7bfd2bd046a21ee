// Malformed vault calls on a real daemon's control socket: each is refused (exit 2, naming the
// field, never quoting a value) before it reaches the vault, nothing is written to
// vault.db.keys, and the daemon goes on serving.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describeKey, fingerprint } from '../../src/agent-protocol/public-key.js';
import { readKeyring } from '../../src/vault/keyring.js';
import { VAULT_METHODS } from '../../src/vault/api.js';
import {
  frameBytes,
  initVault,
  keyhold,
  keyholdOk,
  makeKeyholdEnv,
  RawAgentClient,
  startServe,
  stopAllServes,
  stopBackgroundDaemon,
  waitFor,
  type KeyholdEnv,
  type ServeHandle,
} from '../helpers/keyhold.js';

let k: KeyholdEnv;
let serve: ServeHandle;
let vaultId: string;
let keysPath: string;
let controlPath: string;

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-control-schema-');
  initVault(k);
  keyholdOk(k, ['key', 'generate', 'web', '--type', 'ed25519']);
  keyholdOk(k, ['secret', 'set', 'web', 'KEEP'], { input: 'kept' });
  keysPath = `${k.vault}.keys`;
  vaultId = readKeyring(keysPath).vault_id;
  serve = await startServe(k);
  controlPath = join(k.runtime, 'control.sock');
  await waitFor(() => existsSync(controlPath), 10_000, 'the control socket');
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  if (k) await stopBackgroundDaemon(k.runtime);
  k?.cleanup();
}, 30_000);

type Reply = { ok: true; result: unknown } | { ok: false; error: { message: string; hint?: string; exitCode: number } };

/** Sends one raw JSON text (so "__proto__" keys and odd encodings reach the daemon as written). */
async function send(json: string): Promise<Reply> {
  const c = await RawAgentClient.connect(controlPath);
  try {
    c.send(frameBytes(Buffer.from(json)));
    return JSON.parse((await c.reply(10_000)).toString('utf8')) as Reply;
  } finally {
    c.close();
  }
}

const call = (method: string, args: unknown[]) => send(JSON.stringify({ op: 'call', vaultId, method, args }));
const b64 = (bytes: Buffer) => ({ $b64: bytes.toString('base64') });

function daemonLog(): string {
  return `\n--- daemon stderr (tail) ---\n${serve.stderr().slice(-2000)}`;
}

/** What the daemon must still do: answer status unlocked, and serve a CLI command end to end. */
function expectServing(what: string): void {
  expect(serve.proc.exitCode, `${what}: the daemon exited${daemonLog()}`).toBeNull();
  const r = keyhold(k, ['secret', 'get', 'web', 'KEEP']);
  expect(r.status, `${what}: secret get: ${r.stderr}${daemonLog()}`).toBe(0);
  expect(r.stdout).toBe('kept');
  const factors = keyhold(k, ['factor', 'list', '--json']);
  expect(factors.status, `${what}: factor list: ${factors.stderr}`).toBe(0);
}

// A well-formed enrolled factor of each type, as the CLI would send it.
const passphraseFactor = () => ({
  factor: {
    id: `pp-${randomBytes(4).toString('hex')}`,
    type: 'passphrase',
    created: new Date().toISOString(),
    kdf: { name: 'scrypt', log2n: 14, r: 8, p: 1, salt: randomBytes(16).toString('base64') },
  },
  kek: b64(randomBytes(32)),
});
const agentKey = (() => {
  const { publicKey } = generateKeyPairSync('ed25519');
  const blob = describeKey(publicKey).blob;
  return { type: 'ssh-ed25519', fingerprint: fingerprint(blob), blob: blob.toString('base64') };
})();
const sshAgentFactor = () => ({
  factor: {
    id: `sa-${randomBytes(4).toString('hex')}`,
    type: 'ssh-agent',
    created: new Date().toISOString(),
    key: { ...agentKey },
    challenge: randomBytes(32).toString('base64'),
    kdf: { name: 'hkdf-sha256', info: 'keyhold-ssh-agent-factor-v1' },
  },
  kek: b64(randomBytes(32)),
});

type Enrolled = ReturnType<typeof passphraseFactor> | ReturnType<typeof sshAgentFactor>;
type Edit = [string, (e: Enrolled) => unknown];
const edited = (make: () => Enrolled, edit: (e: Record<string, any>) => void) => {
  const e = make() as Record<string, any>;
  edit(e);
  return e;
};

describe('addFactor / replaceFactor with a malformed factor', () => {
  // Each of these was accepted (and the first five written to vault.db.keys, breaking the vault)
  // before requests were validated against the method's schema.
  const malformed: [string, () => unknown][] = [
    ['a factor id outside pp-xxxxxxxx', () => edited(passphraseFactor, (e) => (e.factor.id = 'pp-x'))],
    ['an unknown factor type', () => edited(passphraseFactor, (e) => (e.factor.type = 'password'))],
    ['scrypt cost out of bounds', () => edited(passphraseFactor, (e) => (e.factor.kdf.log2n = 30))],
    ['a short salt', () => edited(passphraseFactor, (e) => (e.factor.kdf.salt = randomBytes(4).toString('base64')))],
    ['a fingerprint that does not match the key', () => edited(sshAgentFactor, (e) => (e.factor.key.fingerprint = `SHA256:${'A'.repeat(43)}`))],
    ['no created time', () => edited(passphraseFactor, (e) => delete e.factor.created)],
    ['a challenge of 16 bytes', () => edited(sshAgentFactor, (e) => (e.factor.challenge = randomBytes(16).toString('base64')))],
    ['an ssh-agent factor with a pp- id', () => edited(sshAgentFactor, (e) => (e.factor.id = 'pp-00000000'))],
    ['a KEK of 31 bytes', () => edited(passphraseFactor, (e) => (e.kek = b64(randomBytes(31))))],
    ['a KEK as a bare base64 string', () => edited(passphraseFactor, (e) => (e.kek = randomBytes(32).toString('base64')))],
    ['a KEK in non-canonical base64', () => edited(passphraseFactor, (e) => (e.kek = { $b64: randomBytes(32).toString('base64').replace(/=+$/, '') }))],
    ['no factor at all', () => ({ kek: b64(randomBytes(32)) })],
    ['the factor as an array', () => edited(passphraseFactor, (e) => (e.factor = [e.factor]))],
  ];

  for (const [what, make] of malformed) {
    it(`${what}: exit 2 naming the field, vault.db.keys unchanged, the daemon serves on`, async () => {
      const before = readFileSync(keysPath);
      for (const method of ['addFactor', 'replaceFactor']) {
        const r = await call(method, [make()]);
        expect(r.ok, `${method}: ${JSON.stringify(r)}${daemonLog()}`).toBe(false);
        if (r.ok) continue;
        expect(r.error.exitCode, `${method}: ${r.error.message}`).toBe(2);
        expect(r.error.message).toMatch(new RegExp(`^bad control request: ${method}: enrolled\\b`));
        expect(readFileSync(keysPath).equals(before), `${method}: vault.db.keys was rewritten`).toBe(true);
      }
      expectServing(what);
    });
  }

  it('a well-formed factor is still added, and the vault opens after it', async () => {
    const before = readFileSync(keysPath);
    const enrolled = passphraseFactor();
    const r = await call('addFactor', [enrolled]);
    expect(r.ok, JSON.stringify(r)).toBe(true);
    expect(readFileSync(keysPath).equals(before)).toBe(false);
    expect(readKeyring(keysPath).factors.map((f) => f.id)).toContain(enrolled.factor.id);
    expectServing('after a valid addFactor');
    // And it goes again (the new factor cannot unlock: its KEK came from no passphrase).
    expect((await call('removeFactor', [enrolled.factor.id])).ok).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------
// The fuzz: random and near-valid requests for every method.

const MARK = 'zQxMark';
const FACTOR_METHODS = new Set(['addFactor', 'replaceFactor', 'removeFactor']);

/** Valid-looking args per method, in wire form; fuzzing edits them (or throws them away). */
function templateArgs(method: string): unknown[] {
  const fp = `SHA256:${randomBytes(32).toString('base64').slice(0, 43)}`;
  switch (method) {
    case 'generateKey':
      return ['fuzz', 'ed25519', { $undefined: true }, 'fuzz key'];
    case 'importKey':
      return ['fuzz', b64(randomBytes(48)), 'c'];
    case 'listKeys':
    case 'listTokens':
      return ['web'];
    case 'assign':
    case 'unassign':
      return ['web', fp];
    case 'removeKey':
      return [fp];
    case 'issueToken':
      return ['fuzz', 'subject', 60_000];
    case 'revokeToken':
      return [`tok_${randomBytes(6).toString('hex')}`];
    case 'revokeTokens':
      return ['fuzz', 'subject'];
    case 'setSecret':
      return ['fuzz', 'FUZZ', b64(Buffer.from('v'))];
    case 'getSecret':
    case 'removeSecret':
      return ['web', 'NOT_THERE'];
    case 'listSecrets':
      return ['web'];
    case 'secretValues':
      return [['web']];
    case 'addFactor':
    case 'replaceFactor':
      return [Math.random() < 0.5 ? passphraseFactor() : sshAgentFactor()];
    case 'removeFactor':
      return ['pp-00000000'];
    default:
      return [];
  }
}

/** Values a hostile client would put anywhere. */
const hostileArb: fc.Arbitrary<unknown> = fc.oneof(
  fc.constantFrom(
    null,
    true,
    0,
    -1,
    1.5,
    1e308,
    -0,
    2 ** 53,
    '',
    `${MARK}-string`,
    `SHA256:${MARK}`,
    `pp-${MARK}`,
    `${MARK}\n`,
    '__proto__',
    { $b64: 42 },
    { $b64: `${MARK}!!` },
    { $b64: 'AAAA', extra: 1 },
    { $b64: 'AAA' },
    { $undefined: false },
    { $undefined: true },
    [],
    {},
  ),
  fc.constant(JSON.parse(`{"__proto__":{"polluted":"${MARK}"},"constructor":{"prototype":{"polluted":1}}}`)),
  fc.integer({ min: 0, max: 40 }).map((depth) => {
    let v: unknown = MARK;
    for (let i = 0; i < depth; i++) v = i % 2 ? [v] : { a: v };
    return v;
  }),
  fc.integer({ min: 9, max: 100_000 }).map((n) => new Array(n).fill(0)),
  fc.jsonValue({ maxDepth: 3 }),
  // Never a valid name (`/` is in none of the vault's name patterns): a valid scope named
  // "zQxMarkiv" gets a socket, whose path the daemon rightly logs.
  fc.string({ maxLength: 20 }).map((s) => `${MARK}/${s}`),
);

/** A copy of `value` with one spot (picked by `choice`) replaced, removed, or given a __proto__ key. */
function mutate(value: unknown, choice: number[], replacement: unknown): unknown {
  const [pick = 0, ...rest] = choice;
  if (Array.isArray(value) && value.length > 0) {
    const copy = [...value];
    const i = pick % (copy.length + 1);
    if (i === copy.length) copy.push(replacement);
    else copy[i] = rest.length > 0 ? mutate(copy[i], rest, replacement) : replacement;
    return copy;
  }
  if (value !== null && typeof value === 'object' && !('$b64' in value)) {
    const keys = Object.keys(value);
    if (keys.length === 0) return replacement;
    const copy: Record<string, unknown> = { ...(value as Record<string, unknown>) };
    const key = keys[pick % keys.length]!;
    if (pick % 7 === 6) delete copy[key];
    else if (pick % 7 === 5) Object.defineProperty(copy, '__proto__', { value: replacement, enumerable: true, configurable: true, writable: true });
    else copy[key] = rest.length > 0 ? mutate(copy[key], rest, replacement) : replacement;
    return copy;
  }
  return replacement;
}

const methodArb = fc.oneof(
  { weight: 8, arbitrary: fc.constantFrom(...VAULT_METHODS) },
  { weight: 1, arbitrary: fc.constantFrom('constructor', '__proto__', 'toString', 'hasOwnProperty', 'close', 'addKey', 'changeKeyring') },
  { weight: 1, arbitrary: fc.string({ maxLength: 12 }) },
);

const requestArb = fc.oneof(
  // Near-valid: a method's template with one spot edited (the most likely to slip past a check).
  {
    weight: 6,
    arbitrary: fc
      .tuple(methodArb, fc.array(fc.nat({ max: 30 }), { minLength: 1, maxLength: 4 }), hostileArb)
      .map(([method, choice, replacement]) => ({ op: 'call', vaultId: '$VAULT', method, args: mutate(templateArgs(method), choice, replacement) })),
  },
  // Args of any shape.
  { weight: 2, arbitrary: fc.tuple(methodArb, hostileArb).map(([method, args]) => ({ op: 'call', vaultId: '$VAULT', method, args })) },
  { weight: 1, arbitrary: fc.tuple(methodArb, fc.array(hostileArb, { maxLength: 10 })).map(([method, args]) => ({ op: 'call', vaultId: '$VAULT', method, args })) },
  // Envelope fields gone wrong, and unlocks that cannot be valid (no 32-byte KEK).
  {
    weight: 1,
    arbitrary: fc
      .tuple(fc.constantFrom('call', 'unlock', 'status', 'Status', '', 'constructor'), hostileArb, hostileArb)
      .map(([op, vaultIdValue, keks]) => ({ op, vaultId: vaultIdValue, method: 'listKeys', args: [], keks, idleMs: keks })),
  },
);

function wellFormed(r: unknown): r is Reply {
  if (r === null || typeof r !== 'object') return false;
  const reply = r as Record<string, unknown>;
  if (reply.ok === true) return 'result' in reply;
  if (reply.ok !== false) return false;
  const error = reply.error as Record<string, unknown> | undefined;
  return (
    !!error &&
    typeof error.message === 'string' &&
    (error.hint === undefined || typeof error.hint === 'string') &&
    [1, 2, 3, 4, 5].includes(error.exitCode as number)
  );
}

describe('fuzzed control requests (fast-check, 300 runs) on a real daemon', () => {
  it('every reply is a well-formed result or error; refusals quote nothing; vault.db.keys changes only by a valid change; the daemon serves on', async () => {
    let keys = readFileSync(keysPath);
    let refused = 0;
    await fc.assert(
      fc.asyncProperty(requestArb, async (request) => {
        const json = JSON.stringify(request).replaceAll('"$VAULT"', JSON.stringify(vaultId));
        const r = await send(json);
        expect(wellFormed(r), `${json.slice(0, 300)} → ${JSON.stringify(r).slice(0, 300)}${daemonLog()}`).toBe(true);
        if (!r.ok && r.error.exitCode === 2) {
          refused++;
          expect(`${r.error.message} ${r.error.hint ?? ''}`, json.slice(0, 300)).not.toContain(MARK);
        }
        expect(serve.proc.exitCode, `the daemon exited after ${json.slice(0, 300)}${daemonLog()}`).toBeNull();
        const now = readFileSync(keysPath);
        if (!now.equals(keys)) {
          expect(r.ok && FACTOR_METHODS.has(request.method), `vault.db.keys changed after ${json.slice(0, 300)} → ${JSON.stringify(r)}`).toBe(true);
          readKeyring(keysPath); // what was written, the reader accepts
          keys = now;
        }
      }),
      { numRuns: 300, interruptAfterTimeLimit: 60_000 },
    );
    expect(refused).toBeGreaterThan(100);
    expectServing('after the fuzz');
    // A valid request may create a scope whose name carries the mark (`pp-zQxMark` is a scope
    // name): the daemon opening that scope's socket names it, as it should. Nothing else may.
    const quoting = serve
      .stderr()
      .split('\n')
      .filter((line) => line.includes(MARK))
      .filter((line) => !/"msg":"scope socket [a-z]+"/.test(line));
    expect(quoting).toEqual([]);
  }, 120_000);
});
