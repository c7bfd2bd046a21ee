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
import { UnsupportedKeyError } from '../../src/agent-protocol/private-key.js';
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
  const exchanges = pairs.filter((p) => p.request.client === 'ssh-add KEY (with KEY-cert.pub)');

  it('ssh-add sends the plain key, which parses, then its certificate, which is refused as unsupported', () => {
    expect(exchanges).toHaveLength(2);
    const plain = parseRequest(payloadOf(exchanges[0]!.request)) as AddIdentityRequest;
    expect(plain.key.publicBlob.equals(parseLine(addFixture.certifiedKey.publicKey).blob)).toBe(true);
    expect(() => parseRequest(payloadOf(exchanges[1]!.request))).toThrow(UnsupportedKeyError);
    expect(() => parseRequest(payloadOf(exchanges[1]!.request))).toThrow(/certificates are not supported/);
  });
});

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
