// `keyhold env` runs a command with a scope's secrets in its environment; `keyhold export` prints
// them for tools that want a file. Variables that change how programs load or run are refused
// unless allowed by name: a secret store must not become a way to inject code.
import { accessSync, constants, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { KeyholdError, notFound, QuietExit, usageError } from '../errors.js';
import { execReplacing } from '../libc.js';
import { checkScopeName, SECRET_NAME_PATTERN, type SecretValue } from '../vault/vault.js';
import { withVault, type GlobalArgs } from './common.js';
import { asUtf8 } from './secret.js';

/**
 * Who reads which variables to decide what to run, load, fetch or trust. A secret with such a name
 * would turn whoever can write the scope into whoever runs code in the next `git status`, `npm run`
 * or `make`, so it is skipped unless allowed by its exact name.
 *
 * A denylist, not an allowlist: secrets have whatever names the application chose (DATABASE_URL,
 * STRIPE_KEY), so no allowlist could name them, and one that made every secret need `--allow`
 * would be bypassed by habit. Where a tool reads its whole configuration from a prefix (git, npm,
 * pip, cargo), the family is denied, so settings it adds later are covered too; where it reads a
 * few names and the rest of the prefix is a common place for credentials (SSH_PRIVATE_KEY,
 * DOCKER_PASSWORD), only those names are.
 */
interface Reader {
  /** Who reads them, with the verb, as the warning says it: "git reads". */
  readonly who: string;
  /** What for, when not "to decide what to run, load or trust". */
  readonly purpose?: string;
  readonly names?: readonly string[];
  readonly prefixes?: readonly string[];
}

const READERS: readonly Reader[] = [
  {
    who: 'the dynamic loader and libc read',
    prefixes: ['LD_', 'DYLD_', 'MALLOC_'],
    names: [
      'GCONV_PATH', 'GETCONF_DIR', 'GLIBC_TUNABLES', 'HOSTALIASES', 'LOCALDOMAIN', 'LOCPATH', 'MUSL_LOCPATH',
      'NIS_PATH', 'NLSPATH', 'PATH_LOCALE', 'RESOLV_HOST_CONF', 'RES_OPTIONS', 'TZDIR', 'TERMINFO',
      'TERMINFO_DIRS', 'TERMCAP', 'TERMPATH',
    ],
  },
  { who: 'programs that run others read', names: ['PATH', 'HOME', 'TMPDIR', 'SHELL'] },
  {
    who: 'shells read',
    prefixes: ['BASH_'],
    names: [
      'ENV', 'SHELLOPTS', 'BASHOPTS', 'PS0', 'PS1', 'PS2', 'PS3', 'PS4', 'PROMPT_COMMAND', 'IFS', 'CDPATH',
      'GLOBIGNORE', 'ZDOTDIR', 'FPATH', 'NULLCMD', 'READNULLCMD', 'TMPPREFIX',
    ],
  },
  {
    who: 'programs that start an editor, pager or prompt read',
    names: [
      'EDITOR', 'VISUAL', 'FCEDIT', 'SUDO_EDITOR', 'PAGER', 'MANPAGER', 'SYSTEMD_PAGER', 'SYSTEMD_EDITOR', 'BROWSER',
      'LESS', 'LESSOPEN', 'LESSCLOSE', 'LESSKEY', 'LESSKEYIN', 'LESSKEY_SYSTEM', 'LESSKEYIN_SYSTEM', 'LESSEDIT',
      'LESSSECURE', 'LESSHISTFILE', 'SUDO_ASKPASS',
    ],
  },
  { who: 'git and other XDG programs read', prefixes: ['XDG_'] },
  { who: 'git reads', prefixes: ['GIT_'] },
  {
    who: 'OpenSSH reads',
    names: [
      'SSH_AUTH_SOCK', 'SSH_AGENT_PID', 'SSH_ASKPASS', 'SSH_ASKPASS_REQUIRE', 'SSH_SK_PROVIDER', 'SSH_SK_HELPER',
      'SSH_PKCS11_HELPER', 'SSH_CONNECTION', 'SSH_CLIENT', 'SSH_TTY', 'SSH_ORIGINAL_COMMAND', 'SSH_USER_AUTH',
    ],
  },
  { who: 'GnuPG reads', names: ['GNUPGHOME'] },
  {
    who: 'TLS clients read',
    prefixes: ['OPENSSL_'],
    names: ['SSL_CERT_FILE', 'SSL_CERT_DIR', 'SSLKEYLOGFILE', 'CURL_CA_BUNDLE', 'CURL_HOME', 'REQUESTS_CA_BUNDLE', 'AWS_CA_BUNDLE', 'WGETRC'],
  },
  {
    who: 'HTTP clients read', purpose: 'to choose where requests go',
    names: ['HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'FTP_PROXY', 'NO_PROXY', 'SOCKS_PROXY', 'RSYNC_PROXY', 'WS_PROXY', 'WSS_PROXY'],
  },
  { who: 'Node.js reads', prefixes: ['NODE_'] },
  { who: 'npm, yarn, pnpm and corepack read', prefixes: ['NPM_CONFIG_', 'YARN_', 'PNPM_', 'COREPACK_'] },
  { who: 'Python and its installers read', prefixes: ['PYTHON', 'PIP_', 'UV_', 'POETRY_'], names: ['VIRTUAL_ENV', 'IPYTHONDIR'] },
  { who: 'Ruby, RubyGems and Bundler read', prefixes: ['RUBY', 'GEM_', 'BUNDLE_'], names: ['GEMRC', 'IRBRC'] },
  { who: 'Perl reads', prefixes: ['PERL'] },
  {
    who: 'the JVM and its build tools read',
    prefixes: ['JAVA_'],
    names: ['_JAVA_OPTIONS', 'JDK_JAVA_OPTIONS', 'CLASSPATH', 'MAVEN_OPTS', 'MAVEN_ARGS', 'MAVEN_HOME', 'M2_HOME', 'GRADLE_OPTS', 'GRADLE_USER_HOME', 'SBT_OPTS', 'ANT_OPTS', 'ANT_HOME'],
  },
  {
    who: 'make and C toolchains read',
    prefixes: ['PKG_CONFIG'],
    names: ['MAKEFLAGS', 'MFLAGS', 'GNUMAKEFLAGS', 'MAKEFILES', 'CC', 'CXX', 'CPP', 'CFLAGS', 'CXXFLAGS', 'CPPFLAGS', 'LDFLAGS'],
  },
  {
    who: 'the Go toolchain reads',
    prefixes: ['CGO_'],
    names: [
      'GOFLAGS', 'GOROOT', 'GOPATH', 'GOBIN', 'GOTOOLCHAIN', 'GOENV', 'GOPROXY', 'GONOPROXY', 'GOSUMDB', 'GONOSUMDB',
      'GONOSUMCHECK', 'GOINSECURE', 'GOPRIVATE', 'GOVCS', 'GOWORK', 'GOCACHE', 'GOMODCACHE', 'GOEXPERIMENT', 'GOTMPDIR',
    ],
  },
  { who: 'cargo, rustup and rustc read', prefixes: ['CARGO_', 'RUSTUP_', 'RUSTC', 'RUSTDOC'], names: ['RUSTFLAGS'] },
  {
    who: 'container, cluster and cloud CLIs read',
    names: ['KUBECONFIG', 'DOCKER_HOST', 'DOCKER_CONTEXT', 'DOCKER_CONFIG', 'DOCKER_CERT_PATH', 'BUILDKIT_HOST', 'AWS_CONFIG_FILE', 'AWS_SHARED_CREDENTIALS_FILE'],
  },
  { who: 'keyhold reads', prefixes: ['KEYHOLD_'] },
];

/**
 * Names inside a denied family that their tool reads only as a label or as a credential it sends
 * where the user's own configuration says: common application secrets, harmless to pass.
 */
const ORDINARY_IN_FAMILY = new Set(['NODE_ENV', 'NODE_AUTH_TOKEN', 'CARGO_REGISTRY_TOKEN', 'GEM_HOST_API_KEY']);

/**
 * Why `name` is refused, or null. Letter case is ignored: several programs read lowercase forms
 * (http_proxy, npm_config_*), and so does anything that treats the environment as case-insensitive.
 */
export function deniedBecause(name: string): string | null {
  const upper = name.toUpperCase();
  if (ORDINARY_IN_FAMILY.has(upper)) return null;
  for (const { who, purpose, names, prefixes } of READERS) {
    const family = prefixes?.find((p) => upper.startsWith(p));
    const matched = family !== undefined ? `${family}*` : names?.includes(upper) ? upper : null;
    if (matched === null) continue;
    const anyCase = name === upper ? '' : ' in any letter case';
    return `${who} ${matched}${anyCase} ${purpose ?? 'to decide what to run, load or trust'}`;
  }
  return null;
}

export function deniedVariable(name: string): boolean {
  return deniedBecause(name) !== null;
}

export interface SecretSelection {
  scopes: string[];
  prefix: string;
  only: string[] | null;
  allow: Set<string>;
}

/** The variables to set, in order: later scopes win, --only filters, --prefix renames, denylist skips. */
export function selectVariables(secrets: SecretValue[], selection: SecretSelection, warn: (m: string) => void): Map<string, Buffer> {
  const byName = new Map<string, Buffer>();
  for (const secret of secrets) byName.set(secret.name, secret.value);
  if (selection.only) {
    const missing = selection.only.filter((n) => !byName.has(n));
    if (missing.length > 0) {
      throw notFound(`no secret ${missing.join(', ')} in scope${selection.scopes.length > 1 ? 's' : ''} ${selection.scopes.join(', ')}`, 'see `keyhold secret list SCOPE`');
    }
  }
  const out = new Map<string, Buffer>();
  for (const [name, value] of byName) {
    if (selection.only && !selection.only.includes(name)) continue;
    const variable = selection.prefix + name;
    const denied = selection.allow.has(variable) ? null : deniedBecause(variable);
    if (denied !== null) {
      warn(`skipped ${variable}: ${denied} (pass --allow ${variable} to set it anyway)`);
      continue;
    }
    if (value.includes(0)) {
      throw new KeyholdError(`secret ${name} contains a NUL byte, which an environment variable cannot hold`, 'store it encoded (e.g. base64)');
    }
    out.set(variable, value);
  }
  return out;
}

function selectionOptions<T>(y: Argv<T>) {
  return y
    .option('scope', { alias: 's', type: 'string', array: true, demandOption: true, describe: 'scope whose secrets to use (repeatable; later wins)' })
    .option('prefix', { type: 'string', default: '', describe: 'prepend this to every variable name' })
    .option('only', { type: 'string', describe: 'only these secrets: NAME,NAME…' })
    .option('allow', { type: 'string', array: true, default: [] as string[], describe: 'set this denied variable anyway; the exact name, as the warning gives it (repeatable)' });
}

function parseSelection(args: { scope: string[]; prefix: string; only?: string | undefined; allow: string[] }): SecretSelection {
  const scopes = args.scope.map(checkScopeName);
  if (args.prefix !== '' && !/^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(args.prefix)) {
    throw usageError(`invalid --prefix ${JSON.stringify(args.prefix.slice(0, 70))}`, 'letters, digits and _, not starting with a digit');
  }
  let only: string[] | null = null;
  if (args.only !== undefined) {
    only = args.only.split(',').map((n) => n.trim()).filter(Boolean);
    const bad = only.find((n) => !SECRET_NAME_PATTERN.test(n));
    if (only.length === 0 || bad !== undefined) throw usageError(`invalid --only ${JSON.stringify(args.only.slice(0, 70))}`, 'NAME,NAME…');
  }
  return { scopes, prefix: args.prefix, only, allow: new Set(args.allow) };
}

/** MAX_ARG_STRLEN: the kernel's limit on one argv or environment string, NUL included. */
const MAX_ENV_STRING = 32 * 4096;

const warnLine = (message: string) => process.stderr.write(`keyhold: warning: ${message}\n`);

/** Finds `command` as execvp would: a path with a slash as is, else the first executable on PATH. */
function resolveCommand(command: string): string | null {
  const executable = (path: string) => {
    try {
      accessSync(path, constants.X_OK);
      return statSync(path).isFile();
    } catch {
      return false;
    }
  };
  if (command.includes('/')) return command;
  for (const dir of (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(':')) {
    const candidate = join(dir || '.', command);
    if (executable(candidate)) return candidate;
  }
  return null;
}

/** Quotes bytes for POSIX sh: single quotes, each ' as '\''. Any byte but NUL survives. */
export function shellQuoteBytes(value: Buffer): Buffer {
  const parts: Buffer[] = [Buffer.from("'")];
  let start = 0;
  for (let i = 0; i < value.length; i++) {
    if (value[i] === 0x27) {
      parts.push(value.subarray(start, i), Buffer.from("'\\''"));
      start = i + 1;
    }
  }
  parts.push(value.subarray(start), Buffer.from("'"));
  return Buffer.concat(parts);
}

export function formatExport(variables: Map<string, Buffer>, format: 'env' | 'json' | 'shell'): Buffer {
  if (format === 'json') {
    const doc: Record<string, string> = {};
    for (const [name, value] of variables) {
      const text = asUtf8(value);
      if (text === null) throw new KeyholdError(`${name} is not valid UTF-8, which JSON cannot carry`, 'use --format shell or env');
      doc[name] = text;
    }
    return Buffer.from(JSON.stringify(doc, null, 2) + '\n');
  }
  const lines: Buffer[] = [];
  for (const [name, value] of variables) {
    lines.push(Buffer.from(`${format === 'shell' ? 'export ' : ''}${name}=`), shellQuoteBytes(value), Buffer.from('\n'));
  }
  return Buffer.concat(lines);
}

export function envCommand(yargs: Argv<GlobalArgs>) {
  return yargs
    .command(
      'env [command..]',
      "run a command with the scopes' secrets added to its environment; exits with its code",
      (c) =>
        selectionOptions(c)
          .positional('command', { type: 'string', array: true, describe: 'the command and its arguments, after --' })
          .example('keyhold env -s ci-production -- make deploy', ''),
      async (args) => {
        const selection = parseSelection(args);
        // The command's words exactly as given: yargs would turn "007" into 7.
        const raw = hideBin(process.argv);
        const separator = raw.indexOf('--');
        const argv = separator < 0 ? [] : raw.slice(separator + 1);
        if (argv.length === 0) throw usageError('name the command to run after --', 'keyhold env -s SCOPE -- CMD ARGS…');
        const secrets = await withVault(args, (api) => api.secretValues(selection.scopes));
        const variables = selectVariables(secrets, selection, warnLine);
        const path = resolveCommand(argv[0]!);
        if (!path) {
          process.stderr.write(`keyhold: ${argv[0]}: command not found\n`);
          throw new QuietExit(127);
        }
        for (const [name, value] of variables) {
          if (name.length + 1 + value.length + 1 > MAX_ENV_STRING) {
            throw new KeyholdError(
              `secret ${name} is ${value.length} bytes; Linux limits one environment variable to 128 KiB`,
              'write it to a file with `keyhold secret get` instead',
            );
          }
        }
        const env = new Map<string, Buffer>();
        for (const [name, value] of Object.entries(process.env)) if (value !== undefined) env.set(name, Buffer.from(value));
        // keyhold's own secret input is not the command's business.
        env.delete('KEYHOLD_PASSPHRASE');
        for (const [name, value] of variables) env.set(name, value);
        const envp = [...env].map(([name, value]) => Buffer.concat([Buffer.from(`${name}=`), value]));
        // exec, not spawn: the command takes over this process, so signals reach it directly, its
        // exit status (or the signal that killed it) is ours, and no keyhold process stays behind
        // holding the values.
        const error = execReplacing(path, argv.map((a) => Buffer.from(a)), envp);
        for (const value of variables.values()) value.fill(0);
        const why = error === 'E2BIG' ? 'E2BIG: the environment and arguments are too large for one process' : error;
        process.stderr.write(`keyhold: cannot run ${argv[0]}: ${why}\n`);
        throw new QuietExit(error === 'ENOENT' ? 127 : 126);
      },
    )
    .command(
      'export',
      "print the scopes' secrets as env (NAME='v'), shell (export NAME='v') or JSON",
      (c) =>
        selectionOptions(c).option('format', { choices: ['env', 'json', 'shell'] as const, default: 'env' as const, describe: 'output format' }),
      async (args) => {
        const selection = parseSelection(args);
        const secrets = await withVault(args, (api) => api.secretValues(selection.scopes));
        const variables = selectVariables(secrets, selection, warnLine);
        process.stdout.write(formatExport(variables, args.format));
      },
    );
}
