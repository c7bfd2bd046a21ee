// `keyhold key import`: the usual private key formats, encrypted ones, and what is refused.
// Fingerprints are checked against ssh-keygen's own reading of the source file.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { createHash, createPublicKey } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initVault, keyhold, keyholdOk, makeKeyholdEnv, type KeyholdEnv, type RunResult } from '../helpers/keyhold.js';

let k: KeyholdEnv;
let src: string;
const KEY_PASS = 'correct horse key pass';

function run(cmd: string, args: string[], input?: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input: input ?? '', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

/** ssh-keygen's SHA256 fingerprint of a key file (via its public line when -l cannot read it). */
function sshKeygenFingerprint(path: string): string {
  const direct = spawnSync('ssh-keygen', ['-l', '-E', 'sha256', '-f', path], { encoding: 'utf8' });
  let line = direct.status === 0 ? direct.stdout : '';
  if (!line) {
    const pub = run('ssh-keygen', ['-y', '-P', '', '-f', path]);
    const pubFile = `${path}.derived.pub`;
    writeFileSync(pubFile, pub);
    line = run('ssh-keygen', ['-l', '-E', 'sha256', '-f', pubFile]);
  }
  const fp = line.split(' ')[1]!;
  expect(fp).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
  return fp;
}

/** OpenSSH-style fingerprint of an ed25519 PEM key computed from its raw public key (ssh-keygen 9.2 cannot read PKCS#8 ed25519). */
function ed25519Fingerprint(pemPath: string): string {
  const jwk = createPublicKey(readFileSync(pemPath)).export({ format: 'jwk' });
  const str = (b: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, b.length]), b]);
  const blob = Buffer.concat([str(Buffer.from('ssh-ed25519')), str(Buffer.from(jwk.x!, 'base64url'))]);
  return 'SHA256:' + createHash('sha256').update(blob).digest('base64').replace(/=+$/, '');
}

interface KeyJson {
  fingerprint: string;
  type: string;
  bits: number;
  comment: string;
  scopes: string[];
  created?: boolean;
}

const listKeys = () => JSON.parse(keyholdOk(k, ['key', 'list', '--json'])) as KeyJson[];

function importOk(scope: string, file: string, extra: string[] = []): KeyJson {
  const r = keyhold(k, ['key', 'import', scope, file, '--json', ...extra]);
  if (r.status !== 0) throw new Error(`import ${file} exited ${r.status}: ${r.stderr}`);
  return JSON.parse(r.stdout) as KeyJson;
}

function expectRefused(r: RunResult, code: number, pattern?: RegExp): void {
  expect(r.status, r.stderr).toBe(code);
  expect(r.stdout).toBe('');
  expect(r.stderr).toMatch(/^keyhold: .+ \(.+\)\n$/);
  expect(r.stderr).not.toMatch(/^\s+at /m);
  if (pattern) expect(r.stderr).toMatch(pattern);
}

beforeAll(() => {
  k = makeKeyholdEnv('keyhold-cli-import-');
  initVault(k);
  src = mkdtempSync(join(tmpdir(), 'keyhold-import-src-'));
  writeFileSync(join(src, 'kpass'), KEY_PASS + '\n', { mode: 0o600 });
  writeFileSync(join(src, 'wrongpass'), 'not the key pass\n', { mode: 0o600 });
});

afterAll(() => {
  k?.cleanup();
  if (src) rmSync(src, { recursive: true, force: true });
});

