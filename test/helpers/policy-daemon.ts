// In-process pieces for testing policy decisions on the daemon side: keys, the data clients ask to
// sign (SSHSIG blobs, userauth requests), a key cache of fixed scopes, and a logger that remembers.
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import pino, { type Logger } from 'pino';
import { describeKey, fingerprint, type SshKeyType } from '../../src/agent-protocol/public-key.js';
import { WireWriter } from '../../src/agent-protocol/wire.js';
import type { KeyCache, ScopeKeys } from '../../src/vault/key-cache.js';

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
