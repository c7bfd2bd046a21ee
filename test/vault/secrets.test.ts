// The secret store in the vault (set/get/list/rm/secretValues) and the pure parts of `keyhold env`
// and `keyhold export`: the denylist, the selection (scopes, --only, --prefix, --allow), sh quoting
// and the three export formats.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deniedBecause, deniedVariable, formatExport, selectVariables, shellQuoteBytes, type SecretSelection } from '../../src/cli/env.js';
import { EXIT, KeyholdError } from '../../src/errors.js';
import { enrollPassphrase } from '../../src/unlock/passphrase.js';
import { vaultPaths, type VaultPaths } from '../../src/vault/paths.js';
import { MAX_SECRET_BYTES, Vault, type SecretValue } from '../../src/vault/vault.js';

const COST = { log2n: 14, r: 8, p: 1 };
const PASSPHRASE = 'unit secret store passphrase';

/** Values that break naive handling: quoting, newlines, non-UTF-8, empty, NUL. */
const TRICKY: Record<string, Buffer> = {
  NEWLINES: Buffer.from('line one\nline two\n\n'),
  QUOTES: Buffer.from(`it's "quoted" ''' ""`),
  DOLLAR: Buffer.from('$HOME ${PATH} $(id) $$ $1'),
  BACKTICKS: Buffer.from('`id` `echo pwned`'),
  BACKSLASHES: Buffer.from('a\\b\\\\c\\n\\'),
  NON_UTF8: Buffer.from([0xff, 0xfe, 0x80, 0x41, 0xc3, 0x28]),
  EMPTY: Buffer.alloc(0),
  CRLF: Buffer.from('a\r\nb\r\n'),
  UNICODE: Buffer.from('pässwörd ✓ 🔑'),
  SPACES: Buffer.from('  leading and trailing  '),
};

function expectKeyholdError(fn: () => unknown, exitCode: number, message?: RegExp): KeyholdError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(KeyholdError);
  const err = caught as KeyholdError;
  expect(err.exitCode).toBe(exitCode);
  if (message) expect(err.message).toMatch(message);
  return err;
}

