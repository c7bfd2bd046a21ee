// `keyhold completion`: the script it prints, sourced in a real bash, completes keyhold's
// commands, subcommands and options by asking the installed `keyhold` (first on PATH).
import { spawnSync } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KEYHOLD_BIN, keyhold, makeKeyholdEnv, type KeyholdEnv } from '../helpers/keyhold.js';

let k: KeyholdEnv;
let script: string;
let pathDir: string;

beforeAll(() => {
  k = makeKeyholdEnv('keyhold-completion-');
  pathDir = join(k.dir, 'bin');
  mkdirSync(pathDir);
  symlinkSync(KEYHOLD_BIN, join(pathDir, 'keyhold'));
  const printed = keyhold(k, ['completion', 'bash']);
  expect(printed.status, printed.stderr).toBe(0);
  script = join(k.dir, 'keyhold.bash');
  writeFileSync(script, printed.stdout);
});
afterAll(() => k?.cleanup());

/** What bash offers for the words of `line` (the last one being completed), through the script's own function. */
function complete(words: string[], env: NodeJS.ProcessEnv = {}): string[] {
  const array = words.map((w) => `'${w}'`).join(' ');
  const result = spawnSync(
    'bash',
    ['--norc', '--noprofile', '-c', `source "$1" && COMP_WORDS=(${array}) && COMP_CWORD=${words.length - 1} && _keyhold_yargs_completions && printf '%s\\n' "\${COMPREPLY[@]}"`, 'bash', script],
    { env: { ...k.env, PATH: `${pathDir}:${process.env.PATH}`, ...env }, encoding: 'utf8', timeout: 20_000 },
  );
  expect(result.status, result.stderr).toBe(0);
  return result.stdout.split('\n').filter(Boolean);
}

describe('keyhold completion', () => {
  it('registers a completion function for keyhold in bash', () => {
    const result = spawnSync('bash', ['--norc', '--noprofile', '-c', 'source "$1" && complete -p keyhold', 'bash', script], { encoding: 'utf8', timeout: 10_000 });
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout.trim()).toBe('complete -o bashdefault -o default -F _keyhold_yargs_completions keyhold');
  });

  it('completes `keyhold ke<TAB>` to key, `keyhold key <TAB>` to its subcommands and `keyhold serve --<TAB>` to its options', () => {
    expect(complete(['keyhold', 'ke'])).toEqual(['key']);
    expect(complete(['keyhold', 'key', ''])).toEqual(['generate', 'import', 'list', 'pub', 'assign', 'unassign', 'rm']);
    expect(complete(['keyhold', 'serve', '--'])).toEqual(expect.arrayContaining(['--listen', '--idle-lock', '--lock-after', '--config', '--log-level', '--vault']));
    expect(complete(['keyhold', 'serve', '--log-level', 'd'])).toEqual(['debug']);
  });

  it('gives bash plain words even when the login shell is zsh (yargs would answer in zsh format)', () => {
    expect(complete(['keyhold', 'key', ''], { SHELL: '/usr/bin/zsh', ZSH_NAME: 'zsh' })).toEqual(['generate', 'import', 'list', 'pub', 'assign', 'unassign', 'rm']);
  });

  it("the zsh script's query answers in zsh's name:description format, whatever the login shell", () => {
    const zshScript = keyhold(k, ['completion', 'zsh']).stdout;
    const query = /reply=\(\$\((.*) "\$\{words\[@\]\}"\)\)/.exec(zshScript)?.[1];
    expect(query).toMatch(/SHELL=zsh ZSH_NAME= keyhold --get-yargs-completions$/);
    const result = spawnSync('bash', ['--norc', '--noprofile', '-c', `COMP_CWORD=2 ${query!.replace(/COMP_\w+="[^"]*" /g, '')} keyhold key ''`], {
      env: { ...k.env, PATH: `${pathDir}:${process.env.PATH}`, SHELL: '/bin/bash' },
      encoding: 'utf8',
      timeout: 20_000,
    });
    expect(result.stdout.split('\n')).toEqual(expect.arrayContaining(['generate:generate a key in the vault and print its public line', 'rm:delete a key from the vault and every scope']));
  });

  it('prints the script of the shell named, else of $SHELL; another shell is a usage error', () => {
    expect(keyhold(k, ['completion', 'zsh']).stdout).toMatch(/^#compdef keyhold\n[\s\S]*SHELL=zsh ZSH_NAME= keyhold --get-yargs-completions/);
    expect(keyhold(k, ['completion'], { env: { SHELL: '/usr/bin/zsh' } }).stdout).toMatch(/^#compdef keyhold\n/);
    expect(keyhold(k, ['completion'], { env: { SHELL: '/bin/bash' } }).stdout).toMatch(/^###-begin-keyhold-completions-###\n[\s\S]*complete -o bashdefault/);
    const fish = keyhold(k, ['completion', 'fish']);
    expect(fish.status).toBe(2);
    expect(fish.stderr).toMatch(/^keyhold: .*"fish".*\n$/);
  });
});
