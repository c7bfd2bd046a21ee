// OpenSSH certificates through real tools against a real `keyhold serve`, as OpenSSH's regress
// agent.sh and agent-restrict.sh use them: ssh-add KEY with KEY-cert.pub adds both, ssh-add -L
// lists both, a login with -oCertificateFile to a real sshd trusting the CA (cert-authority,
// principals=) works and its audit line names the certificate, the four removal forms (cert alone,
// key alone, both, all), a restart keeps them, a session-bind from ssh to an sshd with a
// HostCertificate is accepted and the audit line names the host certificate, and malformed
// certificate adds get FAILURE while the daemon serves on.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { appendFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initVault, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, waitFor, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { frame, identitiesFrame, parseIdentities, RawConn, sshString } from '../helpers/raw-wire.js';
import { generateKeyPair, type KeyPair } from '../helpers/ssh-agent.js';
import { startSshd, stopAllSshd, type SshdHandle } from '../helpers/sshd.js';
import { auditLines } from '../helpers/audit.js';
import { lineBlob, signCertificate, type MadeCertificate } from '../helpers/certificates.js';

interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(command: string, args: string[], options: { env?: NodeJS.ProcessEnv; input?: string } = {}, timeoutMs = 20_000): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: { ...process.env, ...options.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdin.end(options.input ?? '');
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

const PRINCIPAL = 'keyhold-cert-login';
let k: KeyholdEnv;
let serve: ServeHandle;
let work: string;
let sshd: SshdHandle;
let hostSshd: SshdHandle;
let userCa: KeyPair;
let rsaCa: KeyPair;
let hostCa: KeyPair;
const keys: Record<string, KeyPair> = {};
const certs: Record<string, MadeCertificate> = {};

const agentEnv = () => ({ SSH_AUTH_SOCK: serve.socket('web'), SSH_ASKPASS: '', DISPLAY: '' });
const sshAdd = (args: string[], input?: string) => run('ssh-add', args, { env: agentEnv(), ...(input !== undefined ? { input } : {}) });
const daemonLog = () => `\n--- keyhold serve stderr (tail) ---\n${serve.stderr().slice(-3000)}`;

/** `ssh-add -L` as key type and base64 pairs (comments aside). */
async function listedBlobs(): Promise<string[]> {
  const listed = await sshAdd(['-L']);
  if (listed.code === 1) return [];
  expect(listed.code, listed.stderr + daemonLog()).toBe(0);
  return listed.stdout.trim().split('\n').map((line) => line.split(/\s+/).slice(0, 2).join(' '));
}
const plainOf = (key: KeyPair) => key.pubLine.split(/\s+/).slice(0, 2).join(' ');
const certOf = (cert: MadeCertificate) => cert.line.split(/\s+/).slice(0, 2).join(' ');

interface ListedKey {
  fingerprint: string;
  scopes: string[];
  certificates: { scope: string; key_id: string; serial: string; principals: string[]; expired: boolean; kind: string }[];
}
const listedKeys = (): ListedKey[] => JSON.parse(keyholdOk(k, ['key', 'list', '--json'])) as ListedKey[];

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-certs-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-certs-work-'));
  initVault(k);
  keyholdOk(k, ['key', 'generate', 'web', '--comment', 'web-generated']);
  userCa = generateKeyPair(work, 'user_ca', 'ed25519');
  rsaCa = generateKeyPair(work, 'user_ca_rsa', 'rsa', 2048);
  hostCa = generateKeyPair(work, 'host_ca', 'ecdsa', 256);
  keys.ed25519 = generateKeyPair(work, 'id_ed25519', 'ed25519');
  keys.ecdsa = generateKeyPair(work, 'id_ecdsa', 'ecdsa', 384);
  keys.rsa = generateKeyPair(work, 'id_rsa', 'rsa', 3072);
  certs.ed25519 = signCertificate(userCa.path, keys.ed25519.pubPath, { keyId: 'cert-ed25519', principals: [PRINCIPAL], serial: 11 });
  certs.ecdsa = signCertificate(userCa.path, keys.ecdsa.pubPath, { keyId: 'cert-ecdsa', principals: [PRINCIPAL], serial: 12 });
  certs.rsa = signCertificate(rsaCa.path, keys.rsa.pubPath, { keyId: 'cert-rsa', principals: [PRINCIPAL], serial: 13 });
  const trust = [`cert-authority,principals="${PRINCIPAL}" ${userCa.pubLine}`, `cert-authority,principals="${PRINCIPAL}" ${rsaCa.pubLine}`];
  sshd = await startSshd({ authorizedKeys: trust });
  // A second sshd whose host key (ECDSA) has a host certificate from hostCa.
  const hostKey = generateKeyPair(work, 'ssh_host_ecdsa_key', 'ecdsa', 256);
  keys.host = hostKey;
  const hostCert = signCertificate(hostCa.path, hostKey.pubPath, { keyId: 'host-cert-of-127.0.0.1', principals: ['127.0.0.1'], host: true, serial: 99 });
  hostSshd = await startSshd({ authorizedKeys: trust, extraConfig: [`HostKey ${hostKey.path}`, `HostCertificate ${hostCert.path}`] });
  // Debug: the daemon logs each session it binds (the session-bind check below reads it).
  serve = await startServe(k, [], { KEYHOLD_LOG_LEVEL: 'debug' });
}, 90_000);

