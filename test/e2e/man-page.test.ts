// keyhold(1): man/keyhold.1 is what scripts/build-man.mjs writes from the command definitions
// (so it cannot drift from the CLI), man renders it without a warning, and it covers every
// command and option yargs' own help lists, the exit codes, files, environment and SEE ALSO.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import yargs from 'yargs';
import { COMMANDS } from '../../src/cli/commands.js';
import { globalOptions } from '../../src/cli/common.js';
import { REPO } from '../helpers/keyhold.js';

const PAGE = join(REPO, 'man', 'keyhold.1');
const GLOBAL_OPTIONS = ['--vault', '--json', '--passphrase-file', '--help', '--version'];

/** `keyhold WORDS… --help` from yargs itself, in this process, unwrapped: one line per command or option. */
async function help(words: string[]): Promise<string> {
  const parser = globalOptions(yargs([]).scriptName('keyhold').exitProcess(false).wrap(null));
  for (const register of COMMANDS) register(parser);
  let text = '';
  await parser.parseAsync([...words, '--help'], {}, (_err, _argv, output) => {
    text = output;
  });
  return text;
}

/** The subcommands a help text lists under "Commands:" (`keyhold key generate <scope>` → generate). */
const subcommandsIn = (text: string, words: string[]): string[] =>
  text.includes('\nCommands:\n')
    ? [...text.slice(text.indexOf('\nCommands:\n')).split('\n\n')[0]!.matchAll(new RegExp(`^  keyhold ${words.map((w) => `${w} `).join('')}([a-z][a-z-]*)`, 'gm'))].map((m) => m[1]!)
    : [];

/** The options a help text lists, short and long (`-n, --lines` → -n, --lines). */
const optionsIn = (text: string): string[] =>
  text
    .slice(text.indexOf('\nOptions:\n'))
    .split('\n')
    .flatMap((line) => /^ {2}(?:(-[a-zA-Z])(?:, |\s))?\s*(--[a-z][a-z0-9-]*)?/.exec(line)?.slice(1) ?? [])
    .filter((name): name is string => name !== undefined);

/** The page as man renders it, wide enough that no line wraps; and what man and groff warned. */
let rendered: string;
beforeAll(() => {
  const result = spawnSync('man', ['--warnings', '-l', PAGE], { env: { ...process.env, MANWIDTH: '250', MAN_KEEP_FORMATTING: '' }, encoding: 'utf8', timeout: 30_000 });
  expect(result.stderr).toBe('');
  expect(result.status).toBe(0);
  rendered = result.stdout;
});

describe('keyhold(1)', () => {
  it('is what scripts/build-man.mjs generates from the command definitions (run it after changing a command)', () => {
    const generated = spawnSync(process.execPath, [join(REPO, 'scripts', 'build-man.mjs'), '--stdout'], { encoding: 'utf8', timeout: 30_000 });
    expect(generated.stderr).toBe('');
    expect(generated.stdout, 'man/keyhold.1 is stale: run `node scripts/build-man.mjs` after `npx tsc -p tsconfig.json`').toBe(readFileSync(PAGE, 'utf8'));
  });

  it('renders without a warning in groff -ww and man --warnings', () => {
    const groff = spawnSync('groff', ['-man', '-ww', '-z', PAGE], { encoding: 'utf8', timeout: 30_000 });
    expect(groff.stderr).toBe('');
    expect(groff.status).toBe(0);
    const sections = rendered.split('\n').filter((line) => /^[A-Z][A-Z ]+$/.test(line));
    expect(sections).toEqual(['NAME', 'SYNOPSIS', 'DESCRIPTION', 'OPTIONS', 'COMMANDS', 'PASSPHRASE SOURCES', 'CONFIGURATION', 'EXIT STATUS', 'ENVIRONMENT', 'FILES', 'SEE ALSO']);
  });

  it('describes every command and subcommand yargs knows, with each option its help lists', async () => {
    // Each command's block: from its `keyhold …` heading to the next one.
    const blocks = new Map<string, string>();
    const commandsSection = rendered.slice(rendered.indexOf('\nCOMMANDS\n'), rendered.indexOf('\nPASSPHRASE SOURCES\n'));
    for (const block of commandsSection.split(/\n(?= {7}keyhold )/).slice(1)) {
      const heading = block.trim().split('\n')[0]!;
      blocks.set(heading.split(' ').filter((w) => /^[a-z][a-z-]*$/.test(w)).join(' '), block);
    }
    const leaves: string[][] = [];
    for (const command of subcommandsIn(await help([]), [])) {
      const subcommands = subcommandsIn(await help([command]), [command]);
      if (subcommands.length === 0) leaves.push([command]);
      else for (const sub of subcommands) leaves.push([command, sub]);
    }
    expect(leaves.length).toBeGreaterThan(30);
    const missing: string[] = [];
    for (const words of leaves) {
      const heading = ['keyhold', ...words].join(' ');
      const block = [...blocks].find(([name]) => name === heading || name.startsWith(`${heading} `))?.[1];
      if (!block) {
        missing.push(heading);
        continue;
      }
      for (const option of optionsIn(await help(words))) {
        if (GLOBAL_OPTIONS.includes(option)) continue;
        if (!new RegExp(`(^|[\\s,])${option}(\\s|,|$)`, 'm').test(block)) missing.push(`${heading} ${option}`);
      }
    }
    expect(missing).toEqual([]);
    for (const option of GLOBAL_OPTIONS) expect(rendered.slice(rendered.indexOf('\nOPTIONS\n'), rendered.indexOf('\nCOMMANDS\n'))).toContain(option);
  });

  it('gives the exit codes, files, environment variables and SEE ALSO ssh-agent(1), ssh-add(1)', () => {
    const section = (name: string) => rendered.slice(rendered.indexOf(`\n${name}\n`) + 1).split(/\n(?=[A-Z])/)[0]!;
    for (const code of ['0', '1', '2', '3', '4', '5']) expect(section('EXIT STATUS')).toMatch(new RegExp(`^ {7}${code}\\s`, 'm'));
    for (const file of ['vault.db', 'vault.db.audit.jsonl', '$XDG_RUNTIME_DIR/keyhold/', 'config.toml']) expect(section('FILES')).toContain(file);
    for (const name of ['KEYHOLD_VAULT', 'KEYHOLD_RUNTIME_DIR', 'KEYHOLD_CONFIG', 'KEYHOLD_LOG_LEVEL', 'KEYHOLD_PASSPHRASE_FILE', 'KEYHOLD_PASSPHRASE', 'KEYHOLD_TOKEN', 'CREDENTIALS_DIRECTORY', 'SSH_AUTH_SOCK', 'SSH_ASKPASS']) {
      expect(section('ENVIRONMENT')).toMatch(new RegExp(`^ {7}${name}\\b`, 'm'));
    }
    for (const key of ['listen', 'scopes', 'idle_lock', 'lock_after', 'confirm_program', 'confirm_timeout', 'log_level', 'offline_grace']) {
      expect(section('CONFIGURATION')).toMatch(new RegExp(`^ {7}${key}(\\s|$)`, 'm'));
    }
    expect(section('SEE ALSO')).toMatch(/ssh-agent\(1\), ssh-add\(1\)/);
  });
});
