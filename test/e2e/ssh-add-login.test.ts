// The first acceptance item of OpenSSH's agent operations, end to end with OpenSSH's own tools:
// `ssh-add KEY` into scope web for ed25519, ecdsa-256, rsa-3072 and a passphrase-protected key
// whose passphrase ssh-add asks through SSH_ASKPASS; each is in `keyhold key list` for web,
// listed by `ssh-add -l`, logs in to a real sshd through the scope socket, and does so again
// after the daemon restarted.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initVault, keyholdOk, makeKeyholdEnv, startServe, stopAllServes, type KeyholdEnv, type ServeHandle } from '../helpers/keyhold.js';
import { run, startSshd, stopAllSshd, type SshdHandle } from '../helpers/sshd.js';

interface TestKey {
  name: string;
  path: string;
  publicLine: string;
  fingerprint: string;
}

let k: KeyholdEnv;
let serve: ServeHandle;
let sshd: SshdHandle;
let work: string;
const keys: TestKey[] = [];
const PASSPHRASE = 'correct horse battery staple';

function makeKey(name: string, type: string, bits: number | null, passphrase: string): TestKey {
  const path = join(work, name);
  execFileSync('ssh-keygen', ['-q', '-t', type, ...(bits ? ['-b', String(bits)] : []), '-N', passphrase, '-C', `login-${name}`, '-f', path], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const publicLine = readFileSync(`${path}.pub`, 'utf8').trim();
  const fingerprint = execFileSync('ssh-keygen', ['-l', '-f', `${path}.pub`], { encoding: 'utf8' }).split(' ')[1]!;
  return { name, path, publicLine, fingerprint };
}

const agentEnv = (extra: NodeJS.ProcessEnv = {}) => ({ ...process.env, SSH_AUTH_SOCK: serve.socket('web'), SSH_ASKPASS: '', DISPLAY: '', ...extra });
const daemonLog = () => `\n--- keyhold serve stderr (tail) ---\n${serve.stderr().slice(-2000)}`;

/** ssh with only the agent's key for this public key: a login proves that key signed. */
const login = (key: TestKey) =>
  run('ssh', [...sshd.sshArgs(['-o', 'IdentitiesOnly=yes', '-i', `${key.path}.pub`, '-o', 'IdentityAgent=SSH_AUTH_SOCK']), 'echo', `in-as-${key.name}`], {
    env: agentEnv(),
    timeoutMs: 20_000,
  });

beforeAll(async () => {
  k = makeKeyholdEnv('keyhold-ssh-add-login-');
  work = mkdtempSync(join(tmpdir(), 'keyhold-ssh-add-login-work-'));
  initVault(k);
  keys.push(makeKey('ed25519', 'ed25519', null, ''), makeKey('ecdsa256', 'ecdsa', 256, ''), makeKey('rsa3072', 'rsa', 3072, ''));
  keys.push(makeKey('encrypted', 'ed25519', null, PASSPHRASE));
  // The public halves only: the private files must not be what ssh uses.
  for (const key of keys) writeFileSync(`${key.path}.pub`, `${key.publicLine}\n`);
  sshd = await startSshd({ authorizedKeys: keys.map((key) => key.publicLine) });
  keyholdOk(k, ['key', 'generate', 'web', '--comment', 'so-web-exists']);
  serve = await startServe(k);
}, 60_000);

afterAll(async () => {
  await stopAllServes();
  await stopAllSshd();
  k?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('ssh-add KEY into a scope, then ssh logs in with it', () => {
  it('adds plain keys, and an encrypted key whose passphrase ssh-add asks through SSH_ASKPASS', async () => {
    for (const key of keys.slice(0, 3)) {
      const added = await run('ssh-add', [key.path], { env: agentEnv() });
      expect(added.code, `${key.name}: ${added.stderr}${daemonLog()}`).toBe(0);
    }
    const askpass = join(work, 'askpass');
    const asked = join(work, 'asked');
    // Records the prompt it was given, so the test knows ssh-add really asked.
    writeFileSync(askpass, `#!/bin/sh\nprintf '%s\\n' "$1" >> '${asked}'\nprintf '%s\\n' '${PASSPHRASE}'\n`);
    chmodSync(askpass, 0o700);
    const encrypted = keys[3]!;
    const added = await run('ssh-add', [encrypted.path], {
      env: agentEnv({ SSH_ASKPASS: askpass, SSH_ASKPASS_REQUIRE: 'force', DISPLAY: ':0' }),
    });
    expect(added.code, `${added.stderr}${daemonLog()}`).toBe(0);
    expect(readFileSync(asked, 'utf8')).toMatch(/passphrase/i);

    // A wrong passphrase, then none (ssh-add asks again after a wrong one; an empty answer ends
    // it): ssh-add gives up, nothing new is stored.
    const wrongAskpass = join(work, 'askpass-wrong');
    const tries = join(work, 'wrong-tries');
    writeFileSync(wrongAskpass, `#!/bin/sh\nif [ -e '${tries}' ]; then echo; else : > '${tries}'; echo wrong; fi\n`);
    chmodSync(wrongAskpass, 0o700);
    const other = makeKey('encrypted-other', 'ed25519', null, PASSPHRASE);
    const refused = await run('ssh-add', [other.path], { env: agentEnv({ SSH_ASKPASS: wrongAskpass, SSH_ASKPASS_REQUIRE: 'force', DISPLAY: ':0' }) });
    expect(refused.code).not.toBe(0);

    const web = JSON.parse(keyholdOk(k, ['key', 'list', '--json', '--scope', 'web'])) as { fingerprint: string; comment: string }[];
    for (const key of keys) {
      const entry = web.find((listed) => listed.fingerprint === key.fingerprint);
      expect(entry, `${key.name} in key list --scope web`).toBeDefined();
      expect(entry!.comment).toBe(`login-${key.name}`);
    }
    expect(web.some((listed) => listed.fingerprint === other.fingerprint)).toBe(false);
    const agentList = await run('ssh-add', ['-l'], { env: agentEnv() });
    for (const key of keys) expect(agentList.stdout).toContain(key.fingerprint);
  }, 60_000);

  it('each added key logs in to a real sshd through the scope socket, before and after a daemon restart', async () => {
    for (const round of ['before restart', 'after restart']) {
      if (round === 'after restart') {
        await serve.stop();
        serve = await startServe(k);
      }
      for (const key of keys) {
        const result = await login(key);
        expect(result.code, `${round}, ${key.name}: ${result.stderr}${daemonLog()}`).toBe(0);
        expect(result.stdout).toContain(`in-as-${key.name}`);
      }
    }
  }, 120_000);
});