describe('Vault secret store', () => {
  let dir: string;
  let n = 0;
  const newPaths = (): VaultPaths => vaultPaths(join(dir, `vault-${++n}`, 'vault.db'));

  async function newVault(): Promise<{ vault: Vault; paths: VaultPaths }> {
    const paths = newPaths();
    const enrolled = await enrollPassphrase(Buffer.from(PASSPHRASE), COST);
    return { vault: Vault.createWithFactors(paths, 'any', [enrolled]), paths };
  }

  const reopen = (paths: VaultPaths) => Vault.open(paths, async () => Buffer.from(PASSPHRASE));

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'keyhold-secrets-unit-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('stores every tricky value byte for byte (NUL, empty and 1 MiB included), across close and reopen', async () => {
    const { vault, paths } = await newVault();
    const values: Record<string, Buffer> = {
      ...TRICKY,
      NUL: Buffer.from([0x61, 0x00, 0x62, 0x00]),
      ONLY_NUL: Buffer.alloc(3),
      MAX: randomBytes(MAX_SECRET_BYTES),
    };
    for (const [name, value] of Object.entries(values)) {
      expect(vault.setSecret('app', name, Buffer.from(value))).toEqual({ created: true });
    }
    for (const [name, value] of Object.entries(values)) {
      const got = vault.getSecret('app', name);
      expect(Buffer.isBuffer(got)).toBe(true);
      expect(got.equals(value), name).toBe(true);
    }
    vault.close();
    const again = await reopen(paths);
    try {
      for (const [name, value] of Object.entries(values)) expect(again.getSecret('app', name).equals(value), name).toBe(true);
      expect(again.listSecrets('app').map((s) => s.name)).toEqual(Object.keys(values).sort());
    } finally {
      again.close();
    }
  });

  it('refuses a value over 1 MiB (usage error) and keeps the previous one', async () => {
    const { vault } = await newVault();
    try {
      vault.setSecret('app', 'BIG', Buffer.from('old'));
      expectKeyholdError(() => vault.setSecret('app', 'BIG', Buffer.alloc(MAX_SECRET_BYTES + 1, 0x41)), EXIT.USAGE, /1 MiB/);
      expectKeyholdError(() => vault.setSecret('app', 'NEW', Buffer.alloc(MAX_SECRET_BYTES + 1, 0x41)), EXIT.USAGE);
      expect(vault.getSecret('app', 'BIG').toString()).toBe('old');
      expectKeyholdError(() => vault.getSecret('app', 'NEW'), EXIT.NOT_FOUND);
      // a string is not bytes
      expectKeyholdError(() => vault.setSecret('app', 'STR', 'text' as unknown as Buffer), EXIT.USAGE);
    } finally {
      vault.close();
    }
  });

  it('checks secret names ([A-Za-z_][A-Za-z0-9_]{0,255}) and scope names on every call', async () => {
    const { vault } = await newVault();
    try {
      for (const good of ['A', '_', 'a_b9', '_9', 'X'.repeat(256), 'lower_case']) {
        expect(vault.setSecret('app', good, Buffer.from('v')).created).toBe(true);
        expect(vault.getSecret('app', good).toString()).toBe('v');
      }
      for (const bad of ['', '9A', 'A-B', 'A.B', 'A B', 'A=B', 'X'.repeat(257), 'É', 'A\n', '$A', 'A\0']) {
        expectKeyholdError(() => vault.setSecret('app', bad, Buffer.from('v')), EXIT.USAGE, /invalid secret name/);
        expectKeyholdError(() => vault.getSecret('app', bad), EXIT.USAGE);
        expectKeyholdError(() => vault.removeSecret('app', bad), EXIT.USAGE);
      }
      for (const bad of ['', '-x', 'a/b', '../x', 'a b', 'x'.repeat(65)]) {
        expectKeyholdError(() => vault.setSecret(bad, 'A', Buffer.from('v')), EXIT.USAGE, /invalid scope name/);
        expectKeyholdError(() => vault.listSecrets(bad), EXIT.USAGE);
        expectKeyholdError(() => vault.secretValues([bad]), EXIT.USAGE);
      }
      expect(vault.listSecrets('app')).toHaveLength(6);
    } finally {
      vault.close();
    }
  });

  it('replaces in place (created false, updated moves, created stays); rm and missing secrets are not found (5)', async () => {
    const { vault } = await newVault();
    try {
      expect(vault.setSecret('app', 'TOKEN', Buffer.from('one'))).toEqual({ created: true });
      const [first] = vault.listSecrets('app');
      await new Promise((r) => setTimeout(r, 5));
      expect(vault.setSecret('app', 'TOKEN', Buffer.from('two'))).toEqual({ created: false });
      const [second] = vault.listSecrets('app');
      expect(second!.created).toBe(first!.created);
      expect(Date.parse(second!.updated)).toBeGreaterThan(Date.parse(first!.updated));
      expect(vault.getSecret('app', 'TOKEN').toString()).toBe('two');

      expectKeyholdError(() => vault.getSecret('app', 'MISSING'), EXIT.NOT_FOUND, /no secret MISSING in scope app/);
      expectKeyholdError(() => vault.getSecret('other', 'TOKEN'), EXIT.NOT_FOUND);
      expectKeyholdError(() => vault.removeSecret('other', 'TOKEN'), EXIT.NOT_FOUND);
      vault.removeSecret('app', 'TOKEN');
      expectKeyholdError(() => vault.getSecret('app', 'TOKEN'), EXIT.NOT_FOUND);
      expectKeyholdError(() => vault.removeSecret('app', 'TOKEN'), EXIT.NOT_FOUND);
      expect(vault.listSecrets('app')).toEqual([]);
    } finally {
      vault.close();
    }
  });

  it('keeps scopes apart; listSecrets has names and times only; secretValues is in scope order then by name; scopes() counts', async () => {
    const { vault } = await newVault();
    try {
      vault.setSecret('b', 'ZED', Buffer.from('b-zed'));
      vault.setSecret('b', 'SHARED', Buffer.from('from-b'));
      vault.setSecret('a', 'SHARED', Buffer.from('from-a'));
      vault.setSecret('a', 'ALPHA', Buffer.from('a-alpha'));
      vault.setSecret('c', 'ONLY_C', Buffer.from('c'));

      const listed = vault.listSecrets('a');
      expect(listed.map((s) => s.name)).toEqual(['ALPHA', 'SHARED']);
      for (const s of listed) {
        expect(Object.keys(s).sort()).toEqual(['created', 'name', 'scope', 'updated']);
        expect(s.scope).toBe('a');
        expect(Number.isNaN(Date.parse(s.created))).toBe(false);
      }
      expect(JSON.stringify(listed)).not.toContain('from-a');
      expect(vault.listSecrets('nothing-here')).toEqual([]);

      const flat = (values: SecretValue[]) => values.map((v) => `${v.scope}/${v.name}=${v.value.toString()}`);
      expect(flat(vault.secretValues(['b', 'a']))).toEqual(['b/SHARED=from-b', 'b/ZED=b-zed', 'a/ALPHA=a-alpha', 'a/SHARED=from-a']);
      expect(flat(vault.secretValues(['a']))).toEqual(['a/ALPHA=a-alpha', 'a/SHARED=from-a']);
      expect(vault.secretValues(['empty'])).toEqual([]);
      expect(vault.getSecret('b', 'SHARED').toString()).toBe('from-b');

      expect(vault.scopes()).toEqual([
        { name: 'a', keys: 0, secrets: 2, tokens: 0, policy: false },
        { name: 'b', keys: 0, secrets: 2, tokens: 0, policy: false },
        { name: 'c', keys: 0, secrets: 1, tokens: 0, policy: false },
      ]);
      vault.removeSecret('c', 'ONLY_C');
      expect(vault.scopes().map((s) => s.name)).toEqual(['a', 'b']);
    } finally {
      vault.close();
    }
  });

  it('keeps no value in the clear in any vault file', async () => {
    const { vault, paths } = await newVault();
    const marker = `KH-UNIT-CLEAR-${randomBytes(8).toString('hex')}`;
    vault.setSecret('app', 'MARKER', Buffer.from(marker));
    // also a long repetitive value, which any plaintext page would show
    vault.setSecret('app', 'LONG', Buffer.from(marker.repeat(500)));
    expect(vault.getSecret('app', 'MARKER').toString()).toBe(marker);
    const dataDir = join(paths.db, '..');
    const check = () => {
      const files = readdirSync(dataDir);
      expect(files).toContain('vault.db');
      for (const f of files) {
        const bytes = readFileSync(join(dataDir, f));
        expect(bytes.includes(marker), f).toBe(false);
        expect(bytes.includes(Buffer.from(marker).toString('base64').slice(0, 20)), f).toBe(false);
      }
    };
    check(); // with the WAL still open
    vault.close();
    check();
  });
});

