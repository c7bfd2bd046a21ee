#!/usr/bin/env node
// Writes keyhold(1), man/keyhold.1, from the command definitions the CLI itself registers
// (dist/cli/commands.js: run `npx tsc -p tsconfig.json` first) and the prose below for what is
// not a command (configuration, exit status, environment, files). Each registration function is
// handed a recorder in place of yargs: it keeps commands, positionals, options and examples and
// lets every other call through, so the page cannot describe options the CLI does not have.
// `--stdout` prints the page instead (test/e2e/man-page.test.ts compares it with the committed one).
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..');
const { COMMANDS } = await import(join(REPO, 'dist', 'cli', 'commands.js'));
const { globalOptions } = await import(join(REPO, 'dist', 'cli', 'common.js'));
const { version } = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8'));

/** A command as registered: `spec` as yargs takes it (`generate <scope>`), its words below. */
function node(spec = '', describe = '') {
  return { spec, describe, commands: [], positionals: [], options: [], examples: [] };
}

function recorder(into) {
  const proxy = new Proxy(
    {},
    {
      get(_target, prop) {
        if (typeof prop !== 'string' || prop === 'then') return undefined;
        switch (prop) {
          case 'command':
            return (spec, describe, builder) => {
              const child = node(spec, typeof describe === 'string' ? describe : '');
              into.commands.push(child);
              if (typeof builder === 'function') builder(recorder(child));
              return proxy;
            };
          case 'positional':
            return (name, options = {}) => (into.positionals.push({ name, ...options }), proxy);
          case 'option':
            return (name, options = {}) => (into.options.push({ name, ...options }), proxy);
          case 'example':
            return (command) => (into.examples.push(command), proxy);
          default:
            return () => proxy;
        }
      },
    },
  );
  return proxy;
}

const root = node('keyhold');
globalOptions(recorder(root));
for (const register of COMMANDS) register(recorder(root));

