// In-process pieces for testing policy decisions on the daemon side: keys, the data clients ask to
// sign (SSHSIG blobs, userauth requests), a key cache of fixed scopes, and a logger that remembers.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import pino, { type Logger } from 'pino';
import { describeKey, fingerprint, type SshKeyType } from '../../src/agent-protocol/public-key.js';
import { WireWriter } from '../../src/agent-protocol/wire.js';
import { ControlClient } from '../../src/control/client.js';
import type { PendingApproval } from '../../src/policy/approvals.js';
import type { PolicyDocument } from '../../src/policy/policy.js';
import type { KeyCache, ScopeKeys } from '../../src/vault/key-cache.js';
import { readKeyring } from '../../src/vault/keyring.js';
import { vaultPaths } from '../../src/vault/paths.js';
import { keyhold, waitFor, type KeyholdEnv } from './keyhold.js';

export interface TestKey {
  key: KeyObject;
  blob: Buffer;
  type: SshKeyType;
  fingerprint: string;
  comment: string;
}

export function ed25519Key(comment = 'test key'): TestKey {
  const { privateKey } = generateKeyPairSync('ed25519');
  const { blob, type } = describeKey(privateKey);
  return { key: privateKey, blob, type, fingerprint: fingerprint(blob), comment };
}

/** What `ssh-keygen -Y sign -n NAMESPACE` asks an agent to sign. */
export function sshsigData(namespace: string, message = 'hello'): Buffer {
  const w = new WireWriter().string(namespace).string('').string('sha512').string(createHash('sha512').update(message).digest());
  return Buffer.concat([Buffer.from('SSHSIG'), w.toBuffer()]);
}

/** A publickey-hostbound-v00 userauth request, as OpenSSH >= 8.9 asks an agent to sign. */
export function userauthData(user: string, key: TestKey, hostKey: Buffer, sessionId = Buffer.alloc(32, 7)): Buffer {
  return new WireWriter()
    .string(sessionId)
    .byte(50)
    .string(user)
    .string('ssh-connection')
    .string('publickey-hostbound-v00@openssh.com')
    .boolean(true)
    .string('ssh-ed25519')
    .string(key.blob)
    .string(hostKey)
    .toBuffer();
}

/** A key cache holding `scopes` as they are (enough for scopeBackend). */
export function fixedKeyCache(scopes: Record<string, TestKey[]>): KeyCache {
  const built = new Map<string, ScopeKeys>();
  for (const [name, keys] of Object.entries(scopes)) {
    built.set(name, {
      identities: keys.map((k) => ({ keyBlob: k.blob, comment: k.comment })),
      byBlob: new Map(keys.map((k) => [k.blob.toString('latin1'), { fingerprint: k.fingerprint, type: k.type, key: k.key }])),
      constraints: new Map(),
      nextExpiry: null,
    });
  }
  return { scope: (name: string) => built.get(name) ?? { identities: [], byBlob: new Map() } } as unknown as KeyCache;
}

/** A logger whose lines are kept (as parsed objects) for the test to read. */
export function recordingLogger(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const log = pino({ level: 'debug' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) });
  return { log, lines };
}

// ---------------------------------------------------------------------------------------------
// Against a real daemon
// ---------------------------------------------------------------------------------------------

/** A child that may wait for a long time (a sign request waiting for a confirmation). */
export interface Waiting {
  proc: ChildProcess;
  done: Promise<{ code: number | null; stdout: string; stderr: string }>;
  stdout(): string;
}

const waitingChildren = new Set<ChildProcess>();

export function spawnWaiting(cmd: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 60_000): Waiting {
  const proc = spawn(cmd, args, { env, stdio: ['pipe', 'pipe', 'pipe'], timeout: timeoutMs, killSignal: 'SIGKILL' });
  waitingChildren.add(proc);
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  proc.stdin!.on('error', () => {});
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    proc.once('close', (code) => {
      waitingChildren.delete(proc);
      resolve({ code, stdout, stderr });
    }),
  );
  return { proc, done, stdout: () => stdout };
}

export function killWaiting(): void {
  for (const child of waitingChildren) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  waitingChildren.clear();
}

/** Stores a policy through the running daemon (the `policy set` CLI resolves hosts first; here there are none). */
export async function setPolicyThroughDaemon(k: KeyholdEnv, scope: string, document: PolicyDocument): Promise<void> {
  const client = await ControlClient.connect(k.runtime);
  if (!client) throw new Error('no daemon');
  try {
    const vaultId = readKeyring(vaultPaths(k.vault).keys).vault_id;
    await client.call({ op: 'call', vaultId, method: 'setPolicy', args: [scope, document, 'test'] });
  } finally {
    client.close();
  }
}

export function listApprovals(k: KeyholdEnv): PendingApproval[] {
  const out = keyhold(k, ['approvals', '--json']);
  if (out.status !== 0) throw new Error(`keyhold approvals exited ${out.status}: ${out.stderr}`);
  return JSON.parse(out.stdout) as PendingApproval[];
}

export async function waitForApprovals(k: KeyholdEnv, count: number, timeoutMs = 10_000): Promise<PendingApproval[]> {
  let list: PendingApproval[] = [];
  await waitFor(() => (list = listApprovals(k)).length === count, timeoutMs, `${count} waiting approvals`);
  return list;
}

/** The daemon's resident memory in KiB. */
export function residentKiB(pid: number): number {
  const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return match ? Number(match[1]) : 0;
}
