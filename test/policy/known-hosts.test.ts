// known_hosts resolution checked against OpenSSH itself: files hashed by `ssh-keygen -H`, and for
// each name the keys `ssh-keygen -F` finds (CA lines and revoked keys left out, as ssh trusts them).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { appendFileSync, chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fingerprint } from '../../src/agent-protocol/public-key.js';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { defaultKnownHostsFiles, KnownHosts, knownHostsName, resolvePolicyHosts } from '../../src/policy/known-hosts.js';
import { parsePolicyToml } from '../../src/policy/parse.js';

const dir = mkdtempSync(join(tmpdir(), 'keyhold-known-hosts-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface HostKey {
  line: string;
  fp: string;
}
const keys: Record<string, HostKey> = {};

function hostKey(name: string, type: string): HostKey {
  const file = join(dir, name);
  execFileSync('ssh-keygen', ['-q', '-t', type, '-N', '', '-C', '', '-f', file]);
  const line = readFileSync(`${file}.pub`, 'utf8').trim();
  return { line, fp: fingerprint(Buffer.from(line.split(' ')[1]!, 'base64')) };
}

let plain: string;
let hashed: string;
beforeAll(() => {
  for (const [name, type] of [['a', 'ed25519'], ['a2', 'ecdsa'], ['port', 'ed25519'], ['wild', 'ed25519'], ['ca', 'ed25519'], ['rev', 'ed25519'], ['rsa', 'rsa']] as const) {
    keys[name] = hostKey(name, type);
  }
  const k = (name: string) => keys[name]!.line;
  plain = join(dir, 'known_hosts');
  writeFileSync(
    plain,
    [
      '# a comment',
      '',
      `alpha.example,192.0.2.1 ${k('a')}`,
      `alpha.example ${k('a2')}`,
      `[alpha.example]:2222 ${k('port')}`,
      `*.wild.example,!bad.wild.example,?ne.example ${k('wild')}`,
      `@cert-authority *.example ${k('ca')}`,
      `alpha.example ${k('rev')}`,
      `@revoked * ${k('rev')}`,
      `rsa.example ${k('rsa')}`,
    ].join('\n') + '\n',
  );
  hashed = join(dir, 'known_hosts.hashed');
  copyFileSync(plain, hashed);
  execFileSync('ssh-keygen', ['-H', '-f', hashed], { stdio: 'ignore' });
  // Lines ssh skips (ssh-keygen -H refuses to rewrite a file holding them, so they come after).
  const junk = [
    'broken.example ssh-ed25519',
    `mismatch.example ssh-rsa ${k('a').split(' ')[1]}`,
    'junk.example ssh-ed25519 !!!notbase64!!!',
    `|1|short|hash ${k('a')}`,
    `@unknown-marker alpha.example ${k('a')}`,
  ].join('\n') + '\n';
  for (const file of [plain, hashed]) appendFileSync(file, junk);
});

/** The fingerprint OpenSSH computes for a known_hosts line (`ssh-keygen -l`), or null if it cannot parse its key. */
function opensshFingerprint(line: string): string | null {
  const file = join(dir, 'one-line');
  writeFileSync(file, `${line}\n`);
  try {
    return /SHA256:[A-Za-z0-9+/]{43}/.exec(execFileSync('ssh-keygen', ['-l', '-f', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }))![0];
  } catch {
    return null;
  }
}

/** The keys ssh would trust for `name` in `file`, as `ssh-keygen -F` reports the matching lines. */
function opensshResolve(name: string, file: string): string[] {
  let out: string;
  try {
    out = execFileSync('ssh-keygen', ['-F', name, '-f', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    return []; // exit 1: not found
  }
  const trusted = new Set<string>();
  const revoked = new Set<string>();
  const lines = out.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const header = /^# Host .* found: line \d+ ?(CA|REVOKED)?/.exec(lines[i]!);
    if (!header) continue;
    const fp = opensshFingerprint(lines[i + 1]!.replace(/^@\S+ /, ''));
    if (fp === null) continue;
    if (header[1] === 'REVOKED') revoked.add(fp);
    else if (header[1] !== 'CA') trusted.add(fp);
  }
  return [...trusted].filter((fp) => !revoked.has(fp)).sort();
}

const NAMES = [
  'alpha.example',
  '192.0.2.1',
  '[alpha.example]:2222',
  '[alpha.example]:2223',
  'x.wild.example',
  'deep.x.wild.example',
  'bad.wild.example',
  'one.example',
  'rsa.example',
  'ca.example',
  'broken.example',
  'mismatch.example',
  'junk.example',
  'nowhere.example',
];

describe('KnownHosts', () => {
  it('agrees with ssh-keygen -F for every name, in the plain file and in the file ssh-keygen -H hashed', () => {
    expect(readFileSync(hashed, 'utf8')).toMatch(/^\|1\|/m);
    for (const file of [plain, hashed]) {
      const ours = KnownHosts.load([file]);
      for (const name of NAMES) {
        expect(ours.resolve(name).map((m) => m.fingerprint).sort(), `${name} in ${file}`).toEqual(opensshResolve(name, file));
      }
    }
  });

  it('what each name stands for, in words', () => {
    const kh = KnownHosts.load([plain]);
    const fps = (name: string) => kh.resolve(name).map((m) => m.fingerprint);
    // Two keys for alpha.example; the revoked one left out; the port-2222 key only under [ ]:2222.
    expect(fps('alpha.example')).toEqual([keys.a!.fp, keys.a2!.fp]);
    expect(fps('[alpha.example]:2222')).toEqual([keys.port!.fp]);
    expect(fps('[alpha.example]:22')).toEqual(fps('alpha.example'));
    expect(fps('ALPHA.Example')).toEqual(fps('alpha.example'));
    expect(fps('x.wild.example')).toEqual([keys.wild!.fp]);
    expect(fps('bad.wild.example')).toEqual([]);
    expect(fps('one.example')).toEqual([keys.wild!.fp]);
    expect(fps('ca.example')).toEqual([]);
    expect(fps('mismatch.example')).toEqual([]);
    expect(kh.resolve('alpha.example')[0]).toMatchObject({ file: plain, line: 3 });
  });

  it('name normalisation: [host]:22 is host, names are lowercased', () => {
    expect(knownHostsName('[Git.Example]:22')).toBe('git.example');
    expect(knownHostsName('[127.0.0.1]:2222')).toBe('[127.0.0.1]:2222');
    expect(knownHostsName('Host')).toBe('host');
  });

  it('skips missing and unreadable default files; a named file that cannot be read is an error', () => {
    const unreadable = join(dir, 'unreadable');
    writeFileSync(unreadable, `alpha.example ${keys.a!.line}\n`);
    chmodSync(unreadable, 0o000);
    const kh = KnownHosts.load([join(dir, 'missing'), dir, unreadable, plain]);
    expect(kh.resolve('rsa.example')).toHaveLength(1);
    expect(kh.files).toContain(plain);
    expect(kh.files).not.toContain(join(dir, 'missing'));
    let error: unknown;
    try {
      KnownHosts.load([], [join(dir, 'missing')]);
    } catch (err) {
      error = err;
    }
    expect((error as KeyholdError).exitCode).toBe(EXIT.NOT_FOUND);
  });

  it('the default files are ~/.ssh/known_hosts (from HOME) and /etc/ssh/ssh_known_hosts', () => {
    const home = process.env.HOME;
    process.env.HOME = join(dir, 'home');
    try {
      expect(defaultKnownHostsFiles()).toEqual([
        join(dir, 'home', '.ssh', 'known_hosts'),
        join(dir, 'home', '.ssh', 'known_hosts2'),
        '/etc/ssh/ssh_known_hosts',
        '/etc/ssh/ssh_known_hosts2',
      ]);
    } finally {
      process.env.HOME = home;
    }
  });
});

describe('resolvePolicyHosts', () => {
  it('names become their keys, fingerprints stand for themselves; an unknown name is exit 2 at its file:line with the ssh-keyscan hint', () => {
    mkdirSync(join(dir, 'p'), { recursive: true });
    const kh = KnownHosts.load([hashed]);
    const parsed = parsePolicyToml(
      `default = "deny"\n[[rule]]\naction = "allow"\nhosts = ["alpha.example", "[alpha.example]:2222", "${keys.rsa!.fp}"]\n`,
      'p.toml',
    );
    const { document, hosts } = resolvePolicyHosts(parsed, kh);
    expect(document.rules[0]!.hosts).toEqual([
      { name: 'alpha.example', fingerprints: [keys.a!.fp, keys.a2!.fp] },
      { name: '[alpha.example]:2222', fingerprints: [keys.port!.fp] },
      { name: keys.rsa!.fp, fingerprints: [keys.rsa!.fp] },
    ]);
    expect(hosts.map((h) => h.found.length)).toEqual([2, 1, 0]);

    const unknown = parsePolicyToml('[[rule]]\naction = "allow"\n\nhosts = ["alpha.example", "[nowhere.example]:2200"]\n', 'p.toml');
    let error: KeyholdError | undefined;
    try {
      resolvePolicyHosts(unknown, kh);
    } catch (err) {
      error = err as KeyholdError;
    }
    expect(error?.exitCode).toBe(EXIT.USAGE);
    expect(error?.message).toMatch(/^p\.toml:4: rule 1: hosts: no known host key for "\[nowhere\.example\]:2200" \(searched .*known_hosts\.hashed\)/);
    expect(error?.hint).toContain('ssh-keyscan -p 2200 nowhere.example');
  });
});