afterAll(async () => {
  await stopAllServes();
  await stopAllSshd();
  rmSync(work, { recursive: true, force: true });
  k.cleanup();
});

describe('ssh-add and certificates', () => {
  it('ssh-add KEY with KEY-cert.pub adds both, for ed25519, ECDSA and RSA (RSA CA): ssh-add -L lists both, key list shows the certificates', async () => {
    for (const kind of ['ed25519', 'ecdsa', 'rsa']) {
      const added = await sshAdd([keys[kind]!.path]);
      expect(added.code, added.stderr + daemonLog()).toBe(0);
      expect(added.stderr).toContain('Certificate added');
    }
    const listed = await listedBlobs();
    for (const kind of ['ed25519', 'ecdsa', 'rsa']) {
      expect(listed).toContain(plainOf(keys[kind]!));
      expect(listed).toContain(certOf(certs[kind]!));
    }
    expect(listed.some((line) => line.startsWith('ssh-ed25519-cert-v01@openssh.com '))).toBe(true);
    const ed = listedKeys().find((key) => key.fingerprint === keys.ed25519!.fingerprint)!;
    expect(ed.scopes).toEqual(['web']);
    expect(ed.certificates).toMatchObject([{ scope: 'web', kind: 'user', key_id: 'cert-ed25519', serial: '11', principals: [PRINCIPAL], expired: false }]);
    const table = keyholdOk(k, ['key', 'list']);
    expect(table).toContain(`${keys.rsa!.fingerprint} in web: user certificate "cert-rsa" serial 13 for ${PRINCIPAL}`);
    expect(auditLines(k).some((line) => line.includes('"certificate-added"') && line.includes('"key_id":"cert-ecdsa"'))).toBe(true);
    // audit tail names the certificate too, as sshd's log does: key id and serial.
    expect(keyholdOk(k, ['audit', 'tail', '-n', '50'])).toMatch(/ certificate-added scope=web SHA256:\S+ cert="cert-ecdsa" serial 12/);
  }, 60_000);

  it('a login with -oCertificateFile to an sshd trusting the CA (cert-authority,principals=) works (ssh signs with the plain key beside it)', async () => {
    for (const kind of ['ed25519', 'ecdsa', 'rsa']) {
      const login = await run('ssh', [...sshd.sshArgs([`-oCertificateFile=${certs[kind]!.path}`, '-oIdentitiesOnly=yes', '-i', keys[kind]!.pubPath]), 'echo', 'cert-login-ok'], { env: agentEnv() });
      expect(login.stdout + login.stderr + daemonLog(), kind).toContain('cert-login-ok');
    }
  }, 60_000);

  it('with the certificates alone in the agent, ssh signs with the certificate blob: the login works and the audit line names the certificate', async () => {
    const kinds = ['ed25519', 'ecdsa', 'rsa'];
    for (const kind of kinds) expect((await sshAdd(['-qdk', keys[kind]!.path])).code).toBe(0);
    for (const kind of kinds) {
      const before = auditLines(k).length;
      const login = await run('ssh', [...sshd.sshArgs(['-oIdentitiesOnly=yes', '-i', certs[kind]!.path]), 'echo', 'cert-only-login-ok'], { env: agentEnv() });
      expect(login.stdout + login.stderr + daemonLog(), kind).toContain('cert-only-login-ok');
      const signed = auditLines(k).slice(before).filter((line) => line.includes('"event":"sign"'));
      expect(signed.length, kind).toBe(1);
      // Policy facts and the audit fingerprint are the certified key's; the line says it was the certificate.
      expect(signed[0]).toContain(`"fingerprint":"${keys[kind]!.fingerprint}"`);
      expect(signed[0]).toContain(`"certificate":{"key_id":"cert-${kind}","serial":"${kind === 'ed25519' ? 11 : kind === 'ecdsa' ? 12 : 13}"}`);
      if (kind === 'rsa') expect(signed[0]).toMatch(/"algorithm":"rsa-sha2-(256|512)"/);
    }
    for (const kind of kinds) expect((await sshAdd([keys[kind]!.path])).code).toBe(0);
  }, 60_000);

  it('the removal forms of agent.sh: the cert alone (-d - < KEY-cert.pub), the key alone (-qdk), both (-qd), all (-D); the key stays in the vault', async () => {
    const ed = keys.ed25519!;
    const cert = certs.ed25519!;
    let removed = await sshAdd(['-d', '-'], readFileSync(cert.path, 'utf8'));
    expect(removed.code, removed.stderr + daemonLog()).toBe(0);
    let listed = await listedBlobs();
    expect(listed).toContain(plainOf(ed));
    expect(listed).not.toContain(certOf(cert));

    expect((await sshAdd([ed.path])).code).toBe(0);
    removed = await sshAdd(['-qdk', ed.path]);
    expect(removed.code, removed.stderr + daemonLog()).toBe(0);
    listed = await listedBlobs();
    expect(listed).not.toContain(plainOf(ed));
    expect(listed).toContain(certOf(cert));

    expect((await sshAdd([ed.path])).code).toBe(0);
    removed = await sshAdd(['-qd', ed.path]);
    expect(removed.code, removed.stderr + daemonLog()).toBe(0);
    listed = await listedBlobs();
    expect(listed).not.toContain(plainOf(ed));
    expect(listed).not.toContain(certOf(cert));
    // The others are untouched.
    expect(listed).toContain(certOf(certs.ecdsa!));

    expect((await sshAdd([ed.path])).code).toBe(0);
    removed = await sshAdd(['-D']);
    expect(removed.code, removed.stderr + daemonLog()).toBe(0);
    expect(await listedBlobs()).toEqual([]);
    // Still in the vault, with no scope and no certificate.
    const stored = listedKeys().find((key) => key.fingerprint === ed.fingerprint)!;
    expect(stored).toMatchObject({ scopes: [], certificates: [] });
  }, 60_000);

  it('a restart keeps certificates; keyhold key rm deletes a key with its certificates', async () => {
    for (const kind of ['ed25519', 'ecdsa']) expect((await sshAdd([keys[kind]!.path])).code).toBe(0);
    await serve.stop();
    serve = await startServe(k, [], { KEYHOLD_LOG_LEVEL: 'debug' });
    const listed = await listedBlobs();
    expect(listed).toContain(certOf(certs.ed25519!));
    expect(listed).toContain(certOf(certs.ecdsa!));
    keyholdOk(k, ['key', 'rm', keys.ecdsa!.fingerprint]);
    await waitFor(() => true, 10);
    const after = await listedBlobs();
    expect(after).not.toContain(certOf(certs.ecdsa!));
    expect(after).not.toContain(plainOf(keys.ecdsa!));
    expect(after).toContain(certOf(certs.ed25519!));
  }, 60_000);
});