describe('deniedVariable', () => {
  it('denies names that change how programs load or run, and keyhold’s own', () => {
    for (const name of [
      'LD_PRELOAD', 'LD_LIBRARY_PATH', 'LD_AUDIT', 'DYLD_INSERT_LIBRARIES', 'NODE_OPTIONS', 'BASH_ENV', 'ENV', 'PATH',
      'PYTHONPATH', 'PERL5LIB', 'RUBYOPT', 'SSH_AUTH_SOCK', 'BASH_FUNC_foo%%', 'BASH_FUNC_x', 'HOME', 'KEYHOLD_VAULT',
      'KEYHOLD_PASSPHRASE', 'KEYHOLD_', 'GIT_SSH_COMMAND', 'GIT_SSH', 'GIT_CONFIG_GLOBAL', 'IFS', 'PS4', 'SHELLOPTS',
      'GCONV_PATH', 'GLIBC_TUNABLES', 'JAVA_TOOL_OPTIONS', 'MALLOC_CHECK_', 'EDITOR', 'PAGER',
    ]) {
      expect(deniedVariable(name), name).toBe(true);
    }
  });

  // One or more members of each family, chosen for what they do: each runs, loads or fetches code,
  // or changes what is trusted or where traffic goes.
  const FAMILIES: Record<string, string[]> = {
    git: ['GIT_EXTERNAL_DIFF', 'GIT_CONFIG_COUNT', 'GIT_CONFIG_KEY_0', 'GIT_CONFIG_VALUE_0', 'GIT_DIR', 'GIT_PAGER', 'GIT_EDITOR',
      'GIT_SEQUENCE_EDITOR', 'GIT_PROXY_COMMAND', 'GIT_ASKPASS', 'GIT_EXEC_PATH', 'GIT_TEMPLATE_DIR', 'GIT_TRACE_CURL', 'GIT_SSL_NO_VERIFY',
      'GIT_AUTHOR_NAME', 'GIT_COMMITTER_EMAIL'],
    xdg: ['XDG_CONFIG_HOME', 'XDG_CONFIG_DIRS', 'XDG_DATA_HOME', 'XDG_DATA_DIRS', 'XDG_RUNTIME_DIR', 'XDG_CACHE_HOME'],
    ssh: ['SSH_AUTH_SOCK', 'SSH_ASKPASS', 'SSH_ASKPASS_REQUIRE', 'SSH_SK_PROVIDER', 'SSH_SK_HELPER', 'SSH_PKCS11_HELPER', 'SSH_AGENT_PID'],
    npm: ['npm_config_script_shell', 'NPM_CONFIG_SCRIPT_SHELL', 'Npm_Config_Userconfig', 'npm_config_registry', 'npm_config_node_options'],
    yarnPnpmCorepack: ['YARN_YARN_PATH', 'YARN_RC_FILENAME', 'YARN_NPM_REGISTRY_SERVER', 'PNPM_HOME', 'pnpm_config_registry', 'COREPACK_NPM_REGISTRY'],
    node: ['NODE_OPTIONS', 'NODE_PATH', 'NODE_EXTRA_CA_CERTS', 'NODE_TLS_REJECT_UNAUTHORIZED', 'NODE_REPL_EXTERNAL_MODULE', 'NODE_CHANNEL_FD'],
    python: ['PYTHONPATH', 'PYTHONSTARTUP', 'PYTHONHOME', 'PYTHONWARNINGS', 'PYTHONUSERBASE', 'PYTHONBREAKPOINT', 'PIP_INDEX_URL',
      'PIP_EXTRA_INDEX_URL', 'PIP_CONFIG_FILE', 'UV_INDEX_URL', 'POETRY_REPOSITORIES_X_URL', 'VIRTUAL_ENV', 'IPYTHONDIR'],
    ruby: ['RUBYOPT', 'RUBYLIB', 'RUBYSHELL', 'GEM_HOME', 'GEM_PATH', 'GEMRC', 'BUNDLE_GEMFILE', 'BUNDLE_PATH', 'IRBRC'],
    perl: ['PERL5LIB', 'PERLLIB', 'PERL5OPT', 'PERL5DB', 'PERLIO', 'PERL_MB_OPT'],
    java: ['JAVA_TOOL_OPTIONS', '_JAVA_OPTIONS', 'JDK_JAVA_OPTIONS', 'CLASSPATH', 'JAVA_HOME', 'JAVA_OPTS', 'MAVEN_OPTS', 'GRADLE_USER_HOME', 'GRADLE_OPTS'],
    loader: ['LD_PRELOAD', 'LD_AUDIT', 'DYLD_LIBRARY_PATH', 'GCONV_PATH', 'GETCONF_DIR', 'GLIBC_TUNABLES', 'MALLOC_PERTURB_', 'LOCPATH',
      'NLSPATH', 'HOSTALIASES', 'RES_OPTIONS', 'LOCALDOMAIN', 'RESOLV_HOST_CONF', 'TZDIR', 'TERMINFO'],
    tls: ['OPENSSL_CONF', 'OPENSSL_MODULES', 'OPENSSL_ENGINES', 'OPENSSL_ia32cap', 'SSL_CERT_FILE', 'SSL_CERT_DIR', 'SSLKEYLOGFILE',
      'CURL_CA_BUNDLE', 'CURL_HOME', 'REQUESTS_CA_BUNDLE', 'NODE_EXTRA_CA_CERTS', 'AWS_CA_BUNDLE', 'WGETRC'],
    proxies: ['http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY', 'no_proxy', 'NO_PROXY', 'ftp_proxy'],
    shells: ['BASH_ENV', 'ENV', 'ZDOTDIR', 'PS1', 'PS4', 'PROMPT_COMMAND', 'SHELLOPTS', 'BASHOPTS', 'BASH_XTRACEFD', 'FPATH', 'IFS', 'CDPATH', 'SHELL'],
    editorsPagers: ['EDITOR', 'VISUAL', 'PAGER', 'MANPAGER', 'LESS', 'LESSOPEN', 'LESSCLOSE', 'BROWSER', 'SUDO_ASKPASS', 'SYSTEMD_PAGER'],
    make: ['MAKEFLAGS', 'MAKEFILES', 'CC', 'CXX', 'CFLAGS', 'LDFLAGS', 'PKG_CONFIG_PATH'],
    go: ['GOFLAGS', 'GOPROXY', 'GOTOOLCHAIN', 'GOROOT', 'GOENV', 'GONOSUMDB', 'CGO_CFLAGS', 'CGO_LDFLAGS'],
    rust: ['RUSTC_WRAPPER', 'RUSTC', 'RUSTFLAGS', 'RUSTDOCFLAGS', 'CARGO_HOME', 'CARGO_BUILD_RUSTC_WRAPPER', 'CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER', 'RUSTUP_TOOLCHAIN'],
    elsewhere: ['KUBECONFIG', 'DOCKER_HOST', 'DOCKER_CONFIG', 'DOCKER_CONTEXT', 'AWS_CONFIG_FILE', 'AWS_SHARED_CREDENTIALS_FILE', 'GNUPGHOME'],
    process: ['PATH', 'HOME', 'TMPDIR', 'KEYHOLD_VAULT', 'KEYHOLD_TOKEN'],
  };
  for (const [family, names] of Object.entries(FAMILIES)) {
    it(`denies the ${family} family`, () => {
      for (const name of names) expect(deniedVariable(name), name).toBe(true);
    });
  }

  it('ignores letter case: lowercase and mixed-case forms are denied too', () => {
    for (const name of ['path', 'Path', 'home', 'ld_preload', 'Ld_Preload', 'node_options', 'git_external_diff', 'xdg_config_home',
      'Https_Proxy', 'pythonpath', 'openssl_conf', 'java_tool_options', 'bash_env', 'keyhold_vault', 'ssh_auth_sock']) {
      expect(deniedVariable(name), name).toBe(true);
    }
  });

  it('allows ordinary names, including ones that share a family’s first letters but not its prefix', () => {
    for (const name of [
      'API_TOKEN', 'DATABASE_URL', 'MY_PATH', 'PATH_', 'PATHS', 'XLD_PRELOAD', 'HOME_DIR', 'MY_HOME', 'LD', 'KEYHOLD',
      'NODE_ENV', 'node_env', 'NODE_AUTH_TOKEN', 'SSH_KEY', 'SSH_PRIVATE_KEY', 'SSH_KNOWN_HOSTS', 'ENVIRONMENT', 'AWS_SECRET_ACCESS_KEY',
      'AWS_ACCESS_KEY_ID', 'AWS_SESSION_TOKEN', 'GITHUB_TOKEN', 'GITLAB_TOKEN', 'GITEA_TOKEN', 'GIT', 'NPM_TOKEN', 'NPM_AUTH_TOKEN',
      'NODEJS_VERSION', 'YARNISH', 'PIPELINE_ID', 'PIP', 'DOCKER_PASSWORD', 'DOCKER_USERNAME', 'DOCKERHUB_TOKEN', 'GOOGLE_API_KEY',
      'GOOGLE_APPLICATION_CREDENTIALS', 'GO_VERSION', 'LDAP_PASSWORD', 'LESSON_PLAN', 'XDG', 'OPENSSL', 'SSL_KEY', 'TLS_KEY',
      'CARGO_REGISTRY_TOKEN', 'GEM_HOST_API_KEY', 'STRIPE_SECRET_KEY', 'JAVA', 'JAVAX', 'PROXY_URL', 'MY_HTTP_PROXY_HOST',
      'REDIS_URL', 'SENTRY_DSN', 'SECRET_KEY_BASE', 'TZ', 'LANG',
    ]) {
      expect(deniedVariable(name), name).toBe(false);
    }
  });

  it('says who reads a denied name, and that case was ignored when it was', () => {
    expect(deniedBecause('GIT_EXTERNAL_DIFF')).toBe('git reads GIT_* to decide what to run, load or trust');
    expect(deniedBecause('npm_config_script_shell')).toMatch(/^npm, yarn, pnpm and corepack read NPM_CONFIG_\* in any letter case /);
    expect(deniedBecause('https_proxy')).toBe('HTTP clients read HTTPS_PROXY in any letter case to choose where requests go');
    expect(deniedBecause('DATABASE_URL')).toBeNull();
  });
});