describe('key import: formats', () => {
  it('OpenSSH ed25519 encrypted (ssh-keygen -N) with --key-passphrase-file: imported, comment kept, fingerprint = ssh-keygen -l', () => {
    const file = join(src, 'id_ed25519_enc');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', KEY_PASS, '-C', 'laptop key of alice', '-f', file]);
    const key = importOk('web', file, ['--key-passphrase-file', join(src, 'kpass')]);
    expect(key.fingerprint).toBe(sshKeygenFingerprint(file));
    expect(key).toMatchObject({ type: 'ed25519', bits: 256, comment: 'laptop key of alice', scopes: ['web'], created: true });
    // the public line printed without --json is ssh-keygen's public key
    const pub = readFileSync(`${file}.pub`, 'utf8').split(' ')[1];
    expect(keyholdOk(k, ['key', 'pub', 'web'])).toContain(pub);
  });

  it('OpenSSH encrypted with a wrong key passphrase → 4, nothing imported', () => {
    const file = join(src, 'id_wrong');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', KEY_PASS, '-C', 'never-imported', '-f', file]);
    const before = listKeys();
    expectRefused(keyhold(k, ['key', 'import', 'web', file, '--key-passphrase-file', join(src, 'wrongpass')]), 4, /passphrase/);
    expect(listKeys()).toEqual(before);
  });

  it('OpenSSH encrypted without a passphrase and no TTY → 2 with a hint naming --key-passphrase-file', () => {
    const file = join(src, 'id_nopass_given');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', KEY_PASS, '-f', file]);
    const before = listKeys();
    expectRefused(keyhold(k, ['key', 'import', 'web', file]), 2, /--key-passphrase-file/);
    expect(listKeys()).toEqual(before);
  });

  it('OpenSSH (unencrypted) rsa and ecdsa import with ssh-keygen fingerprints and --comment override', () => {
    const rsa = join(src, 'id_rsa_openssh');
    run('ssh-keygen', ['-q', '-t', 'rsa', '-b', '2048', '-N', '', '-C', 'rsa-openssh', '-f', rsa]);
    const r = importOk('web', rsa);
    expect(r).toMatchObject({ type: 'rsa', bits: 2048, comment: 'rsa-openssh', fingerprint: sshKeygenFingerprint(rsa) });
    const ec = join(src, 'id_ecdsa_openssh');
    run('ssh-keygen', ['-q', '-t', 'ecdsa', '-b', '521', '-N', '', '-C', 'file-comment', '-f', ec]);
    const e = importOk('web', ec, ['--comment', 'override comment']);
    expect(e).toMatchObject({ type: 'ecdsa', bits: 521, comment: 'override comment', fingerprint: sshKeygenFingerprint(ec) });
  });

  it('PEM PKCS#1 RSA (ssh-keygen -m PEM -t rsa)', () => {
    const file = join(src, 'rsa_pkcs1.pem');
    run('ssh-keygen', ['-q', '-m', 'PEM', '-t', 'rsa', '-b', '2048', '-N', '', '-f', file]);
    expect(readFileSync(file, 'utf8')).toMatch(/^-----BEGIN RSA PRIVATE KEY-----/);
    const key = importOk('pem', file);
    expect(key).toMatchObject({ type: 'rsa', bits: 2048, fingerprint: sshKeygenFingerprint(file) });
    expect(key.comment).toBe('rsa_pkcs1.pem'); // no comment in the file: its name
  });

  it('SEC1 EC (openssl ecparam -genkey), with and without the EC PARAMETERS block', () => {
    const withParams = join(src, 'ec_params.pem');
    run('openssl', ['ecparam', '-genkey', '-name', 'secp384r1', '-out', withParams]);
    expect(readFileSync(withParams, 'utf8')).toMatch(/BEGIN EC PARAMETERS[\s\S]*BEGIN EC PRIVATE KEY/);
    expect(importOk('pem', withParams)).toMatchObject({ type: 'ecdsa', bits: 384, fingerprint: sshKeygenFingerprint(withParams) });
    const bare = join(src, 'ec_bare.pem');
    run('openssl', ['ecparam', '-genkey', '-noout', '-name', 'prime256v1', '-out', bare]);
    expect(importOk('pem', bare)).toMatchObject({ type: 'ecdsa', bits: 256, fingerprint: sshKeygenFingerprint(bare) });
  });

  it('PKCS#8 ed25519 (openssl genpkey -algorithm ed25519) and PKCS#8 RSA', () => {
    const ed = join(src, 'ed_pkcs8.pem');
    run('openssl', ['genpkey', '-algorithm', 'ed25519', '-out', ed]);
    expect(readFileSync(ed, 'utf8')).toMatch(/^-----BEGIN PRIVATE KEY-----/);
    expect(importOk('pem', ed)).toMatchObject({ type: 'ed25519', bits: 256, fingerprint: ed25519Fingerprint(ed) });
    const rsa = join(src, 'rsa_pkcs8.pem');
    run('openssl', ['genpkey', '-algorithm', 'rsa', '-pkeyopt', 'rsa_keygen_bits:2048', '-out', rsa]);
    expect(importOk('pem', rsa)).toMatchObject({ type: 'rsa', bits: 2048, fingerprint: sshKeygenFingerprint(rsa) });
  });

  it('DER PKCS#8', () => {
    const pem = join(src, 'for_der.pem');
    run('openssl', ['ecparam', '-genkey', '-noout', '-name', 'prime256v1', '-out', pem]);
    const der = join(src, 'key.der');
    run('openssl', ['pkcs8', '-topk8', '-nocrypt', '-in', pem, '-outform', 'DER', '-out', der]);
    expect(importOk('pem', der)).toMatchObject({ type: 'ecdsa', fingerprint: sshKeygenFingerprint(pem) });
  });

  it('encrypted PKCS#8 (openssl pkcs8 -topk8 -v2 aes-256-cbc) with --key-passphrase-file', () => {
    const plain = join(src, 'p8_plain.pem');
    run('openssl', ['genpkey', '-algorithm', 'ed25519', '-out', plain]);
    const enc = join(src, 'p8_enc.pem');
    run('openssl', ['pkcs8', '-topk8', '-v2', 'aes-256-cbc', '-in', plain, '-out', enc, '-passout', `file:${join(src, 'kpass')}`]);
    expect(readFileSync(enc, 'utf8')).toMatch(/^-----BEGIN ENCRYPTED PRIVATE KEY-----/);
    const before = listKeys();
    expectRefused(keyhold(k, ['key', 'import', 'enc', enc, '--key-passphrase-file', join(src, 'wrongpass')]), 4, /passphrase/);
    expect(listKeys()).toEqual(before);
    const key = importOk('enc', enc, ['--key-passphrase-file', join(src, 'kpass')]);
    expect(key.fingerprint).toBe(ed25519Fingerprint(plain));

    // an encrypted RSA PKCS#8 too, checked against ssh-keygen
    const rsaPlain = join(src, 'p8_rsa_plain.pem');
    run('openssl', ['genpkey', '-algorithm', 'rsa', '-pkeyopt', 'rsa_keygen_bits:2048', '-out', rsaPlain]);
    const rsaEnc = join(src, 'p8_rsa_enc.pem');
    run('openssl', ['pkcs8', '-topk8', '-v2', 'aes-256-cbc', '-in', rsaPlain, '-out', rsaEnc, '-passout', `file:${join(src, 'kpass')}`]);
    expect(importOk('enc', rsaEnc, ['--key-passphrase-file', join(src, 'kpass')]).fingerprint).toBe(sshKeygenFingerprint(rsaPlain));
  });

  it('encrypted PKCS#8 without a passphrase and no TTY → 2 "encrypted" with a hint, like OpenSSH files', () => {
    const plain = join(src, 'p8_plain2.pem');
    run('openssl', ['genpkey', '-algorithm', 'ed25519', '-out', plain]);
    const enc = join(src, 'p8_enc2.pem');
    run('openssl', ['pkcs8', '-topk8', '-v2', 'aes-256-cbc', '-in', plain, '-out', enc, '-passout', `file:${join(src, 'kpass')}`]);
    expectRefused(keyhold(k, ['key', 'import', 'enc', enc]), 2, /encrypted.*--key-passphrase-file/);
  });

  it('encrypted PEM PKCS#1 (ssh-keygen -m PEM -N): imports with the passphrase, 2 without one', () => {
    const file = join(src, 'rsa_pkcs1_enc.pem');
    run('ssh-keygen', ['-q', '-m', 'PEM', '-t', 'rsa', '-b', '2048', '-N', KEY_PASS, '-f', file]);
    expect(readFileSync(file, 'utf8')).toMatch(/Proc-Type: 4,ENCRYPTED/);
    const fp = sshKeygenFingerprint(`${file}.pub`);
    expectRefused(keyhold(k, ['key', 'import', 'enc', file, '--key-passphrase-file', join(src, 'wrongpass')]), 4);
    expect(importOk('enc', file, ['--key-passphrase-file', join(src, 'kpass')]).fingerprint).toBe(fp);
    expectRefused(keyhold(k, ['key', 'import', 'enc2', file]), 2, /encrypted.*--key-passphrase-file/);
  });

  it('--key-passphrase-file - reads the key passphrase from stdin', () => {
    const file = join(src, 'id_stdin');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', KEY_PASS, '-C', 'via-stdin', '-f', file]);
    const r = keyhold(k, ['key', 'import', 'stdin', file, '--key-passphrase-file', '-', '--json'], { input: KEY_PASS + '\n' });
    expect(r.status, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as KeyJson).comment).toBe('via-stdin');
  });
});

