// End-to-end: `keyhold policy set/show/rm/check` through the real bin/keyhold, on a vault opened by
// the CLI and through an unlocked daemon; host names resolved from a known_hosts under $HOME (hashed
// by ssh-keygen -H) and from --known-hosts; exit codes 2 (bad file, unknown host), 4 (deny), 5 (none).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fingerprint } from '../../src/agent-protocol/public-key.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { bare } from '../helpers/audit.js';
import { keyhold, keyholdOk, makeKeyholdEnv, stopBackgroundDaemon, type KeyholdEnv } from '../helpers/keyhold.js';

let k: KeyholdEnv;
const hostKeys: Record<string, { line: string; fp: string }> = {};
let extraKnownHosts: string;
let userKey: string;

function makeHostKey(name: string): void {
  const file = join(k.dir, `hostkey-${name}`);
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', '', '-f', file]);
  const line = readFileSync(`${file}.pub`, 'utf8').trim();
  hostKeys[name] = { line, fp: fingerprint(Buffer.from(line.split(' ')[1]!, 'base64')) };
}

beforeAll(() => {
  k = makeKeyholdEnv('keyhold-policy-cli-');
  const home = join(k.dir, 'home');
  k.env.HOME = home;
  mkdirSync(join(home, '.ssh'), { recursive: true });
  for (const name of ['git', 'git2', 'box', 'other']) makeHostKey(name);
  const knownHosts = join(home, '.ssh', 'known_hosts');
  writeFileSync(knownHosts, `git.example ${hostKeys.git!.line}\ngit.example ${hostKeys.git2!.line}\n[box.example]:2222 ${hostKeys.box!.line}\n`);
  execFileSync('ssh-keygen', ['-H', '-f', knownHosts], { stdio: 'ignore' });
  extraKnownHosts = join(k.dir, 'extra_known_hosts');
  writeFileSync(extraKnownHosts, `other.example ${hostKeys.other!.line}\n`);
  keyholdOk(k, ['init']);
  userKey = (JSON.parse(keyholdOk(k, ['key', 'generate', 'web', '--json'])) as { fingerprint: string }).fingerprint;
});
afterAll(async () => {
  await stopBackgroundDaemon(k.runtime);
  k.cleanup();
});

const POLICY = `# the web scope
default = "deny"

[[rule]]
action = "allow"
purpose = "ssh-login"
hosts = ["git.example", "[box.example]:2222"]
users = ["git"]

[[rule]]
action = "confirm"
purpose = "sshsig"
namespaces = ["git"]
remember = "10m"

[[rule]]
action = "allow"
hosts = ["other.example"]
exe = ["/usr/bin/*"]
`;

function writePolicy(name: string, text: string): string {
  const file = join(k.dir, name);
  writeFileSync(file, text);
  return file;
}

function check(env: KeyholdEnv, args: string[]) {
  return keyhold(env, ['policy', 'check', 'web', ...args, '--known-hosts', extraKnownHosts]);
}