describe('selectVariables', () => {
  const secret = (scope: string, name: string, value: string | Buffer): SecretValue => ({
    scope,
    name,
    value: Buffer.isBuffer(value) ? value : Buffer.from(value),
  });
  const selection = (over: Partial<SecretSelection> = {}): SecretSelection => ({
    scopes: ['a'],
    prefix: '',
    only: null,
    allow: new Set(),
    ...over,
  });
  const run = (secrets: SecretValue[], sel: SecretSelection) => {
    const warnings: string[] = [];
    const vars = selectVariables(secrets, sel, (m) => warnings.push(m));
    return { vars: Object.fromEntries([...vars].map(([k, v]) => [k, v.toString('latin1')])), order: [...vars.keys()], warnings };
  };

  it('passes values through as the same bytes; later scopes win on a duplicate name', () => {
    const bin = Buffer.from([0xff, 0xfe, 0x80]);
    const out = selectVariables(
      [secret('a', 'SHARED', 'from-a'), secret('a', 'BIN', bin), secret('b', 'SHARED', 'from-b'), secret('b', 'B_ONLY', '')],
      selection({ scopes: ['a', 'b'] }),
      () => {
        throw new Error('no warning expected');
      },
    );
    expect([...out.keys()]).toEqual(['SHARED', 'BIN', 'B_ONLY']);
    expect(out.get('SHARED')!.toString()).toBe('from-b');
    expect(out.get('BIN')!.equals(bin)).toBe(true);
    expect(out.get('B_ONLY')!.length).toBe(0);
  });

  it('skips denylisted names with a warning naming each, unless allowed by name', () => {
    const secrets = [
      secret('a', 'LD_PRELOAD', '/tmp/evil.so'),
      secret('a', 'PATH', '/evil'),
      secret('a', 'NODE_OPTIONS', '--require /tmp/x'),
      secret('a', 'TOKEN', 't'),
    ];
    const denied = run(secrets, selection());
    expect(denied.vars).toEqual({ TOKEN: 't' });
    expect(denied.warnings).toHaveLength(3);
    for (const name of ['LD_PRELOAD', 'PATH', 'NODE_OPTIONS']) expect(denied.warnings.some((w) => w.includes(name))).toBe(true);
    expect(denied.warnings.join('\n')).toContain('--allow');
    // no value in a warning
    expect(denied.warnings.join('\n')).not.toMatch(/evil|--require/);

    const allowed = run(secrets, selection({ allow: new Set(['PATH']) }));
    expect(allowed.vars).toEqual({ PATH: '/evil', TOKEN: 't' });
    expect(allowed.warnings).toHaveLength(2);
    expect(allowed.warnings.join('\n')).not.toContain('skipped PATH');
  });

  it('warns once per skipped family member, naming it and the exact --allow; --allow is exact, case included', () => {
    const secrets = [
      secret('a', 'GIT_EXTERNAL_DIFF', '/tmp/evil-diff'),
      secret('a', 'XDG_CONFIG_HOME', '/tmp/evil-config'),
      secret('a', 'npm_config_script_shell', '/tmp/evil-shell'),
      secret('a', 'GITHUB_TOKEN', 'ghp_x'),
      secret('a', 'DATABASE_URL', 'postgres://u:p@db/x'),
    ];
    const denied = run(secrets, selection());
    expect(denied.vars).toEqual({ GITHUB_TOKEN: 'ghp_x', DATABASE_URL: 'postgres://u:p@db/x' });
    expect(denied.warnings).toHaveLength(3);
    for (const name of ['GIT_EXTERNAL_DIFF', 'XDG_CONFIG_HOME', 'npm_config_script_shell']) {
      expect(denied.warnings.filter((w) => w.startsWith(`skipped ${name}: `) && w.includes(`--allow ${name} `))).toHaveLength(1);
    }
    expect(denied.warnings.join('\n')).not.toMatch(/evil|ghp_|postgres/);

    expect(run(secrets, selection({ allow: new Set(['NPM_CONFIG_SCRIPT_SHELL', 'git_external_diff']) })).warnings).toHaveLength(3);
    const allowed = run(secrets, selection({ allow: new Set(['npm_config_script_shell', 'GIT_EXTERNAL_DIFF']) }));
    expect(allowed.vars).toEqual({
      GIT_EXTERNAL_DIFF: '/tmp/evil-diff',
      npm_config_script_shell: '/tmp/evil-shell',
      GITHUB_TOKEN: 'ghp_x',
      DATABASE_URL: 'postgres://u:p@db/x',
    });
    expect(allowed.warnings).toEqual([expect.stringMatching(/^skipped XDG_CONFIG_HOME: .*--allow XDG_CONFIG_HOME /)]);
  });

  it('applies --prefix before the denylist: P_NAME is set, NAME is not; a prefix can make or unmake a denied name', () => {
    const secrets = [secret('a', 'PATH', '/p'), secret('a', 'TOKEN', 't'), secret('a', 'PRELOAD', 'x')];
    const prefixed = run(secrets, selection({ prefix: 'APP_' }));
    expect(prefixed.vars).toEqual({ APP_PATH: '/p', APP_TOKEN: 't', APP_PRELOAD: 'x' });
    expect(prefixed.warnings).toEqual([]);

    const intoDenied = run(secrets, selection({ prefix: 'LD_' }));
    expect(intoDenied.vars).toEqual({});
    expect(intoDenied.warnings.join('\n')).toContain('LD_PRELOAD');
    expect(intoDenied.warnings.join('\n')).toContain('LD_TOKEN');

    // --allow names the final variable, not the secret
    expect(run(secrets, selection({ prefix: 'LD_', allow: new Set(['PRELOAD']) })).vars).toEqual({});
    expect(run(secrets, selection({ prefix: 'LD_', allow: new Set(['LD_PRELOAD']) })).vars).toEqual({ LD_PRELOAD: 'x' });
  });

  it('--only keeps the named secrets and fails with not found (5) naming any missing one', () => {
    const secrets = [secret('a', 'ONE', '1'), secret('a', 'TWO', '2'), secret('b', 'THREE', '3')];
    expect(run(secrets, selection({ scopes: ['a', 'b'], only: ['ONE', 'THREE'] })).vars).toEqual({ ONE: '1', THREE: '3' });
    const err = expectKeyholdError(() => run(secrets, selection({ only: ['ONE', 'NOPE', 'ALSO_NOPE'] })), EXIT.NOT_FOUND);
    expect(err.message).toContain('NOPE');
    expect(err.message).toContain('ALSO_NOPE');
    expect(err.message).not.toMatch(/\bONE\b/);
  });

  it('refuses a value with a NUL byte (naming the secret), but only among the variables that would be set', () => {
    const secrets = [secret('a', 'OK', 'fine'), secret('a', 'HAS_NUL', Buffer.from('a\0b'))];
    const err = expectKeyholdError(() => run(secrets, selection()), EXIT.ERROR, /HAS_NUL/);
    expect(err.message).toContain('NUL');
    expect(err.message).not.toContain('a\0b');
    expect(run(secrets, selection({ only: ['OK'] })).vars).toEqual({ OK: 'fine' });
    // a denylisted secret is skipped before its value is looked at
    expect(run([secret('a', 'LD_PRELOAD', Buffer.from('\0')), secret('a', 'OK', 'x')], selection()).vars).toEqual({ OK: 'x' });
  });
});

