// The config file: every key of the contract's [serve] table read, and every mistake an exit 2
// naming the file, the line and the key.
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { defaultConfigPath, loadConfig, parseServeConfig } from '../../src/config/config.js';
import { tomlLines } from '../../src/toml-lines.js';
import { KeyholdError } from '../../src/errors.js';
import { makeKeyholdEnv, type KeyholdEnv } from '../helpers/keyhold.js';

const FILE = '/etc/keyhold.toml';

function refusal(text: string): KeyholdError {
  try {
    parseServeConfig(text, FILE);
  } catch (err) {
    expect(err).toBeInstanceOf(KeyholdError);
    expect((err as KeyholdError).exitCode).toBe(2);
    return err as KeyholdError;
  }
  throw new Error('accepted');
}

describe('parseServeConfig', () => {
  it('reads every key of [serve] as the contract shows it', () => {
    const config = parseServeConfig(
      [
        '[serve]',
        'listen = ["unix:/run/keyhold/signer.sock", "tcp:127.0.0.1:7022"]',
        'scopes = ["web", "ops"]          # sockets bound even while locked',
        'idle_lock = "30m"',
        'lock_after = "8h"',
        'confirm_program = "/usr/bin/ssh-askpass"',
        'confirm_timeout = "30s"',
        'log_level = "info"',
        'offline_grace = "60s"',
      ].join('\n'),
      FILE,
    );
    expect(config).toEqual({
      listen: [
        { kind: 'unix', path: '/run/keyhold/signer.sock' },
        { kind: 'tcp', host: '127.0.0.1', port: 7022 },
      ],
      scopes: ['web', 'ops'],
      idleLockMs: 30 * 60_000,
      lockAfterMs: 8 * 3_600_000,
      confirmProgram: '/usr/bin/ssh-askpass',
      confirmTimeoutMs: 30_000,
      logLevel: 'info',
      offlineGraceMs: 60_000,
    });
  });

  it('takes an empty file and an empty [serve]', () => {
    expect(parseServeConfig('', FILE)).toEqual({});
    expect(parseServeConfig('# nothing yet\n[serve]\n', FILE)).toEqual({});
  });

  it.each([
    ['an unknown key', '[serve]\nidle_lock = "30m"\nidle_lcok = "1h"\n', `${FILE}:3: serve.idle_lcok: unknown key`],
    ['an unknown table', '[serve]\nidle_lock = "30m"\n\n[server]\nx = 1\n', `${FILE}:4: server: unknown table or key`],
    ['a top-level key', 'idle_lock = "30m"\n', `${FILE}:1: idle_lock: unknown table or key`],
    ['a bad duration', '[serve]\n\nlock_after = "8 hours"\n', `${FILE}:3: serve.lock_after: invalid duration "8 hours"`],
    ['a number for a duration', '[serve]\nconfirm_timeout = 30\n', `${FILE}:2: serve.confirm_timeout: must be a duration string`],
    ['a bad listen address', '[serve]\nlisten = ["tls:0.0.0.0:7022"]\n', `${FILE}:2: serve.listen: invalid address "tls:0.0.0.0:7022"`],
    ['a listen string for a list', '[serve]\nlisten = "unix:/x"\n', `${FILE}:2: serve.listen: must be a list`],
    ['a bad scope name', '[serve]\nscopes = ["web", "../etc"]\n', `${FILE}:2: serve.scopes: invalid scope name "../etc"`],
    ['a relative confirm program', '[serve]\nconfirm_program = "ssh-askpass"\n', `${FILE}:2: serve.confirm_program: must be an absolute path`],
    ['a bad log level', '[serve]\nlog_level = "loud"\n', `${FILE}:2: serve.log_level: must be one of`],
    ['serve as a value', 'serve = 1\n', `${FILE}:1: serve: must be a table`],
    ['a quoted unknown key', '[serve]\n"idle lock" = "1m"\n', `${FILE}:2: serve.idle lock: unknown key`],
    ['a key named like an object method', '[serve]\ntoString = "x"\n', `${FILE}:2: serve.toString: unknown key`],
    ['__proto__ as a key', '[serve]\n__proto__ = "x"\n', `${FILE}:2: serve.__proto__: unknown key`],
    ['a confirm timeout over an hour', '[serve]\nconfirm_timeout = "25d"\n', `${FILE}:2: serve.confirm_timeout: is at most 1h`],
  ])('refuses %s, naming file, line and key', (_what, text, message) => {
    expect(refusal(text).message).toContain(message);
  });

  it('names the line of a TOML syntax error', () => {
    const err = refusal('[serve]\nidle_lock = "30m"\nlock_after = \n');
    expect(err.message).toMatch(new RegExp(`^${FILE}:3: `));
  });

  it('refuses a key given twice (TOML forbids it) with its line', () => {
    expect(refusal('[serve]\nidle_lock = "1m"\nidle_lock = "2m"\n').message).toMatch(new RegExp(`^${FILE}:3: `));
  });
});