describe('host certificates in session-bind@openssh.com', () => {
  it('ssh to an sshd with a HostCertificate (known_hosts: @cert-authority): the session-bind is accepted, the audit names the host certificate and the certified host key', async () => {
    appendFileSync(hostSshd.knownHostsFile, `@cert-authority [127.0.0.1]:${hostSshd.port} ${hostCa.pubLine}\n`);
    const before = auditLines(k).length;
    const login = await run(
      'ssh',
      [
        ...hostSshd.sshArgs(['-vv', '-oHostKeyAlgorithms=ecdsa-sha2-nistp256-cert-v01@openssh.com', `-oCertificateFile=${certs.ed25519!.path}`, '-oIdentitiesOnly=yes', '-i', keys.ed25519!.pubPath]),
        'echo',
        'host-cert-login-ok',
      ],
      { env: agentEnv() },
    );
    expect(login.stdout + login.stderr.slice(-3000) + daemonLog()).toContain('host-cert-login-ok');
    expect(login.stderr).toContain('Server host certificate');
    // ssh reports a refused bind at -vv ("ssh_agent_bind_hostkey: agent refused operation").
    expect(login.stderr).not.toMatch(/ssh_agent_bind_hostkey/);
    // The daemon bound the session to the certificate, verified with the certified key.
    await waitFor(() => serve.stderr().includes('"hostCertificate":{"keyId":"host-cert-of-127.0.0.1"'), 5000, `session bound to the host certificate${daemonLog()}`);
    const bound = serve.stderr().split('\n').find((line) => line.includes('"hostCertificate":{"keyId":"host-cert-of-127.0.0.1"'))!;
    expect(bound).toContain('"msg":"session bound"');
    expect(bound).toContain(`"hostKey":"${keys.host!.fingerprint}"`);
    const signed = auditLines(k).slice(before).filter((line) => line.includes('"event":"sign"'));
    expect(signed.length).toBeGreaterThan(0);
    expect(signed.at(-1)).toContain(`"host_key":"${keys.host!.fingerprint}"`);
    expect(signed.at(-1)).toContain('"host_certificate":{"key_id":"host-cert-of-127.0.0.1","serial":"99"');
  }, 60_000);
});

