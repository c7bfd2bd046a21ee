// `keyhold completion [bash|zsh]`: yargs' own completion script. The script asks
// `keyhold --get-yargs-completions WORDS…` for the candidates, which yargs formats for the shell
// it finds in $SHELL (zsh: `name:description`). That is the login shell, not necessarily the one
// completing (a zsh user's bash, a system-wide bash completion file), so the script names its
// shell to the command it runs.
import yargs, { type Argv } from 'yargs';
import type { GlobalArgs } from './common.js';

export const COMPLETION_SHELLS = ['bash', 'zsh'] as const;
type Shell = (typeof COMPLETION_SHELLS)[number];

const defaultShell = (env: NodeJS.ProcessEnv): Shell => (/zsh/.test(env.SHELL ?? '') ? 'zsh' : 'bash');

/** yargs writes the script of the shell it detects in the environment: set it for the moment. */
export async function completionScript(shell: Shell): Promise<string> {
  const saved = { SHELL: process.env.SHELL, ZSH_NAME: process.env.ZSH_NAME };
  process.env.SHELL = `/bin/${shell}`;
  delete process.env.ZSH_NAME;
  let script = '';
  try {
    await yargs([])
      .scriptName('keyhold')
      .exitProcess(false)
      .completion('completion', false)
      .parseAsync(['completion'], {}, (_err, _argv, output) => {
        script = output;
      });
  } finally {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  }
  const query = 'keyhold --get-yargs-completions';
  if (!script.includes(query)) throw new Error('yargs completion script without its query');
  return script.replaceAll(query, `SHELL=${shell} ZSH_NAME= ${query}`).trimEnd() + '\n';
}

export function completionCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'completion [shell]',
    'print a completion script for bash or zsh (default: the shell of $SHELL)',
    (c) =>
      c
        .positional('shell', { type: 'string', choices: COMPLETION_SHELLS, describe: 'the shell to complete in' })
        .example('keyhold completion bash > ~/.local/share/bash-completion/completions/keyhold', '')
        .example('keyhold completion zsh > ~/.zfunc/_keyhold   # with fpath=(~/.zfunc $fpath) before compinit', ''),
    async (args) => {
      process.stdout.write(await completionScript(args.shell ?? defaultShell(process.env)));
    },
  );
}
