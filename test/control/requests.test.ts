// The schema of every control request: for each vault method, what the CLI sends passes and each
// malformed argument is refused with exit 2, naming the parameter and field but never the value.
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { CONTROL_SOCKET, encodeMessage, decodeMessage } from '../../src/control/protocol.js';
import { remoteVaultApi } from '../../src/control/remote-vault.js';
import { callVaultMethod, parseControlRequest, type VaultCall } from '../../src/control/requests.js';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { VAULT_METHODS, type VaultApi, type VaultMethod } from '../../src/vault/api.js';
import { FP, agentKeyRef, enrolledPassphrase, enrolledSshAgent, validCalls } from './valid-calls.js';

const MARK = 'zQxMark';

function refusal(request: unknown, what = ''): string {
  let err: unknown;
  try {
    parseControlRequest(request);
  } catch (e) {
    err = e;
  }
  expect(err, `accepted: ${what}`).toBeInstanceOf(KeyholdError);
  expect((err as KeyholdError).exitCode).toBe(EXIT.USAGE);
  const { message, hint } = err as KeyholdError;
  expect(`${message} ${hint ?? ''}`).not.toContain(MARK);
  return message;
}

const callRefusal = (method: string, args: unknown, what = method) => refusal({ op: 'call', vaultId: 'vid', method, args }, what);

let valid: Record<VaultMethod, unknown[][]>;
beforeAll(async () => {
  valid = await validCalls();
});

describe('each vault method: well-formed calls pass', () => {
  it('every method has at least one valid argument list, and each passes unchanged', () => {
    for (const method of VAULT_METHODS) {
      expect(valid[method].length, method).toBeGreaterThan(0);
      for (const args of valid[method]) {
        const parsed = parseControlRequest({ op: 'call', vaultId: 'vid', method, args }) as VaultCall;
        expect(parsed.method).toBe(method);
        args.forEach((arg, i) => expect(parsed.args[i], `${method}[${i}]`).toEqual(arg));
      }
    }
  });

  it('a factor from each enrolment function passes, with its KEK the same Buffer (so the vault can zero it)', async () => {
    for (const enrolled of [await enrolledPassphrase(), enrolledSshAgent()]) {
      const parsed = parseControlRequest({ op: 'call', vaultId: 'v', method: 'addFactor', args: [enrolled] }) as Extract<VaultCall, { method: 'addFactor' }>;
      expect(parsed.args[0].kek).toBe(enrolled.kek);
      expect(parsed.args[0].factor).toEqual(enrolled.factor);
    }
  });
});

// [method, args, the field the refusal must name]
type Bad = [VaultMethod, unknown[], string];