describe('malformed certificate adds', () => {
  it('a forged, a truncated and a mismatched certificate add: FAILURE each, the daemon serves on', async () => {
    const conn = await RawConn.open({ kind: 'unix', path: serve.socket('web') });
    conn.context = daemonLog;
    const cert = lineBlob(certs.ed25519!.line);
    const forged = Buffer.from(cert);
    const at = forged.indexOf(Buffer.from('cert-ed25519'));
    forged[at] = forged[at]! ^ 0x01;
    const certType = sshString('ssh-ed25519-cert-v01@openssh.com');
    // Private fields of another key: 32 + 64 bytes of nonsense (the certificate is checked first).
    const fakePrivate = Buffer.concat([sshString(Buffer.alloc(32, 1)), sshString(Buffer.alloc(64, 2))]);
    const frames = [
      frame(Buffer.concat([Buffer.of(17), certType, sshString(forged), fakePrivate, sshString('forged')])),
      frame(Buffer.concat([Buffer.of(17), certType, sshString(cert.subarray(0, cert.length - 9)), fakePrivate, sshString('cut')])),
      frame(Buffer.concat([Buffer.of(17), certType, sshString(cert), fakePrivate, sshString('mismatch')])),
      frame(Buffer.concat([Buffer.of(17), certType, sshString(Buffer.alloc(3000, 0xff))])),
    ];
    conn.socket.write(Buffer.concat([...frames, identitiesFrame()]));
    for (let i = 0; i < frames.length; i++) expect((await conn.reply())[0], `frame ${i}`).toBe(5);
    const identities = parseIdentities(await conn.reply());
    expect(identities.some((identity) => identity.blob.equals(cert))).toBe(true);
    conn.socket.destroy();
    expect(serve.proc.exitCode).toBeNull();
  });
});