describe('shellQuoteBytes and formatExport', () => {
  const sh = (script: Buffer | string, args: string[] = []) =>
    spawnSync('/bin/sh', ['-c', script as string, 'sh', ...args], { encoding: 'buffer' });

  it('quotes with single quotes, each \' as \'\\\'\'', () => {
    expect(shellQuoteBytes(Buffer.from('')).toString()).toBe("''");
    expect(shellQuoteBytes(Buffer.from('abc')).toString()).toBe("'abc'");
    expect(shellQuoteBytes(Buffer.from("it's")).toString()).toBe("'it'\\''s'");
    expect(shellQuoteBytes(Buffer.from("''")).toString()).toBe("''\\'''\\'''");
    expect(shellQuoteBytes(Buffer.from('$x `y` "z" \\')).toString()).toBe('\'$x `y` "z" \\\'');
    expect(shellQuoteBytes(Buffer.from([0xff, 0x0a])).equals(Buffer.from([0x27, 0xff, 0x0a, 0x27]))).toBe(true);
  });

  it('sh reads back every tricky value and random bytes (no NUL) exactly', () => {
    const values: Buffer[] = [...Object.values(TRICKY), Buffer.from("'"), Buffer.from("\\'"), Buffer.from('\n')];
    for (let i = 0; i < 20; i++) {
      const random = randomBytes(200 + i * 50);
      for (let j = 0; j < random.length; j++) if (random[j] === 0) random[j] = 0x27; // extra quotes instead of NUL
      values.push(random);
    }
    for (const value of values) {
      const script = Buffer.concat([Buffer.from('X='), shellQuoteBytes(value), Buffer.from('\nprintf %s "$X"')]);
      // the script goes on stdin: node would pass an argv string as UTF-8, not these bytes
      const result = spawnSync('/bin/sh', ['-s'], { input: script, encoding: 'buffer' });
      expect(result.status).toBe(0);
      expect(result.stdout.equals(value), JSON.stringify(value.toString('latin1').slice(0, 40))).toBe(true);
    }
    expect(sh('printf %s ok').stdout.toString()).toBe('ok');
  });

  it('env and shell formats are NAME=\'value\' / export NAME=\'value\' lines that sh sources back', () => {
    const vars = new Map<string, Buffer>(Object.entries(TRICKY).map(([k, v]) => [k, Buffer.from(v)]));
    expect(formatExport(new Map([['A', Buffer.from("x'y")]]), 'env').toString()).toBe("A='x'\\''y'\n");
    expect(formatExport(new Map([['A', Buffer.from("x'y")]]), 'shell').toString()).toBe("export A='x'\\''y'\n");
    expect(formatExport(new Map(), 'env').length).toBe(0);
    for (const format of ['env', 'shell'] as const) {
      const text = formatExport(vars, format);
      for (const [name, value] of vars) {
        const script = Buffer.concat([text, Buffer.from(`printf %s "$${name}"\n`)]);
        const result = spawnSync('/bin/sh', ['-s'], { input: script, encoding: 'buffer' });
        expect(result.status).toBe(0);
        expect(result.stdout.equals(value), `${format} ${name}`).toBe(true);
      }
      if (format === 'shell') {
        // exported: a child process sees them
        const child = spawnSync('/bin/sh', ['-s'], {
          input: Buffer.concat([text, Buffer.from(`/bin/sh -c 'printf %s "$QUOTES"'\n`)]),
          encoding: 'buffer',
        });
        expect(child.stdout.equals(TRICKY.QUOTES!)).toBe(true);
      } else {
        const child = spawnSync('/bin/sh', ['-s'], {
          input: Buffer.concat([text, Buffer.from(`/bin/sh -c 'printf %s "\${QUOTES-unset}"'\n`)]),
          encoding: 'buffer',
        });
        expect(child.stdout.toString()).toBe('unset');
      }
    }
  });

  it('json format is an object of UTF-8 strings; a non-UTF-8 value is an error naming it', () => {
    const utf8 = new Map<string, Buffer>(
      Object.entries(TRICKY)
        .filter(([k]) => k !== 'NON_UTF8')
        .map(([k, v]) => [k, Buffer.from(v)]),
    );
    utf8.set('WITH_NUL', Buffer.from('a\0b'));
    const doc = JSON.parse(formatExport(utf8, 'json').toString()) as Record<string, string>;
    expect(Object.keys(doc)).toEqual([...utf8.keys()]);
    for (const [name, value] of utf8) expect(doc[name], name).toBe(value.toString('utf8'));
    expect(JSON.parse(formatExport(new Map(), 'json').toString())).toEqual({});

    const err = expectKeyholdError(() => formatExport(new Map([['OK', Buffer.from('x')], ['BIN', TRICKY.NON_UTF8!]]), 'json'), EXIT.ERROR, /BIN/);
    expect(err.message).toMatch(/UTF-8/);
    // an overlong encoding or a lone surrogate is not UTF-8 either
    expectKeyholdError(() => formatExport(new Map([['OVERLONG', Buffer.from([0xc0, 0xaf])]]), 'json'), EXIT.ERROR, /OVERLONG/);
    expectKeyholdError(() => formatExport(new Map([['SURR', Buffer.from([0xed, 0xa0, 0x80])]]), 'json'), EXIT.ERROR, /SURR/);
  });
});
