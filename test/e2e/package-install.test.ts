// keyhold as an installed tool: `npm pack` of this checkout, `npm i -g` of the tarball into a temp
// prefix (native modules built from source: no prebuild can be fetched here), then the everyday
// commands through the installed `keyhold`, from a cwd and HOME with no source tree around.
import { execFile, spawn, spawnSync, type ChildProcess, type SpawnSyncOptions } from 'node:child_process';
import { cpSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { processAlive, REPO, waitFor } from '../helpers/keyhold.js';

const PKG = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as {
  version: string;
  files: string[];
  man?: string[];
  allowScripts: Record<string, boolean>;
};
// npm ≥ 11 warns (and a later npm refuses) to run a global install's dependency scripts unless allowed.
const NATIVE_PACKAGES = Object.keys(PKG.allowScripts).filter((name) => PKG.allowScripts[name]);
const PACK_TIMEOUT_MS = 4 * 60_000;
// Measured on a shared 2-core machine: about 2 minutes, nearly all of it compiling SQLite3MultipleCiphers.
const INSTALL_TIMEOUT_MS = 10 * 60_000;

let root: string;
let prefix: string;
let tarball: string;
let tarContents: string[];
let installedDir: string;
let serve: ChildProcess | undefined;

/** The environment npm itself runs with: the user's (its cache and npmrc), minus what `npm test` or keyhold put there. */
function npmEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (/^(npm_|KEYHOLD_|SSH_AUTH_SOCK$|INIT_CWD$|NODE_OPTIONS$|VITEST)/i.test(name)) continue;
    env[name] = value;
  }
  return env;
}

function run(command: string, args: string[], options: SpawnSyncOptions & { timeout: number }): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(command, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...options });
  if (result.error) throw new Error(`${command} ${args.join(' ')}: ${result.error.message}\n${String(result.stderr ?? '').slice(-4000)}`);
  return { status: result.status, stdout: String(result.stdout), stderr: String(result.stderr) };
}

function runOk(command: string, args: string[], options: SpawnSyncOptions & { timeout: number }): string {
  const result = run(command, args, options);
  if (result.status !== 0) {
    throw new Error(`${command} ${args.join(' ')} exited ${result.status}\n${result.stdout.slice(-2000)}\n${result.stderr.slice(-4000)}`);
  }
  return result.stdout;
}

/** npm pack and npm install take minutes: run them without blocking the test worker (vitest's RPC would time out). */
async function npm(args: string[], cwd: string, timeout: number): Promise<void> {
  try {
    await promisify(execFile)('npm', args, { cwd, env: npmEnv(), timeout, maxBuffer: 64 << 20, encoding: 'utf8' });
  } catch (err) {
    const { stdout, stderr, message } = err as Error & { stdout?: string; stderr?: string };
    throw new Error(`npm ${args.join(' ')}: ${message.split('\n')[0]}\n${(stdout ?? '').slice(-2000)}\n${(stderr ?? '').slice(-4000)}`);
  }
}

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'keyhold-package-'));
  // Pack a copy: prepack rebuilds dist/ from scratch, which would pull it from under the other
  // test files that run the checkout's dist/ at the same time.
  const checkout = join(root, 'checkout');
  mkdirSync(checkout);
  const inputs = new Set(['package.json', 'package-lock.json', 'tsconfig.json', 'src']);
  for (const entry of PKG.files) inputs.add(entry.split('/')[0]!);
  inputs.delete('dist');
  for (const entry of inputs) {
    if (existsSync(join(REPO, entry))) cpSync(join(REPO, entry), join(checkout, entry), { recursive: true });
  }
  symlinkSync(join(REPO, 'node_modules'), join(checkout, 'node_modules'));
  const packDir = join(root, 'pack');
  mkdirSync(packDir);
  await npm(['pack', '--pack-destination', packDir], checkout, PACK_TIMEOUT_MS);
  const tarballs = readdirSync(packDir).filter((name) => name.endsWith('.tgz'));
  expect(tarballs).toEqual([`keyhold-${PKG.version}.tgz`]);
  tarball = join(packDir, tarballs[0]!);
  tarContents = runOk('tar', ['-tzf', tarball], { timeout: 30_000 }).split('\n').filter(Boolean);
  // The checkout is gone before the install: nothing of it can be found by the installed tool.
  rmSync(checkout, { recursive: true, force: true });

  prefix = join(root, 'prefix');
  const work = join(root, 'work');
  mkdirSync(work);
  const started = Date.now();
  await npm(
    ['install', '--global', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund', `--allow-scripts=${NATIVE_PACKAGES.join(',')}`, tarball],
    work,
    INSTALL_TIMEOUT_MS,
  );
  console.info(`npm i -g of ${tarballs[0]} took ${Math.round((Date.now() - started) / 1000)} s`);
  installedDir = join(prefix, 'lib', 'node_modules', 'keyhold');
}, PACK_TIMEOUT_MS + INSTALL_TIMEOUT_MS + 60_000);

afterAll(async () => {
  if (serve && serve.exitCode === null && serve.signalCode === null) {
    const pid = serve.pid!;
    serve.kill('SIGTERM');
    await waitFor(() => !processAlive(pid), 5000, 'serve to stop').catch(() => serve!.kill('SIGKILL'));
  }
  if (root) rmSync(root, { recursive: true, force: true });
});