async function badCalls(): Promise<Bad[]> {
  const pp = await enrolledPassphrase();
  const sa = enrolledSshAgent();
  const withFactor = (base: typeof pp, edit: (f: Record<string, any>) => void) => {
    const factor = structuredClone(base.factor) as Record<string, any>;
    edit(factor);
    return [{ factor, kek: base.kek }];
  };
  return [
    ['generateKey', [`web/${MARK}`, 'ed25519', undefined, 'c'], 'generateKey: scope'],
    ['generateKey', ['web', `dsa${MARK}`, undefined, 'c'], 'generateKey: kind'],
    ['generateKey', ['web', 'rsa', 1.5, 'c'], 'generateKey: bits'],
    ['generateKey', ['web', 'rsa', 100_000, 'c'], 'generateKey: bits'],
    ['generateKey', ['web', 'rsa', '3072', 'c'], 'generateKey: bits'],
    ['generateKey', ['web', 'ed25519', undefined, 5], 'generateKey: comment'],
    ['generateKey', ['web', 'ed25519', undefined, MARK.repeat(1000)], 'generateKey: comment'],
    ['generateKey', ['web', 'ed25519'], 'generateKey: comment'],
    ['generateKey', ['web', 'ed25519', undefined, 'c', MARK], 'generateKey: args'],
    ['importKey', ['web', MARK, 'c'], 'importKey: pkcs8'],
    ['importKey', ['web', { $b64: 'AAAA' }, 'c'], 'importKey: pkcs8'],
    ['importKey', ['web', new Uint8Array(8), 'c'], 'importKey: pkcs8'],
    ['importKey', ['web', Buffer.alloc(64 * 1024 + 1), 'c'], 'importKey: pkcs8'],
    ['importCertificate', ['web', Buffer.alloc(8), MARK, 'c'], 'importCertificate: certificate'],
    ['importCertificate', ['web', Buffer.alloc(8), Buffer.alloc(64 * 1024 + 1), 'c'], 'importCertificate: certificate'],
    ['importCertificate', ['web', MARK, Buffer.alloc(8), 'c'], 'importCertificate: pkcs8'],
    ['removeCertificate', ['web', 5], 'removeCertificate: certificate'],
    ['removeCertificate', ['.web', Buffer.alloc(8)], 'removeCertificate: scope'],
    ['listKeys', [5], 'listKeys: scope'],
    ['scopeConstraints', [], 'scopeConstraints: scope'],
    ['scopeConstraints', ['..'], 'scopeConstraints: scope'],
    ['listKeys', ['..'], 'listKeys: scope'],
    ['listKeys', [null], 'listKeys: scope'],
    ['listKeys', ['web', 'web'], 'listKeys: args'],
    // A fingerprint or id of the wrong form names nothing: the vault says "not found", as without
    // a daemon. The schema only bounds it.
    ['assign', ['web', ''], 'assign: fingerprint'],
    ['assign', ['web', 'A'.repeat(513)], 'assign: fingerprint'],
    ['assign', ['web', 5], 'assign: fingerprint'],
    ['assign', ['.web', FP], 'assign: scope'],
    ['unassign', ['web', null], 'unassign: fingerprint'],
    ['removeKey', [{ fp: MARK }], 'removeKey: fingerprint'],
    ['removeKey', [], 'removeKey: fingerprint'],
    ['scopes', [MARK], 'scopes: args'],
    ['issueToken', ['web', `ci\n${MARK}`, null], 'issueToken: subject'],
    ['issueToken', ['web', 'x'.repeat(129), null], 'issueToken: subject'],
    ['issueToken', ['web', 'ci', 0], 'issueToken: ttlMs'],
    ['issueToken', ['web', 'ci', -1], 'issueToken: ttlMs'],
    ['issueToken', ['web', 'ci', 1.5], 'issueToken: ttlMs'],
    ['issueToken', ['web', 'ci', Number.MAX_SAFE_INTEGER], 'issueToken: ttlMs'],
    ['issueToken', ['web', 'ci', '60000'], 'issueToken: ttlMs'],
    ['issueToken', ['web', 'ci'], 'issueToken: ttlMs'],
    ['listTokens', [{}], 'listTokens: scope'],
    ['revokeToken', [''], 'revokeToken: id'],
    ['revokeToken', [['tok_0123456789AB']], 'revokeToken: id'],
    ['revokeTokens', ['web', '\u0007'], 'revokeTokens: subject'],
    ['revokeTokens', [], 'revokeTokens: scope'],
    ['setSecret', ['web', `1${MARK}`, Buffer.from('v')], 'setSecret: name'],
    ['setSecret', ['web', 'A', MARK], 'setSecret: value'],
    ['setSecret', ['web', 'A', [1, 2]], 'setSecret: value'],
    ['setSecret', ['web', 'A', Buffer.alloc(1024 * 1024 + 1)], 'setSecret: value'],
    ['getSecret', ['web', 'A-B'], 'getSecret: name'],
    ['listSecrets', [], 'listSecrets: scope'],
    ['removeSecret', ['web', ''], 'removeSecret: name'],
    ['secretValues', ['web'], 'secretValues: scopes'],
    ['secretValues', [['web', `../${MARK}`]], 'secretValues: scopes[1]'],
    ['secretValues', [new Array(10_001).fill('web')], 'secretValues: scopes'],
    ['setPolicy', ['web', { default: MARK, rules: [] }, ''], 'setPolicy: document.default'],
    ['setPolicy', ['web', { default: 'deny', rules: [{ action: 'allow', hosts: [{ name: 'h', fingerprints: [MARK] }] }] }, ''], 'setPolicy: document.rules[0].hosts[0].fingerprints[0]'],
    ['setPolicy', ['web', { default: 'deny', rules: [{ action: 'allow', [MARK]: 1 }] }, ''], 'setPolicy: document.rules[0]'],
    ['setPolicy', ['web', { default: 'deny', rules: [] }, 'x'.repeat(1024 * 1024 + 1)], 'setPolicy: source'],
    ['getPolicy', [`../${MARK}`], 'getPolicy: scope'],
    ['removePolicy', [], 'removePolicy: scope'],
    ['addFactor', [], 'addFactor: enrolled'],
    ['addFactor', [MARK], 'addFactor: enrolled'],
    ['addFactor', [{ factor: pp.factor }], 'addFactor: enrolled.kek'],
    ['addFactor', [{ factor: pp.factor, kek: Buffer.alloc(31) }], 'addFactor: enrolled.kek'],
    ['addFactor', [{ factor: pp.factor, kek: pp.kek.toString('base64') }], 'addFactor: enrolled.kek'],
    ['addFactor', [{ kek: pp.kek }], 'addFactor: enrolled.factor'],
    ['addFactor', withFactor(pp, (f) => (f.id = `pp-${MARK}`)), 'addFactor: enrolled.factor.id'],
    ['addFactor', withFactor(pp, (f) => (f.id = 'sa-01234567')), 'addFactor: enrolled.factor.id'],
    ['addFactor', withFactor(pp, (f) => (f.type = MARK)), 'addFactor: enrolled.factor.type'],
    ['addFactor', withFactor(pp, (f) => delete f.created), 'addFactor: enrolled.factor.created'],
    ['addFactor', withFactor(pp, (f) => (f.kdf.log2n = 21)), 'addFactor: enrolled.factor.kdf.log2n'],
    ['addFactor', withFactor(pp, (f) => (f.kdf.log2n = 13)), 'addFactor: enrolled.factor.kdf.log2n'],
    ['addFactor', withFactor(pp, (f) => (f.kdf.r = 0.5)), 'addFactor: enrolled.factor.kdf.r'],
    ['addFactor', withFactor(pp, (f) => (f.kdf.p = 17)), 'addFactor: enrolled.factor.kdf.p'],
    ['addFactor', withFactor(pp, (f) => Object.assign(f.kdf, { log2n: 20, r: 32 })), 'addFactor: enrolled.factor.kdf'],
    ['addFactor', withFactor(pp, (f) => (f.kdf.salt = randomBytes(15).toString('base64'))), 'addFactor: enrolled.factor.kdf.salt'],
    ['addFactor', withFactor(pp, (f) => (f.kdf.salt = `${MARK}!`)), 'addFactor: enrolled.factor.kdf.salt'],
    ['addFactor', withFactor(pp, (f) => (f.kdf.name = 'argon2')), 'addFactor: enrolled.factor.kdf.name'],
    ['addFactor', withFactor(pp, (f) => (f.wrap = { alg: 'A256GCM', nonce: '', ciphertext: '', tag: '' })), 'addFactor: enrolled.factor.wrap'],
    ['addFactor', withFactor(sa, (f) => (f.key.fingerprint = agentKeyRef().fingerprint)), 'addFactor: enrolled.factor.key'],
    ['addFactor', withFactor(sa, (f) => (f.key.type = 'ssh-rsa')), 'addFactor: enrolled.factor.key'],
    ['addFactor', withFactor(sa, (f) => (f.key.type = 'ecdsa-sha2-nistp256')), 'addFactor: enrolled.factor.key.type'],
    ['addFactor', withFactor(sa, (f) => (f.key.blob = `${f.key.blob}=`)), 'addFactor: enrolled.factor.key.blob'],
    ['addFactor', withFactor(sa, (f) => (f.key.blob = Buffer.alloc(4000).toString('base64'))), 'addFactor: enrolled.factor.key.blob'],
    ['addFactor', withFactor(sa, (f) => (f.challenge = randomBytes(31).toString('base64'))), 'addFactor: enrolled.factor.challenge'],
    ['addFactor', withFactor(sa, (f) => (f.kdf.info = 'other')), 'addFactor: enrolled.factor.kdf.info'],
    ['addFactor', [pp, pp], 'addFactor: args'],
    ['replaceFactor', withFactor(pp, (f) => (f.id = 'pp-0123456')), 'replaceFactor: enrolled.factor.id'],
    ['removeFactor', [''], 'removeFactor: id'],
    ['removeFactor', [{ id: MARK }], 'removeFactor: id'],
    ['verifyAudit', [true], 'verifyAudit: args'],
  ];
}