// roff: text escaped so that no input character is taken for a request or an escape.
// Characters outside ASCII (…, →) as groff's \[uXXXX], which every output device can render.
const escape = (text) =>
  text
    .replace(/\\/g, '\\e')
    .replace(/-/g, '\\-')
    .replace(/^([.'])/gm, '\\&$1')
    .replace(/[^\x00-\x7f]/gu, (c) => `\\[u${c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0')}]`);
/** Descriptions: `code` in bold. */
const prose = (text) => escape(text).replace(/`([^`]+)`/g, '\\fB$1\\fR');
const bold = (text) => `\\fB${escape(text)}\\fR`;
const italic = (text) => `\\fI${escape(text)}\\fR`;

function optionName(option) {
  const aliases = [option.alias ?? []].flat();
  const flag = (name) => (name.length === 1 ? `-${name}` : `--${name}`);
  const names = [option.name, ...aliases].sort((a, b) => a.length - b.length).map((n) => bold(flag(n)));
  let value = '';
  if (option.choices) value = ` ${option.choices.map(italic).join('|')}`;
  else if (option.type === 'string') value = ` ${italic('value')}`;
  else if (option.type === 'number') value = ` ${italic('N')}`;
  return names.join(', ') + value;
}

function optionText(option) {
  const notes = [];
  const describe = option.describe ?? option.description ?? '';
  if (option.array && !describe.includes('repeatable')) notes.push('repeatable');
  const shown = option.default;
  if (shown !== undefined && shown !== false && shown !== '' && !(Array.isArray(shown) && shown.length === 0)) notes.push(`default: ${shown}`);
  if (option.demandOption) notes.push('required');
  return prose(describe + (notes.length ? ` (${notes.join('; ')})` : ''));
}

const visible = (option) => !option.hidden && option.describe !== false;

function synopsis(words, command) {
  const [name, ...args] = command.spec.split(/\s+/);
  const parts = [...words, name].map(bold);
  for (const arg of args) {
    const optional = arg.startsWith('[');
    const inner = arg.slice(1, -1).replace(/\.\.$/, '');
    const rendered = italic(inner) + (arg.includes('..') ? '\\ ...' : '');
    parts.push(optional ? `[${rendered}]` : rendered);
  }
  return parts.join(' ');
}

const lines = [];
const out = (...more) => lines.push(...more);

function describeCommand(words, command) {
  const name = command.spec.split(/\s+/)[0];
  if (command.commands.length > 0) {
    // A group (`key`, `token`…): its subcommands are described one by one.
    for (const sub of command.commands) describeCommand([...words, name], sub);
    return;
  }
  out('.TP', synopsis(words, command), prose(command.describe));
  const positionals = command.positionals.filter((p) => p.describe || p.choices);
  const options = command.options.filter(visible);
  if (positionals.length + options.length > 0) out('.RS');
  for (const positional of positionals) {
    const choices = positional.choices ? `: ${positional.choices.join(', ')}` : '';
    out('.TP', italic(positional.name), optionText({ ...positional, describe: (positional.describe ?? 'one of') + choices }));
  }
  for (const option of options) out('.TP', optionName(option), optionText(option));
  if (positionals.length + options.length > 0) out('.RE');
  if (command.examples.length > 0) out('.IP', command.examples.length > 1 ? 'Examples:' : 'Example:', '.nf', ...command.examples.map(bold), '.fi');
}

out(
  `.TH KEYHOLD 1 "" "keyhold ${version}" "User Commands"`,
  '.\\" Generated by scripts/build-man.mjs from the command definitions; do not edit.',
  // No hyphenation, ragged right: command and option names stay whole.
  '.nh',
  '.ad l',
  '.SH NAME',
  'keyhold \\- an SSH agent whose keys live in an encrypted vault',
  '.SH SYNOPSIS',
  '.B keyhold',
  '.I command',
  '.RI [ options ]',
  '.br',
  '\\fBeval "$(keyhold unlock \\-\\-scope\\fR \\fIscope\\fR\\fB)"\\fR',
  '.SH DESCRIPTION',
  prose('keyhold keeps SSH keys and secrets in an encrypted vault (SQLite) and signs with them as an SSH agent. ' +
    'The daemon, `keyhold serve`, serves one agent socket per scope: point SSH_AUTH_SOCK at one and ssh, ssh-add, ' +
    'git and `ssh-keygen -Y sign` use the keys of that scope, and nothing else. It also serves a control socket for ' +
    'the other keyhold commands, and token-gated listeners through which containers sign (`keyhold bridge`).'),
  '.PP',
  prose('A scope may have a policy, which allows, refuses or asks to confirm each sign request by who asks, for which ' +
    'host or namespace, and what is signed. Every signature, refusal and change is written to an audit log whose ' +
    'lines are chained with a MAC, so that `keyhold audit verify` finds any line edited, removed or reordered.'),
  '.PP',
  prose('The vault opens with a passphrase, or with other unlock factors (an SSH agent key, the desktop Secret ' +
    'Service). `keyhold unlock` starts the daemon if none runs. Commands that change the vault go through a running, ' +
    'unlocked daemon when there is one, and then need no passphrase.'),
  '.SH OPTIONS',
  'Every command takes these options:',
);
for (const option of root.options.filter(visible)) out('.TP', optionName(option), optionText(option));
out('.TP', `${bold('-h')}, ${bold('--help')}`, 'Show the help of the command.', '.TP', bold('--version'), 'Print the version of keyhold.');
out('.SH COMMANDS');
for (const command of root.commands) describeCommand(['keyhold'], command);

const section = (title, ...body) => out(`.SH ${title}`, ...body);
const item = (term, text) => out('.TP', term, prose(text));

section('PASSPHRASE SOURCES', prose('Commands that open the vault take its passphrase from the first of these that applies:'));
item(`${bold('--passphrase-file')} ${italic('file')}`, 'or KEYHOLD_PASSPHRASE_FILE; `-` reads standard input.');
item(italic('$CREDENTIALS_DIRECTORY/keyhold-passphrase'), 'a systemd credential (LoadCredential= or LoadCredentialEncrypted=).');
item('a running, unlocked daemon', 'for this vault: then no passphrase is needed at all.');
item(bold('KEYHOLD_PASSPHRASE'), 'accepted with a warning: the environment of a process is visible to others of the same user.');
item('a prompt', 'when standard input is a terminal.');
out('.PP', prose('Otherwise the command exits 3 naming these options. An empty passphrase is refused.'));

section(
  'CONFIGURATION',
  prose('`keyhold serve` reads the [serve] table of a TOML file: `--config` FILE, else $KEYHOLD_CONFIG, else ' +
    '$XDG_CONFIG_HOME/keyhold/config.toml (~/.config/keyhold/config.toml), which may be absent. A flag wins over ' +
    'the environment, which wins over the file, which wins over the defaults. An unknown table or key, a value of the ' +
    'wrong type or a bad value, and a TOML syntax error stop serve with exit 2 naming the file, the line and the key; ' +
    'so does a file that group or others may write (it names programs the daemon runs).'),
  '.PP',
  '.RS',
  '.nf',
  '[serve]',
  'listen = ["unix:/run/keyhold/signer.sock", "tcp:127.0.0.1:7022"]',
  'scopes = ["web", "ops"]',
  'idle_lock = "30m"',
  'lock_after = "8h"',
  'confirm_program = "/usr/bin/ssh\\-askpass"',
  'confirm_timeout = "30s"',
  'log_level = "info"',
  'offline_grace = "60s"',
  '.fi',
  '.RE',
);
item(bold('listen'), 'token-gated listeners for containers, unix:PATH or tcp:HOST:PORT; `--listen` replaces the list.');
item(bold('scopes'), 'scopes whose sockets exist even while the vault is locked (`ssh-add -l` then says "no identities" rather than "no such file").');
item(bold('idle_lock'), 'lock after this long without a request (`--idle-lock`).');
item(bold('lock_after'), 'lock this long after each unlock, busy or not (`--lock-after`).');
item(bold('confirm_program'), 'absolute path of an SSH_ASKPASS-style program asked to confirm requests (`--confirm-program`); default: $SSH_ASKPASS when a display is set.');
item(bold('confirm_timeout'), 'how long a request waits for a confirmation before it is refused, at most 1h (`--confirm-timeout`); default 30s.');
item(bold('log_level'), 'fatal, error, warn, info, debug, trace or silent (`--log-level`, then $KEYHOLD_LOG_LEVEL); default info.');
item(bold('offline_grace'), 'for PostgreSQL vaults (planned): how long to sign from cache without the database. Accepted and checked; no effect on a SQLite vault yet.');
out('.PP', prose('Durations are a number and a unit: 90s, 30m, 8h, 7d.'));

section('EXIT STATUS');
for (const [code, meaning] of [
  ['0', 'success.'],
  ['1', 'an error.'],
  ['2', 'a usage error: a bad option, argument or config file.'],
  ['3', 'the vault is locked, or no daemon runs (`keyhold status`), or no passphrase source applies.'],
  ['4', 'a wrong passphrase or a refused factor, or a request refused by policy (`keyhold policy check`), or a refused token (`keyhold bridge`).'],
  ['5', 'not found: no such vault, scope, key, token or secret.'],
]) item(bold(code), meaning);
out('.PP', prose("`keyhold env` exits with its command's code."));

section('ENVIRONMENT');
for (const [name, meaning] of [
  ['KEYHOLD_VAULT', 'the vault file, when `--vault` is not given.'],
  ['KEYHOLD_RUNTIME_DIR', 'the runtime directory (sockets, daemon.pid), instead of $XDG_RUNTIME_DIR/keyhold.'],
  ['KEYHOLD_CONFIG', 'the config file, when `--config` is not given.'],
  ['KEYHOLD_LOG_LEVEL', "the daemon's log level, over log_level of the config file and under `--log-level`."],
  ['KEYHOLD_PASSPHRASE_FILE', 'a file holding the vault passphrase, when `--passphrase-file` is not given.'],
  ['KEYHOLD_PASSPHRASE', 'the vault passphrase itself (accepted with a warning).'],
  ['KEYHOLD_TOKEN', 'the token of `keyhold bridge` and `keyhold env --connect`, when `--token-file` is not given.'],
  ['CREDENTIALS_DIRECTORY', 'set by systemd: keyhold-passphrase in it is a passphrase source.'],
  ['XDG_RUNTIME_DIR, XDG_DATA_HOME, XDG_CONFIG_HOME', 'where the runtime directory, the vault and the config file are by default.'],
  ['SSH_AUTH_SOCK', 'the agent socket clients use; `keyhold unlock --scope S` prints the line that sets it. An SSH agent there is asked for the ssh-agent unlock factor.'],
  ['SSH_ASKPASS, DISPLAY, WAYLAND_DISPLAY', 'the default confirm program: $SSH_ASKPASS when a display is set.'],
  ['SHELL', 'the syntax `keyhold unlock` prints (csh when it ends in csh) and the shell of `keyhold completion`.'],
]) item(bold(name), meaning);

section('FILES');
for (const [name, meaning] of [
  ['~/.local/share/keyhold/vault.db', 'the vault (SQLite, encrypted); with vault.db.keys, its wrapped keys per unlock factor. Both 0600: a vault file group or others may read or write is refused.'],
  ['~/.local/share/keyhold/vault.db.audit.jsonl', 'the audit log, one JSON object a line, each chained to the one before by a MAC.'],
  ['$XDG_RUNTIME_DIR/keyhold/', 'the runtime directory (0700; /tmp/keyhold-UID without XDG_RUNTIME_DIR): control.sock, scopes/SCOPE.sock, daemon.pid, and daemon.log of a daemon `keyhold unlock` started.'],
  ['~/.config/keyhold/config.toml', 'the config file (see CONFIGURATION).'],
]) item(italic(name), meaning);

section('SEE ALSO', '.BR ssh\\-agent (1),', '.BR ssh\\-add (1),', '.BR ssh (1),', '.BR ssh\\-keygen (1),', '.BR systemd.exec (5)');

const page = lines.join('\n') + '\n';
if (process.argv.includes('--stdout')) process.stdout.write(page);
else {
  mkdirSync(join(REPO, 'man'), { recursive: true });
  writeFileSync(join(REPO, 'man', 'keyhold.1'), page);
}