describe('tomlLines', () => {
  const text = ['# top', 'a = 1', '[serve]', '  "b" = 2', '[[rule]]', 'action = "allow"', '[[rule]]', '', 'action = "deny"', 'x.y = 3', '[rule.hosts]', 'z = 1', 'r = [{ k = 1 },', '  { k = 2 }]'].join('\n');
  const lines = tomlLines(text);
  it('finds keys in tables, quoted and dotted keys, the nth array table, its sub-tables and inline tables', () => {
    expect(lines.line('a')).toBe(2);
    expect(lines.line('serve')).toBe(3);
    expect(lines.line('serve', 'b')).toBe(4);
    expect(lines.line('rule', 0)).toBe(5);
    expect(lines.line('rule', 0, 'action')).toBe(6);
    expect(lines.line('rule', 1, 'action')).toBe(9);
    expect(lines.line('rule', 1, 'x', 'y')).toBe(10);
    expect(lines.line('rule', 1, 'hosts', 'z')).toBe(12);
    expect(lines.line('rule', 1, 'hosts', 'r', 1, 'k')).toBe(14);
    expect([...lines.childLines('rule', 1).keys()]).toEqual(['action', 'x', 'hosts']);
  });
  it('leaves out what is not there, and never throws on text it cannot follow', () => {
    expect(lines.line('rule', 2)).toBeUndefined();
    expect(lines.line('nosuch')).toBeUndefined();
    for (const bad of ['[[rule', '"unterminated', "a = '''", 'x = [1, {', '\u0000']) expect(() => tomlLines(bad)).not.toThrow();
  });
});

describe('loadConfig', () => {
  let k: KeyholdEnv;
  afterEach(() => k?.cleanup());

  it('uses $XDG_CONFIG_HOME/keyhold/config.toml, and none when it is absent', () => {
    k = makeKeyholdEnv();
    const env = { XDG_CONFIG_HOME: join(k.dir, 'cfg') };
    expect(loadConfig(undefined, env)).toEqual({ file: null, serve: {} });
    const path = defaultConfigPath(env);
    mkdirSync(join(k.dir, 'cfg', 'keyhold'), { recursive: true });
    writeFileSync(path, '[serve]\nidle_lock = "5m"\n');
    expect(loadConfig(undefined, env)).toEqual({ file: path, serve: { idleLockMs: 300_000 } });
  });

  it('--config wins over KEYHOLD_CONFIG, which wins over the default; a named file must exist', () => {
    k = makeKeyholdEnv();
    const a = join(k.dir, 'a.toml');
    const b = join(k.dir, 'b.toml');
    writeFileSync(a, '[serve]\nidle_lock = "1m"\n');
    writeFileSync(b, '[serve]\nidle_lock = "2m"\n');
    expect(loadConfig(a, { KEYHOLD_CONFIG: b }).serve.idleLockMs).toBe(60_000);
    expect(loadConfig(undefined, { KEYHOLD_CONFIG: b }).serve.idleLockMs).toBe(120_000);
    expect(() => loadConfig(join(k.dir, 'missing.toml'), {})).toThrow(/no config file .*missing\.toml/);
  });

  it('refuses a config file others may write, and one that is not a regular file', () => {
    k = makeKeyholdEnv();
    const file = join(k.dir, 'c.toml');
    writeFileSync(file, '[serve]\n');
    chmodSync(file, 0o666);
    expect(() => loadConfig(file, {})).toThrow(/may be written by others.*|chmod go-w/);
    expect(() => loadConfig(k.dir, {})).toThrow(KeyholdError);
    expect(() => loadConfig('/dev/zero', {})).toThrow(KeyholdError);
  });
});