describe('the packed tarball', () => {
  it('holds the built CLI, the pinned dependency tree and the docs, not the sources or tests', () => {
    expect(tarContents).toContain('package/bin/keyhold');
    expect(tarContents).toContain('package/dist/cli/main.js');
    expect(tarContents).toContain('package/npm-shrinkwrap.json');
    expect(tarContents).toContain('package/README.md');
    expect(tarContents).toContain('package/contrib/systemd/keyhold.service');
    expect(tarContents.filter((path) => /^package\/(src|test|bench|scripts)\//.test(path))).toEqual([]);
    expect(tarContents.filter((path) => path.endsWith('.map') || path.endsWith('.ts'))).toEqual([]);
  });

  it('ships the man page named by package.json, which npm installs into the prefix', () => {
    expect(PKG.man).toEqual(['./man/keyhold.1']);
    expect(tarContents).toContain('package/man/keyhold.1');
    expect(existsSync(join(prefix, 'share', 'man', 'man1', 'keyhold.1'))).toBe(true);
  });
});

describe('the installed keyhold', () => {
  let env: NodeJS.ProcessEnv;
  let work: string;

  beforeAll(() => {
    const home = join(root, 'home');
    work = join(root, 'work');
    mkdirSync(join(root, 'run'), { mode: 0o700 });
    // Nothing from the test runner's environment: a PATH with the prefix and node, a fresh HOME.
    env = {
      PATH: [join(prefix, 'bin'), dirname(process.execPath), '/usr/local/bin', '/usr/bin', '/bin'].join(':'),
      HOME: home,
      XDG_CONFIG_HOME: join(home, '.config'),
      XDG_DATA_HOME: join(home, '.local', 'share'),
      XDG_STATE_HOME: join(home, '.local', 'state'),
      XDG_CACHE_HOME: join(home, '.cache'),
      XDG_RUNTIME_DIR: join(root, 'run'),
      LANG: 'C.UTF-8',
    };
  });

  const keyhold = (args: string[]) => run('keyhold', args, { cwd: work, env, timeout: 60_000 });
  const keyholdOk = (args: string[]) => runOk('keyhold', args, { cwd: work, env, timeout: 60_000 });

  it('is npm\'s symlink to a package with dist/ and no sources', () => {
    expect(lstatSync(join(prefix, 'bin', 'keyhold')).isSymbolicLink()).toBe(true);
    expect(existsSync(join(installedDir, 'dist', 'cli', 'main.js'))).toBe(true);
    expect(existsSync(join(installedDir, 'src'))).toBe(false);
    expect(existsSync(join(installedDir, 'node_modules', 'better-sqlite3-multiple-ciphers', 'build', 'Release', 'better_sqlite3.node'))).toBe(true);
    // Dev dependencies stay out of a global install.
    expect(existsSync(join(installedDir, 'node_modules', 'vitest'))).toBe(false);
  });

  it('prints the package version', () => {
    expect(keyholdOk(['--version']).trim()).toBe(PKG.version);
  });

  it('creates a vault, generates a key, serves it on the scope socket ssh-add reads, and stops', async () => {
    const passphrase = keyholdOk(['init', '--generate-passphrase']).trim();
    expect(passphrase).not.toContain('\n');
    expect(existsSync(join(env.XDG_DATA_HOME!, 'keyhold', 'vault.db'))).toBe(true);
    const passFile = join(root, 'passphrase');
    writeFileSync(passFile, passphrase + '\n', { mode: 0o600 });
    env.KEYHOLD_PASSPHRASE_FILE = passFile;

    const publicLine = keyholdOk(['key', 'generate', 'web']).trim();
    expect(publicLine).toMatch(/^ssh-ed25519 AAAA/);
    const pubFile = join(root, 'web.pub');
    writeFileSync(pubFile, publicLine + '\n');
    const fingerprint = runOk('ssh-keygen', ['-l', '-f', pubFile], { timeout: 10_000 }).split(' ')[1]!;
    expect(keyholdOk(['key', 'list'])).toContain(fingerprint);

    serve = spawn('keyhold', ['serve'], { cwd: work, env, stdio: ['ignore', 'ignore', 'pipe'] });
    let serveLog = '';
    serve.stderr!.on('data', (chunk: Buffer) => (serveLog += chunk.toString()));
    await waitFor(() => serveLog.includes('keyhold daemon ready') || serve!.exitCode !== null, 30_000, 'keyhold serve').catch((err: Error) => {
      throw new Error(`${err.message}\n${serveLog}`);
    });
    expect(serve.exitCode, serveLog).toBeNull();

    const socket = keyholdOk(['socket', 'web']).trim();
    expect(socket).toBe(join(env.XDG_RUNTIME_DIR!, 'keyhold', 'scopes', 'web.sock'));
    const listed = runOk('ssh-add', ['-l'], { cwd: work, env: { ...env, SSH_AUTH_SOCK: socket }, timeout: 10_000 });
    expect(listed).toContain(fingerprint);
    expect(keyhold(['status']).status).toBe(0);

    const exited = new Promise<number | null>((resolve) => serve!.once('exit', (code) => resolve(code)));
    expect(keyhold(['stop']).status).toBe(0);
    expect(await exited).toBe(0);
    expect(existsSync(socket)).toBe(false);
  });
});