describe('each vault method: malformed calls are refused (exit 2), naming the field, quoting nothing', () => {
  it('per method, per field', async () => {
    const cases = await badCalls();
    for (const method of VAULT_METHODS) expect(cases.some(([m]) => m === method), `no bad case for ${method}`).toBe(true);
    for (const [method, args, field] of cases) {
      expect(callRefusal(method, args, field), field).toBe(`bad control request: ${field}`);
    }
  });

  it('args that are not a list, for every method', () => {
    for (const method of VAULT_METHODS) {
      for (const args of [undefined, null, {}, { 0: 'web', length: 1 }, MARK, 3, Buffer.from(MARK)]) {
        expect(callRefusal(method, args)).toBe(`bad control request: ${method}: args`);
      }
    }
  });

  it('a method outside VaultApi is refused without echoing it', () => {
    for (const method of [`${MARK}`, 'constructor', '__proto__', 'toString', 'addKey', 'changeKeyring', 5, null]) {
      expect(callRefusal(method as string, [])).toBe('bad control request: call: method');
    }
  });
});

describe('status, lock, stop and unlock requests', () => {
  const kek = () => randomBytes(32);
  it('good ones pass; extra envelope fields are dropped', () => {
    expect(parseControlRequest({ op: 'status', [MARK]: 1 })).toEqual({ op: 'status' });
    expect(parseControlRequest({ op: 'lock' })).toEqual({ op: 'lock' });
    expect(parseControlRequest({ op: 'stop', [MARK]: 1 })).toEqual({ op: 'stop' });
    expect(parseControlRequest({ op: 'unlock', vaultId: 'v', keks: { 'pp-0123abcd': kek() }, idleMs: 60_000 })).toMatchObject({ idleMs: 60_000, ttlMs: null });
  });

  it('bad ones name the field', () => {
    const cases: [unknown, string][] = [
      [null, 'not an object'],
      [[{ op: 'status' }], 'not an object'],
      [Buffer.from('{}'), 'not an object'],
      [{}, 'op'],
      [{ op: MARK }, 'op'],
      [{ op: 'unlock', vaultId: 'v' }, 'unlock: keks'],
      [{ op: 'unlock', vaultId: 5, keks: {} }, 'unlock: vaultId'],
      [{ op: 'unlock', vaultId: MARK.repeat(10), keks: {} }, 'unlock: vaultId'],
      [{ op: 'unlock', vaultId: 'v', keks: { [MARK]: kek() } }, 'unlock: keks'],
      [{ op: 'unlock', vaultId: 'v', keks: { 'pp-0123abcd': Buffer.from(MARK) } }, 'unlock: keks'],
      [{ op: 'unlock', vaultId: 'v', keks: [kek()] }, 'unlock: keks'],
      [{ op: 'unlock', vaultId: 'v', keks: Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`pp-${i.toString(16).padStart(8, '0')}`, kek()])) }, 'unlock: keks'],
      [{ op: 'unlock', vaultId: 'v', keks: {}, idleMs: 0 }, 'unlock: idleMs'],
      [{ op: 'unlock', vaultId: 'v', keks: {}, ttlMs: 1e16 }, 'unlock: ttlMs'],
      [{ op: 'unlock', vaultId: 'v', keks: {}, rememberMs: 0 }, 'unlock: rememberMs'],
      [{ op: 'unlock', vaultId: 'v', keks: {}, rememberMs: '5s' }, 'unlock: rememberMs'],
      [{ op: 'call', vaultId: null, method: 'scopes', args: [] }, 'call: vaultId'],
    ];
    for (const [request, field] of cases) expect(refusal(request), field).toBe(`bad control request: ${field}`);
  });
});

