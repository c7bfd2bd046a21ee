// Golden vectors for ssh-add's key operations: every request OpenSSH 9.2's ssh-add sent to its
// ssh-agent parses to exactly what ssh-add was asked (key, comment, constraints), the key it
// carries signs what its public blob verifies, our encoder sends the same bytes back, and the
// agent's replies are the frames we send for success and failure.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { frame } from '../../src/agent-protocol/framing.js';
import { encodeRequest, encodeResponse, parseRequest, type AddIdentityRequest } from '../../src/agent-protocol/messages.js';
import type { DestinationConstraint } from '../../src/agent-protocol/key-constraints.js';
import { fingerprint, type SshKeyType } from '../../src/agent-protocol/public-key.js';
import { signatureAlgorithmFor, signSsh, verifySsh, SIGN_FLAG_RSA_SHA2_512 } from '../../src/agent-protocol/signature.js';
import { addExchanges, addFixture } from './add-frames-fixture.js';
import { frameBytes, parseLine, payloadOf } from './golden-fixture.js';

const KEY_TYPES = ['ssh-ed25519', 'ssh-rsa', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521'] as const;
const pairs = addExchanges();
const SUCCESS = frame(encodeResponse({ type: 'success' }));
const FAILURE = frame(encodeResponse({ type: 'failure' }));
const sshdHostKey = parseLine(addFixture.sshdHostKey).blob;

function only(client: string, keyType: string | null) {
  const found = pairs.filter((p) => p.request.client === client && p.request.keyType === keyType);
  expect(found, `${client} [${keyType}]`).toHaveLength(1);
  return found[0]!;
}

function parseAdd(client: string, keyType: string): AddIdentityRequest {
  const request = parseRequest(payloadOf(only(client, keyType).request));
  expect(request.type).toBe('add-identity');
  return request as AddIdentityRequest;
}

const firstHop = (): DestinationConstraint => ({
  from: { user: null, hostname: null, hostKeys: [] },
  to: { user: null, hostname: addFixture.destHost, hostKeys: [{ keyBlob: sshdHostKey, isCa: false }] },
});

describe('agent-add-frames.json fixture', () => {
  it('was captured from OpenSSH and holds every operation asked for', () => {
    expect(addFixture.opensshVersion).toMatch(/^OpenSSH_/);
    const clients = new Set(pairs.map((p) => p.request.client));
    for (const client of ['ssh-add KEY', 'ssh-add -c KEY', 'ssh-add -t 60 KEY', 'ssh-add -h DEST KEY', 'ssh-add -d KEY', 'ssh-add -D', 'ssh-add -x', 'ssh-add -X']) {
      expect(clients).toContain(client);
    }
    expect(Object.keys(addFixture.keys).sort()).toEqual([...KEY_TYPES].sort());
  });

  it('the fingerprints recorded are those ssh-keygen -lf prints for the public keys', () => {
    const dir = mkdtempSync(join(tmpdir(), 'keyhold-addfp-'));
    try {
      for (const keyType of KEY_TYPES) {
        const file = join(dir, `${keyType}.pub`);
        writeFileSync(file, `${addFixture.keys[keyType]!.publicKey}\n`);
        const printed = execFileSync('ssh-keygen', ['-lf', file], { encoding: 'utf8' }).split(/\s+/)[1];
        expect(printed).toBe(addFixture.keys[keyType]!.fingerprint);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.each(KEY_TYPES)('ssh-add of a %s key', (keyType) => {
  const expected = addFixture.keys[keyType]!;
  const publicBlob = parseLine(expected.publicKey).blob;

  it('ssh-add KEY: the key (fingerprint as ssh-keygen -lf), its comment, no constraints', () => {
    const add = parseAdd('ssh-add KEY', keyType);
    expect(add.constrained).toBe(false);
    expect(add.key.type).toBe(keyType);
    expect(add.key.fingerprint).toBe(expected.fingerprint);
    expect(add.key.publicBlob.equals(publicBlob)).toBe(true);
    expect(add.comment).toBe(expected.comment);
    expect(add.constraints).toEqual({ lifetimeSeconds: null, confirm: false, destinations: [] });
  });

  it('the private KeyObject signs what the public blob verifies', () => {
    const add = parseAdd('ssh-add KEY', keyType);
    const data = Buffer.from(`keyhold add golden ${keyType}`);
    const algorithm = signatureAlgorithmFor(keyType as SshKeyType, SIGN_FLAG_RSA_SHA2_512);
    expect(verifySsh(publicBlob, signSsh(add.key.key, algorithm, data), data)).toBe(true);
    expect(verifySsh(publicBlob, signSsh(add.key.key, algorithm, data), Buffer.from('other data'))).toBe(false);
  });

  it('ssh-add -c KEY: confirm', () => {
    const add = parseAdd('ssh-add -c KEY', keyType);
    expect(add.constrained).toBe(true);
    expect(add.key.fingerprint).toBe(expected.fingerprint);
    expect(add.constraints).toEqual({ lifetimeSeconds: null, confirm: true, destinations: [] });
  });

  it('ssh-add -t 60 KEY: a lifetime of 60 s', () => {
    const add = parseAdd('ssh-add -t 60 KEY', keyType);
    expect(add.key.fingerprint).toBe(expected.fingerprint);
    expect(add.constraints).toEqual({ lifetimeSeconds: 60, confirm: false, destinations: [] });
  });

  it('ssh-add -h DEST KEY: one hop from here to the sshd, named with its host key', () => {
    const add = parseAdd('ssh-add -h DEST KEY', keyType);
    expect(add.key.fingerprint).toBe(expected.fingerprint);
    expect(add.constraints).toEqual({ lifetimeSeconds: null, confirm: false, destinations: [firstHop()] });
  });

  it('ssh-add -d KEY: the public blob', () => {
    const request = parseRequest(payloadOf(only('ssh-add -d KEY', keyType).request));
    expect(request.type).toBe('remove-identity');
    const { keyBlob } = request as { keyBlob: Buffer };
    expect(keyBlob.equals(publicBlob)).toBe(true);
    expect(fingerprint(keyBlob)).toBe(expected.fingerprint);
  });

  it.each(['ssh-add KEY', 'ssh-add -c KEY', 'ssh-add -t 60 KEY', 'ssh-add -h DEST KEY', 'ssh-add -d KEY'])(
    '%s: our encoder writes the same request, and the agent answered SUCCESS as we do',
    (client) => {
      const { request, response } = only(client, keyType);
      const payload = payloadOf(request);
      expect(encodeRequest(parseRequest(payload)).equals(payload)).toBe(true);
      expect(frameBytes(response).equals(SUCCESS)).toBe(true);
    },
  );
});

describe('ssh-add with two destination constraints', () => {
  it('-h DEST -h "DEST>git@JUMP": the first hop, then DEST to git@JUMP with its host key and its CA', () => {
    const add = parseAdd('ssh-add -h DEST -h DEST>git@JUMP KEY', 'ssh-ed25519');
    expect(add.key.fingerprint).toBe(addFixture.keys['ssh-ed25519']!.fingerprint);
    expect(add.constraints.destinations).toEqual([
      firstHop(),
      {
        from: { user: null, hostname: addFixture.destHost, hostKeys: [{ keyBlob: sshdHostKey, isCa: false }] },
        to: {
          user: 'git',
          hostname: addFixture.jumpHost,
          hostKeys: [
            { keyBlob: parseLine(addFixture.jumpHostKey).blob, isCa: false },
            { keyBlob: parseLine(addFixture.hostCaKey).blob, isCa: true },
          ],
        },
      },
    ]);
    const payload = payloadOf(only('ssh-add -h DEST -h DEST>git@JUMP KEY', 'ssh-ed25519').request);
    expect(encodeRequest(parseRequest(payload)).equals(payload)).toBe(true);
  });
});

describe('certificates', () => {
  const certified = addFixture.certifiedKeys;

  it('ssh-add KEY with KEY-cert.pub, each key type: the plain key, then its certificate (cert type, cert blob, the private fields it does not hold)', () => {
    for (const keyType of KEY_TYPES) {
      const exchanges = pairs.filter((p) => p.request.client === 'ssh-add KEY (with KEY-cert.pub)' && p.request.keyType === keyType);
      expect(exchanges, keyType).toHaveLength(2);
      const plainBlob = parseLine(certified[keyType]!.publicKey).blob;
      const certificateBlob = parseLine(certified[keyType]!.certificate).blob;
      const plain = parseRequest(payloadOf(exchanges[0]!.request)) as AddIdentityRequest;
      expect(plain.key.publicBlob.equals(plainBlob)).toBe(true);
      expect(plain.key.certificate).toBeUndefined();
      const payload = payloadOf(exchanges[1]!.request);
      const cert = parseRequest(payload) as AddIdentityRequest;
      expect(cert.type).toBe('add-identity');
      expect(cert.constrained).toBe(false);
      expect(cert.key.type).toBe(keyType);
      expect(cert.key.publicBlob.equals(plainBlob)).toBe(true);
      expect(cert.key.fingerprint).toBe(fingerprint(plainBlob));
      expect(cert.key.certificate!.blob.equals(certificateBlob)).toBe(true);
      expect(cert.key.certificate!.keyId).toMatch(/^keyhold-fixture/);
      expect(cert.key.certificate!.principals).toEqual(['fixture']);
      expect(cert.comment).toBe(plain.comment);
      // The key it carries signs what the certified key verifies.
      const data = Buffer.from('certified');
      const algorithm = signatureAlgorithmFor(keyType, SIGN_FLAG_RSA_SHA2_512);
      expect(verifySsh(plainBlob, signSsh(cert.key.key, algorithm, data), data)).toBe(true);
      expect(encodeRequest(cert).equals(payload), `${keyType} re-encodes to the same bytes`).toBe(true);
      expect(frameBytes(exchanges[1]!.response).equals(SUCCESS)).toBe(true);
    }
  });

  it('ssh-add -c with a certificate: both adds constrained, confirm', () => {
    const exchanges = pairs.filter((p) => p.request.client === 'ssh-add -c KEY (with KEY-cert.pub)');
    expect(exchanges).toHaveLength(2);
    const [plain, cert] = exchanges.map((p) => parseRequest(payloadOf(p.request)) as AddIdentityRequest);
    expect(plain!.constraints.confirm && cert!.constraints.confirm && cert!.constrained).toBe(true);
    expect(cert!.key.certificate!.blob.equals(parseLine(certified['ssh-ed25519']!.certificate).blob)).toBe(true);
  });

  it('a certificate with another private key, under another type name, or with a forged CA signature: refused', () => {
    const payload = payloadOf(pairs.filter((p) => p.request.client === 'ssh-add KEY (with KEY-cert.pub)' && p.request.keyType === 'ssh-ed25519')[1]!.request);
    const good = parseRequest(payload) as AddIdentityRequest;
    const other = parseRequest(payloadOf(only('ssh-add KEY', 'ssh-ed25519').request)) as AddIdentityRequest;
    const wrongKey = encodeRequest({ ...good, key: { ...other.key, certificate: good.key.certificate! } });
    expect(() => parseRequest(wrongKey)).toThrow(/does not match its certificate/);
    // The ed25519 certificate named as an ECDSA certificate.
    const certBlob = good.key.certificate!.blob;
    const renamed = Buffer.concat([Buffer.of(17), sshStr('ecdsa-sha2-nistp256-cert-v01@openssh.com'), sshStr(certBlob), Buffer.alloc(8)]);
    expect(() => parseRequest(renamed)).toThrow(/type does not match/);
    // A byte of the key id changed: the structure holds, the CA signature does not.
    const forged = Buffer.from(payload);
    const at = forged.indexOf(Buffer.from('keyhold-fixture'));
    forged[at] = forged[at]! ^ 0x01;
    expect(() => parseRequest(forged)).toThrow(/signature does not verify/);
  });
});

function sshStr(value: string | Buffer): Buffer {
  const bytes = typeof value === 'string' ? Buffer.from(value) : value;
  const length = Buffer.alloc(4);
  length.writeUInt32BE(bytes.length);
  return Buffer.concat([length, bytes]);
}

describe('remove all, lock, unlock', () => {
  it('ssh-add -D: REMOVE_ALL_IDENTITIES (19), then the protocol-1 message (9) this agent does not model', () => {
    const exchanges = pairs.filter((p) => p.request.client === 'ssh-add -D');
    expect(exchanges.map((p) => parseRequest(payloadOf(p.request)))).toEqual([{ type: 'remove-all-identities' }, { type: 'unsupported', code: 9 }]);
    expect(frameBytes(exchanges[0]!.response).equals(SUCCESS)).toBe(true);
  });

  it('a removal of a key the agent does not hold: FAILURE, the frame we send', () => {
    const { request, response } = only('ssh-add -d KEY (not in the agent)', 'ssh-ed25519');
    expect(parseRequest(payloadOf(request)).type).toBe('remove-identity');
    expect(frameBytes(response).equals(FAILURE)).toBe(true);
  });

  it('ssh-add -x / -X: the password ssh-add read through SSH_ASKPASS; a wrong one answered FAILURE', () => {
    const lock = only('ssh-add -x', null);
    const unlock = only('ssh-add -X', null);
    const wrong = only('ssh-add -X (wrong password)', null);
    expect(parseRequest(payloadOf(lock.request))).toEqual({ type: 'lock', passphrase: Buffer.from(addFixture.lockPassword) });
    expect(parseRequest(payloadOf(unlock.request))).toEqual({ type: 'unlock', passphrase: Buffer.from(addFixture.lockPassword) });
    expect(parseRequest(payloadOf(wrong.request))).toEqual({ type: 'unlock', passphrase: Buffer.from(addFixture.wrongPassword) });
    for (const { request } of [lock, unlock, wrong]) {
      const payload = payloadOf(request);
      expect(encodeRequest(parseRequest(payload)).equals(payload)).toBe(true);
    }
    expect(frameBytes(lock.response).equals(SUCCESS)).toBe(true);
    expect(frameBytes(unlock.response).equals(SUCCESS)).toBe(true);
    expect(frameBytes(wrong.response).equals(FAILURE)).toBe(true);
  });
});