describe('key import: refusals', () => {
  it('an RSA 1024 key is refused and nothing is stored', () => {
    const file = join(src, 'rsa1024');
    run('ssh-keygen', ['-q', '-t', 'rsa', '-b', '1024', '-N', '', '-f', file]);
    const before = listKeys();
    const r = keyhold(k, ['key', 'import', 'web', file]);
    expect(r.status).not.toBe(0);
    expectRefused(r, r.status!, /1024/);
    expect(listKeys()).toEqual(before);
  });

  it('a public key file is refused (OpenSSH .pub and PEM PUBLIC KEY)', () => {
    const file = join(src, 'for_pub');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', file]);
    const before = listKeys();
    const r = keyhold(k, ['key', 'import', 'web', `${file}.pub`]);
    expect(r.status).not.toBe(0);
    expectRefused(r, r.status!, /public key/);
    const pem = join(src, 'pub.pem');
    run('openssl', ['genpkey', '-algorithm', 'ed25519', '-out', join(src, 'for_pub.pem')]);
    writeFileSync(pem, run('openssl', ['pkey', '-in', join(src, 'for_pub.pem'), '-pubout']));
    const r2 = keyhold(k, ['key', 'import', 'web', pem]);
    expect(r2.status).not.toBe(0);
    expectRefused(r2, r2.status!, /public key/);
    expect(listKeys()).toEqual(before);
  });

  it('garbage, an empty file and a truncated key are refused; a missing file → 5', () => {
    const before = listKeys();
    const garbage = join(src, 'garbage');
    writeFileSync(garbage, Buffer.from(Array.from({ length: 512 }, (_, i) => (i * 151 + 7) % 256)));
    const empty = join(src, 'empty');
    writeFileSync(empty, '');
    const truncSrc = join(src, 'for_trunc');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', truncSrc]);
    const truncated = join(src, 'truncated');
    const text = readFileSync(truncSrc, 'utf8');
    writeFileSync(truncated, text.slice(0, Math.floor(text.length / 2)) + '\n-----END OPENSSH PRIVATE KEY-----\n');
    for (const file of [garbage, empty, truncated]) {
      const r = keyhold(k, ['key', 'import', 'web', file]);
      expect(r.status, `${file}: ${r.stderr}`).not.toBe(0);
      expectRefused(r, r.status!);
    }
    expectRefused(keyhold(k, ['key', 'import', 'web', join(src, 'does-not-exist')]), 5);
    expect(listKeys()).toEqual(before);
  });

  it('a bad scope name is refused before anything is read', () => {
    expectRefused(keyhold(k, ['key', 'import', 'bad/scope', join(src, 'does-not-exist')]), 2);
  });
});

describe('key import: the same key twice', () => {
  it('importing a key the vault holds into another scope assigns it: one key, two scopes', () => {
    const file = join(src, 'id_twice');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'twice', '-f', file]);
    const first = importOk('alpha', file);
    expect(first.created).toBe(true);
    const second = keyhold(k, ['key', 'import', 'beta', file, '--comment', 'ignored-new-comment']);
    expect(second.status, second.stderr).toBe(0);
    expect(second.stderr).toContain(first.fingerprint);
    const secondJson = importOk('gamma', file);
    expect(secondJson.created).toBe(false);
    const matches = listKeys().filter((key) => key.fingerprint === first.fingerprint);
    expect(matches.length).toBe(1);
    expect(matches[0]!.scopes).toEqual(['alpha', 'beta', 'gamma']);
    expect(matches[0]!.comment).toBe('twice');
    // re-importing into a scope it already has changes nothing
    importOk('alpha', file);
    expect(listKeys().filter((key) => key.fingerprint === first.fingerprint)[0]!.scopes).toEqual(['alpha', 'beta', 'gamma']);
  });
});