describe('approvals, approve and deny requests', () => {
  it('good ones pass', () => {
    expect(parseControlRequest({ op: 'approvals' })).toEqual({ op: 'approvals' });
    expect(parseControlRequest({ op: 'approvals', after: 3, waitMs: 25_000 })).toEqual({ op: 'approvals', after: 3, waitMs: 25_000 });
    expect(parseControlRequest({ op: 'approve', id: 'abcdefgh', rememberMs: 600_000 })).toEqual({ op: 'approve', id: 'abcdefgh', rememberMs: 600_000 });
    expect(parseControlRequest({ op: 'deny', id: 'abcdefgh' })).toEqual({ op: 'deny', id: 'abcdefgh' });
  });

  it('bad ones name the field, never the value', () => {
    const cases: [unknown, string][] = [
      [{ op: 'approvals', after: -1 }, 'approvals: after'],
      [{ op: 'approvals', waitMs: 3_600_000 }, 'approvals: waitMs'],
      [{ op: 'approve' }, 'approve: id'],
      [{ op: 'approve', id: MARK.repeat(100) }, 'approve: id'],
      [{ op: 'approve', id: 'abcdefgh', rememberMs: 0 }, 'approve: rememberMs'],
      [{ op: 'deny', id: 5 }, 'deny: id'],
    ];
    for (const [request, field] of cases) expect(refusal(request), field).toBe(`bad control request: ${field}`);
  });
});

