// The unlock factor kinds come from one list: the key file's schema, `factor add` and
// `unlock --factor` all take their kinds from it, so a new kind is one file and one line.
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import * as v from 'valibot';
import { FACTOR_KINDS, FACTOR_TYPES, kindOf, unsealedFactorSchemaOf } from '../../src/unlock/kinds.js';
import { enrollPassphrase } from '../../src/unlock/passphrase.js';
import { newSshAgentFactor } from '../../src/unlock/ssh-agent.js';
import { generateKeyPairSync } from 'node:crypto';
import { fingerprint } from '../../src/agent-protocol/public-key.js';

const BIN = fileURLToPath(new URL('../../bin/keyhold', import.meta.url));

/** The quoted choices yargs prints for an option or positional, in order. */
function helpChoices(args: string[], name: string): string[] {
  const help = execFileSync(process.execPath, [BIN, ...args, '--help'], { encoding: 'utf8', env: { ...process.env, COLUMNS: '400' } });
  const lines = help.split('\n');
  const at = lines.findIndex((l) => l.trimStart().startsWith(name));
  // yargs wraps at its own width: a long choices list goes on the option's next line.
  const choices = /\[choices: ([^\]]*)\]/.exec(at < 0 ? '' : lines.slice(at, at + 2).join(' '))?.[1];
  if (!choices) throw new Error(`no choices for ${name} in: ${help}`);
  return choices.split(', ').map((c) => JSON.parse(c) as string);
}

describe('unlock factor kinds', () => {
  it('are listed once each, with distinct types and id prefixes', () => {
    expect(FACTOR_TYPES).toEqual(FACTOR_KINDS.map((k) => k.type));
    expect(FACTOR_TYPES).toEqual(expect.arrayContaining(['passphrase', 'ssh-agent']));
    expect(new Set(FACTOR_TYPES).size).toBe(FACTOR_KINDS.length);
    const prefixes = FACTOR_KINDS.map((k) => k.idPrefix);
    expect(new Set(prefixes).size).toBe(prefixes.length);
    for (const prefix of prefixes) expect(prefix).toMatch(/^[a-z]{2}$/);
    for (const type of FACTOR_TYPES) expect(kindOf(type).type).toBe(type);
    expect(() => kindOf('no-such-kind')).toThrow();
  });

  it('`factor add` and `unlock --factor` offer exactly the listed kinds', () => {
    expect(helpChoices(['factor', 'add'], 'type')).toEqual(FACTOR_TYPES);
    expect(helpChoices(['unlock'], '--factor')).toEqual(FACTOR_TYPES);
  });

  it('`factor add` takes each kind’s own options, and refuses another kind’s', () => {
    const help = execFileSync(process.execPath, [BIN, 'factor', 'add', '--help'], { encoding: 'utf8' });
    for (const kind of FACTOR_KINDS) for (const option of Object.keys(kind.addOptions)) expect(help).toContain(`--${option}`);
    let stderr = '';
    try {
      execFileSync(process.execPath, [BIN, 'factor', 'add', 'passphrase', '--key', 'SHA256:x', '--vault', '/nonexistent/v.db'], { stdio: 'pipe', encoding: 'utf8' });
    } catch (err) {
      stderr = String((err as { stderr: string }).stderr);
    }
    expect(stderr).toMatch(/--key goes with ssh-agent/);
  });

  it('the key file schema takes a factor of each kind and refuses an unknown type or a foreign id prefix', async () => {
    const schema = unsealedFactorSchemaOf();
    const passphrase = (await enrollPassphrase(Buffer.from('kinds-test'), { log2n: 14, r: 1, p: 1 })).factor;
    const { publicKey } = generateKeyPairSync('ed25519');
    const raw = publicKey.export({ format: 'der', type: 'spki' }).subarray(12);
    const blob = Buffer.concat([Buffer.from([0, 0, 0, 11]), Buffer.from('ssh-ed25519'), Buffer.from([0, 0, 0, 32]), raw]);
    const agent = newSshAgentFactor({ type: 'ssh-ed25519', fingerprint: fingerprint(blob), blob: blob.toString('base64') });
    for (const factor of [passphrase, agent]) expect(v.is(schema, factor)).toBe(true);
    expect(v.is(schema, { ...passphrase, type: 'telepathy' })).toBe(false);
    expect(v.is(schema, { ...passphrase, id: agent.id })).toBe(false);
    expect(v.is(schema, { ...agent, key: { ...agent.key, fingerprint: passphrase.id } })).toBe(false);
  });
});
