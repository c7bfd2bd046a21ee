// The interactive tier of the passphrase sources: a no-echo prompt when stdin is a terminal.
// `script` (util-linux) gives keyhold a real pseudo-terminal; we type only once the prompt is
// shown, so that what comes back proves whether the terminal echoed.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { KEYHOLD_BIN, keyhold, keyholdOk, makeKeyholdEnv, stopBackgroundDaemon, type KeyholdEnv } from '../helpers/keyhold.js';

interface Exchange {
  /** Text to wait for, then bytes to type. */
  expect: string;
  type: string;
}

/** Runs keyhold under a pty with no passphrase source but the terminal; returns its exit code and all it printed. */
function onTerminal(k: KeyholdEnv, args: string[], exchanges: Exchange[]): Promise<{ code: number | null; output: string }> {
  const env: NodeJS.ProcessEnv = { ...k.env, TERM: 'dumb' };
  delete env.KEYHOLD_PASSPHRASE_FILE;
  const command = [process.execPath, KEYHOLD_BIN, ...args].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  const child = spawn('script', ['-qfec', command, '/dev/null'], { env, stdio: ['pipe', 'pipe', 'pipe'] });
  let output = '';
  let step = 0;
  let searchFrom = 0;
  const advance = () => {
    while (step < exchanges.length) {
      const at = output.indexOf(exchanges[step]!.expect, searchFrom);
      if (at < 0) return;
      searchFrom = at + exchanges[step]!.expect.length;
      // Give the prompt a moment to switch the terminal to raw, no-echo mode.
      const typed = exchanges[step++]!.type;
      setTimeout(() => child.stdin.write(typed), 150);
    }
  };
  child.stdout.on('data', (d: Buffer) => {
    output += d.toString();
    advance();
  });
  child.stderr.on('data', (d: Buffer) => (output += d.toString()));
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}

describe('passphrase prompt on a terminal', () => {
  let k: KeyholdEnv;
  beforeEach(() => {
    k = makeKeyholdEnv('keyhold-tty-');
  });
  afterEach(() => k.cleanup());

  it('init asks twice without echo; the vault then opens with that passphrase', async () => {
    const secret = 'typed-on-a-tty-1234';
    const result = await onTerminal(k, ['init'], [
      { expect: 'Vault passphrase: ', type: `${secret}\r` },
      { expect: 'Repeat passphrase: ', type: `${secret}\r` },
    ]);
    expect(result.code, result.output).toBe(0);
    expect(result.output).toContain('created vault');
    expect(result.output).not.toContain(secret);
    expect(keyhold(k, ['key', 'list'], { env: { KEYHOLD_PASSPHRASE_FILE: undefined, KEYHOLD_PASSPHRASE: secret } }).status).toBe(0);
  });

  it('init with two different passphrases exits 2 and creates nothing', async () => {
    const result = await onTerminal(k, ['init'], [
      { expect: 'Vault passphrase: ', type: 'first-one\r' },
      { expect: 'Repeat passphrase: ', type: 'second-one\r' },
    ]);
    expect(result.code, result.output).toBe(2);
    expect(result.output).toContain('differ');
    expect(existsSync(k.vault)).toBe(false);
    expect(existsSync(`${k.vault}.keys`)).toBe(false);
  });

  describe('on an existing vault', () => {
    beforeEach(() => {
      keyholdOk(k, ['init']);
      keyholdOk(k, ['key', 'generate', 'web', '--comment', 'tty-key']);
    });

    it('a command prompts once, without echo, and runs', async () => {
      const result = await onTerminal(k, ['key', 'list'], [{ expect: 'Vault passphrase: ', type: `${k.passphrase}\r` }]);
      expect(result.code, result.output).toBe(0);
      expect(result.output).toContain('tty-key');
      expect(result.output).not.toContain(k.passphrase);
    });

    it('backspace edits what was typed', async () => {
      const result = await onTerminal(k, ['key', 'list'], [{ expect: 'Vault passphrase: ', type: `${k.passphrase}xy\x7f\x7f\r` }]);
      expect(result.code, result.output).toBe(0);
      expect(result.output).toContain('tty-key');
    });

    it('a wrong passphrase exits 4 and changes nothing', async () => {
      const before = readFileSync(`${k.vault}.keys`);
      const result = await onTerminal(k, ['key', 'list'], [{ expect: 'Vault passphrase: ', type: 'not-the-passphrase\r' }]);
      expect(result.code, result.output).toBe(4);
      expect(result.output).toContain('wrong passphrase');
      expect(result.output).not.toContain('not-the-passphrase');
      expect(readFileSync(`${k.vault}.keys`).equals(before)).toBe(true);
    });

    it('Ctrl-C at the prompt cancels (exit 1) and writes nothing', async () => {
      const result = await onTerminal(k, ['key', 'generate', 'other'], [{ expect: 'Vault passphrase: ', type: '\x03' }]);
      expect(result.code, result.output).toBe(1);
      expect(result.output).toContain('cancelled');
      expect(keyholdOk(k, ['key', 'list', '--json'])).not.toContain('other');
    });

    it('`unlock` prompts on the terminal, starts the daemon, and later commands need no passphrase', async () => {
      try {
        const result = await onTerminal(k, ['unlock', '--scope', 'web'], [{ expect: 'Vault passphrase: ', type: `${k.passphrase}\r` }]);
        expect(result.code, result.output).toBe(0);
        expect(result.output).toContain(`export SSH_AUTH_SOCK=${join(k.runtime, 'scopes', 'web.sock')}`);
        expect(result.output).not.toContain(k.passphrase);
        const again = await onTerminal(k, ['key', 'list'], []);
        expect(again.code, again.output).toBe(0);
        expect(again.output).not.toContain('Vault passphrase');
        expect(again.output).toContain('tty-key');
      } finally {
        await stopBackgroundDaemon(k.runtime);
      }
    });
  });
});