describe('callVaultMethod', () => {
  it('calls the named method with the parsed arguments, on the api as `this`', async () => {
    const seen: [string, unknown[], unknown][] = [];
    const api = Object.fromEntries(
      VAULT_METHODS.map((m) => [
        m,
        function (this: unknown, ...args: unknown[]) {
          seen.push([m, args, this]);
          return Promise.resolve(m);
        },
      ]),
    ) as unknown as VaultApi;
    for (const method of VAULT_METHODS) {
      const call = parseControlRequest({ op: 'call', vaultId: 'v', method, args: valid[method][0] }) as VaultCall;
      expect(await callVaultMethod(api, call)).toBe(method);
      expect(seen.at(-1)![0]).toBe(method);
      expect(seen.at(-1)![2]).toBe(api);
    }
  });

  it('the compiler refuses a call its schema would refuse', () => {
    const api = null as unknown as VaultApi;
    const never = () => {
      // @ts-expect-error setSecret takes a Buffer value
      void callVaultMethod(api, { method: 'setSecret', args: ['web', 'A', 'text'] });
      // @ts-expect-error too few arguments
      void callVaultMethod(api, { method: 'assign', args: ['web'] });
      // @ts-expect-error not a method of VaultApi
      void callVaultMethod(api, { method: 'close', args: [] });
    };
    expect(typeof never).toBe('function');
  });
});

describe('the CLI end checks with the same schema before it sends', () => {
  let dir: string;
  let server: Server;
  const received: unknown[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'keyhold-requests-'));
    server = createServer((socket) => {
      let buffer = Buffer.alloc(0);
      socket.on('data', (d: Buffer) => {
        buffer = Buffer.concat([buffer, d]);
        while (buffer.length >= 4 && buffer.length >= 4 + buffer.readUInt32BE(0)) {
          received.push(decodeMessage(buffer.subarray(4, 4 + buffer.readUInt32BE(0))));
          buffer = buffer.subarray(4 + buffer.readUInt32BE(0));
          socket.write(encodeMessage({ ok: true, result: null }));
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(join(dir, CONTROL_SOCKET), resolve));
  });

  afterAll(async () => {
    await new Promise((resolve) => server.close(resolve));
    rmSync(dir, { recursive: true, force: true });
  });

  it('a malformed call is refused (exit 2) and nothing is sent; a good one goes out', async () => {
    const client = (await ControlClient.connect(dir))!;
    try {
      const api = remoteVaultApi(client, 'vid');
      const enrolled = await enrolledPassphrase();
      const bad = { factor: { ...enrolled.factor, id: 'pp-x' }, kek: enrolled.kek };
      await expect(api.addFactor(bad)).rejects.toMatchObject({ exitCode: EXIT.USAGE, message: 'bad control request: addFactor: enrolled.factor.id' });
      await expect(api.setSecret('web', 'A', Buffer.alloc(1024 * 1024 + 1))).rejects.toMatchObject({ exitCode: EXIT.USAGE });
      await expect(client.call({ op: 'unlock', vaultId: 'v', keks: { 'pp-0123abcd': Buffer.alloc(16) } })).rejects.toMatchObject({ exitCode: EXIT.USAGE });
      expect(received).toEqual([]);
      await api.listKeys();
      await api.addFactor(enrolled);
      expect(received.map((r) => (r as { method: string }).method)).toEqual(['listKeys', 'addFactor']);
      expect(((received[1] as { args: { kek: Buffer }[] }).args[0]!.kek).equals(enrolled.kek)).toBe(true);
    } finally {
      client.close();
    }
  });
});