describe('keyhold policy (vault opened by the CLI)', () => {
  it('set resolves names (hashed known_hosts under HOME, --known-hosts) and prints a summary with the hosts', () => {
    const r = keyhold(k, ['policy', 'set', 'web', writePolicy('web.toml', POLICY), '--known-hosts', extraKnownHosts]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const lines = r.stdout.trim().split('\n');
    expect(lines[0]).toBe('policy for web: 3 rules, default deny');
    expect(lines[1]).toBe(`  git.example: ${hostKeys.git!.fp} ${hostKeys.git2!.fp} (${join(k.dir, 'home', '.ssh', 'known_hosts')}:1, ${join(k.dir, 'home', '.ssh', 'known_hosts')}:2)`);
    expect(lines[2]).toContain(`[box.example]:2222: ${hostKeys.box!.fp}`);
    expect(lines[3]).toBe(`  other.example: ${hostKeys.other!.fp} (${extraKnownHosts}:1)`);
    expect(keyholdOk(k, ['scope', 'list'])).toMatch(/^web\s+1\s+0\s+0\s+yes$/m);
  });

  it('show prints normalised TOML with numbered rules and each host followed by its fingerprints; set takes it back unchanged', () => {
    const shown = keyholdOk(k, ['policy', 'show', 'web']);
    expect(shown).toContain('# rule 1\n[[rule]]\naction = "allow"\npurpose = "ssh-login"\nhosts = ["git.example", "[box.example]:2222"]\n');
    expect(shown).toContain(`#   git.example: ${hostKeys.git!.fp} ${hostKeys.git2!.fp}\n`);
    expect(shown).toContain(`#   [box.example]:2222: ${hostKeys.box!.fp}\n`);
    expect(shown).toContain('# rule 3\n[[rule]]\naction = "allow"\nhosts = ["other.example"]\n');
    const before = JSON.parse(keyholdOk(k, ['policy', 'show', 'web', '--json'])) as { document: unknown; source: string; scope: string };
    expect(before.scope).toBe('web');
    expect(before.source).toBe(POLICY);
    keyholdOk(k, ['policy', 'set', 'web', '-', '--known-hosts', extraKnownHosts], { input: shown });
    const after = JSON.parse(keyholdOk(k, ['policy', 'show', 'web', '--json'])) as { document: unknown; source: string };
    expect(after.document).toEqual(before.document);
    expect(after.source).toBe(shown);
  });

  it('check prints the deciding rule, numbered from 1; exit 0 allow/confirm, 4 deny; --json gives {action, rule}', () => {
    let r = check(k, ['--host', 'git.example', '--user', 'git']);
    expect([r.status, r.stdout]).toEqual([0, 'allow: rule 1 (purpose=ssh-login hosts=git.example,[box.example]:2222 users=git)\n']);
    r = check(k, ['--host', '[box.example]:2222', '--user', 'git', '--json']);
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ action: 'allow', rule: 1 });
    r = check(k, ['--host', hostKeys.git2!.fp, '--user', 'root']);
    expect([r.status, r.stdout]).toEqual([4, 'deny: default\n']);
    r = check(k, ['--namespace', 'git']);
    expect([r.status, r.stdout]).toEqual([0, 'confirm: rule 2 (purpose=sshsig namespaces=git)\n']);
    r = check(k, ['--namespace', 'file', '--json']);
    expect(r.status).toBe(4);
    expect(JSON.parse(r.stdout)).toEqual({ action: 'deny', rule: 'default' });
    r = check(k, ['--purpose', 'other', '--exe', '/usr/bin/ssh-add']);
    expect([r.status, r.stdout]).toEqual([4, 'deny: default\n']);
    r = check(k, ['--host', 'other.example', '--exe', '/usr/bin/ssh', '--key', userKey.slice('SHA256:'.length)]);
    expect([r.status, r.stdout]).toEqual([0, 'allow: rule 3 (hosts=other.example exe=/usr/bin/*)\n']);
  });

  it('check says when a host name with several keys gets different answers, and exits 4 if any is denied', () => {
    const file = writePolicy('one-key.toml', `default = "deny"\n[[rule]]\naction = "allow"\nhosts = ["${hostKeys.git!.fp}"]\n`);
    keyholdOk(k, ['policy', 'set', 'web', file]);
    const r = check(k, ['--host', 'git.example']);
    expect(r.status).toBe(4);
    expect(r.stdout).toBe(
      [
        'the answer differs by key or host key:',
        `  key ${userKey}, host key ${hostKeys.git!.fp}: allow: rule 1 (hosts=${hostKeys.git!.fp})`,
        `  key ${userKey}, host key ${hostKeys.git2!.fp}: deny: default`,
        '',
      ].join('\n'),
    );
    const json = JSON.parse(check(k, ['--host', 'git.example', '--json']).stdout) as { action: string; checks: unknown[] };
    expect(json.action).toBe('deny');
    expect(json.checks).toHaveLength(2);
  });

  it('exit 2 for a bad file (naming file:line and field), an unknown host, bad check options; nothing stored', () => {
    const before = keyholdOk(k, ['policy', 'show', 'web', '--json']);
    const bad = writePolicy('bad.toml', 'default = "deny"\n\n[[rule]]\naction = "allow"\npurpose = "ssh-login"\nnamespaces = ["git"]\n');
    let r = keyhold(k, ['policy', 'set', 'web', bad]);
    expect(r.status).toBe(2);
    expect(r.stderr).toBe(
      `keyhold: ${bad}:6: rule 1: namespaces: only a sshsig request has namespaces: with purpose ssh-login this rule would never match (see "Policy and approvals" in the README for the file format)\n`,
    );
    r = keyhold(k, ['policy', 'set', 'web', '-'], { input: '[[rule]]\naction = "allow"\nhosts = ["unknown.example"]\n' });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^keyhold: stdin:3: rule 1: hosts: no known host key for "unknown\.example" \(searched .*known_hosts\) \(connect once with ssh .*ssh-keyscan unknown\.example/);
    r = keyhold(k, ['policy', 'set', 'web', '-'], { input: 'default = "deny"\n[[rule]\n' });
    expect([r.status, r.stderr]).toEqual([2, expect.stringMatching(/^keyhold: stdin:2: not valid TOML: /)]);
    r = keyhold(k, ['policy', 'set', 'web', '-'], { input: Buffer.from([0x64, 0xff, 0x0a]) });
    expect([r.status, r.stderr]).toEqual([2, expect.stringMatching(/^keyhold: stdin: not UTF-8 text/)]);
    r = keyhold(k, ['policy', 'set', 'web', '-'], { input: '#'.repeat(1024 * 1024 + 10) });
    expect(r.status).toBe(2);
    r = keyhold(k, ['policy', 'set', 'web', '-', '--passphrase-file', '-'], { input: 'default = "deny"\n' });
    expect([r.status, r.stderr]).toEqual([2, expect.stringMatching(/cannot both come from stdin/)]);
    r = keyhold(k, ['policy', 'set', 'bad/scope', bad]);
    expect(r.status).toBe(2);
    r = keyhold(k, ['policy', 'set', 'web', join(k.dir, 'missing.toml')]);
    expect(r.status).toBe(5);
    for (const args of [['--purpose', 'any'], ['--purpose', 'sshsig', '--host', 'git.example'], ['--namespace', 'git', '--user', 'git'], ['--key', 'nope'], ['--host', 'unknown.example'], ['--user', 'git', '--user', 'root'], ['--exe', 'node']]) {
      expect(check(k, args).status, args.join(' ')).toBe(2);
    }
    expect(keyholdOk(k, ['policy', 'show', 'web', '--json'])).toBe(before);
  });

  it('rm removes (then the scope has none: show and rm exit 5, check allows as the daemon does); audit has policy-set and policy-removed', () => {
    expect(keyholdOk(k, ['policy', 'rm', 'web'])).toBe('removed the policy of web\n');
    for (const args of [['policy', 'rm', 'web'], ['policy', 'show', 'web']]) {
      const r = keyhold(k, args);
      expect(r.status, args.join(' ')).toBe(5);
      expect(r.stderr).toMatch(/scope web has no policy/);
    }
    const check = keyhold(k, ['policy', 'check', 'web', '--namespace', 'file']);
    expect(check.status).toBe(0);
    expect(check.stdout).toMatch(/^allow: scope web has no policy/);
    expect(JSON.parse(keyholdOk(k, ['policy', 'check', 'web', '--json']))).toEqual({ action: 'allow', rule: null, policy: false });
    const events = readFileSync(vaultPaths(k.vault).audit, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { event: string; scope?: string; rules?: number });
    const policyEvents = events.filter((e) => e.event.startsWith('policy-')).map((e) => [e.event, e.scope, e.rules]);
    expect(policyEvents).toEqual([
      ['policy-set', 'web', 3],
      ['policy-set', 'web', 3],
      ['policy-set', 'web', 1],
      ['policy-removed', 'web', undefined],
    ]);
  });
});

