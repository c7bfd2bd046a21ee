// Shared by the fault tests that check the audit log from outside: the CLI run as a child that
// may be killed, the log's lines as a client sees them, `audit verify`, and a signing load whose
// every received signature can be looked up in the log afterwards.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { expect } from 'vitest';
import { vaultPaths } from '../../src/vault/paths.js';
import { KEYHOLD_BIN, type KeyholdEnv } from './keyhold.js';
import { identitiesFrame, parseIdentities, RawConn, signRequestFrame } from './raw-wire.js';

export const MAC_LINE = /,"mac":"[0-9a-f]{64}"\}$/;
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
export const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

/** The same vault and runtime dir with no passphrase source: vault commands go through the daemon. */
export function bare(k: KeyholdEnv): KeyholdEnv {
  const env = { ...k.env };
  for (const name of ['KEYHOLD_PASSPHRASE_FILE', 'KEYHOLD_PASSPHRASE', 'CREDENTIALS_DIRECTORY', 'SSH_AUTH_SOCK']) delete env[name];
  return { ...k, env };
}

export interface Outcome {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

export interface Launched {
  proc: ChildProcess;
  done: Promise<Outcome>;
}

const children = new Set<ChildProcess>();

/** Starts the keyhold CLI without waiting (many run at once; some are killed). */
export function launch(k: KeyholdEnv, args: string[], input?: string | Buffer): Launched {
  const started = Date.now();
  const proc = spawn(process.execPath, [KEYHOLD_BIN, ...args], { env: k.env, stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(proc);
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  proc.stdin!.on('error', () => {});
  proc.stdin!.end(input ?? '');
  const done = new Promise<Outcome>((resolve) => {
    proc.once('close', (code, signal) => {
      children.delete(proc);
      resolve({ code, signal, stdout, stderr, ms: Date.now() - started });
    });
  });
  return { proc, done };
}

export function run(k: KeyholdEnv, args: string[], input?: string): Promise<Outcome> {
  return launch(k, args, input).done;
}

/** Kills every CLI child still running (afterEach). */
export function killLaunched(): void {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  children.clear();
}

export function auditLines(k: KeyholdEnv): string[] {
  const path = vaultPaths(k.vault).audit;
  if (!existsSync(path)) return [];
  const lines = readFileSync(path, 'utf8').split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  return lines;
}

export interface Entry {
  seq: number;
  event: string;
  name?: string;
  names?: string[];
  token_id?: string;
  fingerprint?: string;
  data_sha256?: string;
  reason?: string;
  refused?: number;
  [field: string]: unknown;
}

export const completeEntries = (k: KeyholdEnv): Entry[] =>
  auditLines(k)
    .filter((l) => MAC_LINE.test(l))
    .map((l) => JSON.parse(l) as Entry);

/**
 * `audit verify` must exit 0; every line of the file that is not a complete audit line (torn by a
 * crash) must be named in a warning; the count it prints is the number of complete lines.
 */
export async function expectAuditVerifies(k: KeyholdEnv): Promise<{ torn: number[]; stderr: string }> {
  const result = await run(k, ['audit', 'verify']);
  expect(result.code, `audit verify: ${result.stderr}`).toBe(0);
  const lines = auditLines(k);
  const torn = lines.flatMap((line, i) => (MAC_LINE.test(line) ? [] : [i + 1]));
  for (const n of torn) expect(result.stderr, `torn line ${n} must be reported`).toMatch(new RegExp(`line ${n}: .*(torn|incomplete)`));
  const warned = [...result.stderr.matchAll(/warning: .* line (\d+):/g)].map((m) => Number(m[1]));
  expect(warned.sort((a, b) => a - b)).toEqual(torn);
  expect(result.stdout).toContain(`ok: ${lines.length - torn.length} entries`);
  return { torn, stderr: result.stderr };
}

/**
 * Clients that sign as fast as the daemon answers, each keeping `depth` requests in flight, until
 * stopped or their connection dies. `received` holds the SHA-256 of the data of every signature a
 * client actually got back; `refused` counts FAILURE answers.
 */
export class SigningLoad {
  readonly received = new Set<string>();
  refused = 0;
  private stopped = false;
  private readonly conns: RawConn[] = [];
  readonly done: Promise<void>;

  constructor(socketPath: string, clients: number, depth: number, tag = randomBytes(4).toString('hex')) {
    this.done = Promise.all(Array.from({ length: clients }, (_, c) => this.client(socketPath, depth, `${tag}-${c}`))).then(() => {});
  }

  private async client(path: string, depth: number, tag: string): Promise<void> {
    const conn = await RawConn.connect(path).catch(() => null);
    if (!conn) return;
    this.conns.push(conn);
    conn.send(identitiesFrame());
    const identities = await conn.reply().then(parseIdentities, () => []);
    const blob = identities[0]?.blob;
    if (!blob) return conn.close();
    const inFlight: string[] = [];
    let n = 0;
    const sendOne = () => {
      const data = Buffer.from(`${tag}-${n++}-${randomBytes(6).toString('hex')}`);
      inFlight.push(sha256(data));
      conn.send(signRequestFrame(blob, data));
    };
    for (let i = 0; i < depth; i++) sendOne();
    while (!this.stopped) {
      const reply = await conn.reply(10_000).catch(() => null);
      if (!reply) break;
      const digest = inFlight.shift()!;
      if (reply[0] === 14) this.received.add(digest);
      else this.refused++;
      sendOne();
    }
    conn.close();
  }

  /** Stops sending and waits for the clients to finish. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const c of this.conns) c.close();
    await this.done;
  }
}

/** The received signatures with no `sign` line in the log. */
export function unauditedSignatures(k: KeyholdEnv, received: Iterable<string>): string[] {
  const logged = new Set(completeEntries(k).filter((e) => e.event === 'sign').map((e) => e.data_sha256));
  return [...received].filter((d) => !logged.has(d));
}