describe('keyhold policy through an unlocked daemon', () => {
  it('set, show, check and rm work with no passphrase source, through the control socket', () => {
    keyholdOk(k, ['unlock']);
    const d = bare(k);
    const file = writePolicy('daemon.toml', POLICY);
    expect(keyholdOk(d, ['policy', 'set', 'web', file, '--known-hosts', extraKnownHosts])).toMatch(/^policy for web: 3 rules, default deny\n/);
    expect(keyholdOk(d, ['policy', 'show', 'web'])).toContain(`#   git.example: ${hostKeys.git!.fp} ${hostKeys.git2!.fp}`);
    expect(check(d, ['--namespace', 'git']).stdout).toBe('confirm: rule 2 (purpose=sshsig namespaces=git)\n');
    expect(check(d, ['--namespace', 'file']).status).toBe(4);
    const bad = keyhold(d, ['policy', 'set', 'web', '-'], { input: 'default = "perhaps"\n' });
    expect([bad.status, bad.stderr]).toEqual([2, expect.stringMatching(/^keyhold: stdin:1: default: must be one of allow, deny, confirm/)]);
    keyholdOk(d, ['policy', 'rm', 'web']);
    expect(keyhold(d, ['policy', 'rm', 'web']).status).toBe(5);
    expect(keyhold(d, ['policy', 'show', 'web']).status).toBe(5);
  });
});

describe('keyhold policy with random arguments (fast-check)', () => {
  it('24 random policy command lines: exit 0-5, every stderr line a `keyhold:` line, no stack trace', () => {
    const file = writePolicy('fuzz.toml', POLICY.replace('"git.example", "[box.example]:2222"', `"${hostKeys.box!.fp}"`).replace('"other.example"', `"${hostKeys.other!.fp}"`));
    const word = fc.constantFrom('web', 'other', '-', file, '/dev/null', '/nonexistent', '', '..', 'ssh-login', 'sshsig', 'any', 'git', 'git.example', hostKeys.git!.fp, 'SHA256:', '/usr/bin/ssh', '☃', '\n');
    const flag = fc.constantFrom('--purpose', '--host', '--user', '--namespace', '--exe', '--subject', '--key', '--forwarded', '--json', '--known-hosts', '--no-such-flag', '--help');
    const argv = fc.tuple(fc.constantFrom('set', 'show', 'rm', 'check'), fc.array(fc.oneof(word, flag), { maxLength: 6 })).map(([command, rest]) => ['policy', command, ...rest]);
    const seen = new Set<number | null>();
    fc.assert(
      fc.property(argv, (args) => {
        const r = keyhold(bare(k), args, { env: { KEYHOLD_PASSPHRASE_FILE: k.passFile } });
        const what = `${JSON.stringify(args)} -> ${r.status}: ${r.stderr}`;
        seen.add(r.status);
        expect([0, 1, 2, 3, 4, 5], what).toContain(r.status);
        expect(r.stderr, what).not.toMatch(/^\s+at /m);
        expect(r.stderr, what).not.toContain('unexpected error');
        for (const line of r.stderr.split('\n').filter(Boolean)) expect(line, what).toMatch(/^keyhold: /);
      }),
      { numRuns: 24, seed: 5 },
    );
    expect(seen.has(2)).toBe(true);
  });
});
