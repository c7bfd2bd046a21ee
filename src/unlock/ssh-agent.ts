// The ssh-agent unlock factor: a key in the operator's agent (forwarded with `ssh -A`) signs a
// stored challenge; the KEK is derived from the signature, so the key never leaves the agent and no
// secret is stored on the server. Only deterministic signatures can work: ed25519, and RSA with
// PKCS#1 v1.5 (always rsa-sha2-512 here). ECDSA signatures are randomized and are refused.
import { hkdfSync, randomBytes } from 'node:crypto';
import * as v from 'valibot';
import { readCapped } from '../read-capped.js';
import { AgentClient, AgentClientError } from '../agent-client.js';
import type { Identity } from '../agent-protocol/messages.js';
import { blobKeyType, fingerprint, FINGERPRINT_PATTERN, publicKeyFromBlob } from '../agent-protocol/public-key.js';
import { parseSignatureBlob, SIGN_FLAG_RSA_SHA2_512, verifySsh } from '../agent-protocol/signature.js';
import { EXIT, KeyholdError, notFound, usageError } from '../errors.js';
import { isCanonicalBase64, newFactorId, type EnrolledFactor, type FactorBase, type FactorKeks, type FactorKind, type Unsealed } from './factor-kind.js';

/** The SSH key a factor asks the agent to sign with. */
export interface AgentKeyRef {
  type: 'ssh-ed25519' | 'ssh-rsa';
  fingerprint: string;
  /** The public key blob, base64. */
  blob: string;
}

export interface SshAgentFactor extends FactorBase {
  type: 'ssh-agent';
  key: AgentKeyRef;
  /** Random bytes (base64) that go into the message the agent signs. */
  challenge: string;
  kdf: { name: 'hkdf-sha256'; info: typeof SSH_AGENT_KDF_INFO };
}

export const SSH_AGENT_KDF_INFO = 'keyhold-ssh-agent-factor-v1';
const SSH_AGENT_MESSAGE_PREFIX = 'keyhold-unlock-v1';
export const SSH_AGENT_ID_PREFIX = 'sa';

/**
 * What the agent signs for an ssh-agent factor: domain-separated, so it is neither an SSH
 * userauth request nor an SSHSIG blob, and bound to this vault and factor.
 */
export function sshAgentMessage(vaultId: string, factorId: string, challenge: string): Buffer {
  return Buffer.concat([
    Buffer.from(`${SSH_AGENT_MESSAGE_PREFIX}\0${vaultId}\0${factorId}\0`),
    Buffer.from(challenge, 'base64'),
  ]);
}

/** KEK = HKDF-SHA256(signature, salt = vault id, info = versioned label + factor id). */
export function sshAgentKek(vaultId: string, factorId: string, signature: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', signature, Buffer.from(vaultId), `${SSH_AGENT_KDF_INFO}\0${factorId}`, 32));
}

/** A new ssh-agent factor's public part; its KEK comes from the agent's signature over the challenge. */
export function newSshAgentFactor(key: AgentKeyRef, id = newFactorId(SSH_AGENT_ID_PREFIX)): Unsealed<SshAgentFactor> {
  return {
    id,
    type: 'ssh-agent',
    created: new Date().toISOString(),
    key,
    challenge: randomBytes(32).toString('base64'),
    kdf: { name: 'hkdf-sha256', info: SSH_AGENT_KDF_INFO },
  };
}

const ELIGIBLE_TYPES = new Set(['ssh-ed25519', 'ssh-rsa']);

/** Why a key type cannot be an unlock factor, or null if it can. */
export function ineligibleReason(type: string): string | null {
  if (ELIGIBLE_TYPES.has(type)) return null;
  if (type.startsWith('ecdsa-')) {
    return `${type} signatures are randomized, so they cannot derive the same unlock key twice; enroll an ed25519 or RSA key`;
  }
  if (type.startsWith('sk-')) {
    return `${type} (security key) signatures carry a counter and need a touch; enroll an ed25519 or RSA key kept in the agent`;
  }
  return `${type} keys are not supported as an unlock factor; enroll an ed25519 or RSA key`;
}

/** Connects to the agent at SSH_AUTH_SOCK; exit 3 when there is none to ask. */
export async function withAgent<T>(socketPath: string | undefined, fn: (agent: AgentClient) => Promise<T>): Promise<T> {
  if (!socketPath) {
    throw new KeyholdError('no SSH agent: SSH_AUTH_SOCK is not set', 'connect with `ssh -A`, or start ssh-agent and ssh-add the key', EXIT.LOCKED);
  }
  let agent: AgentClient;
  try {
    agent = await AgentClient.connect(socketPath);
  } catch (err) {
    throw new KeyholdError((err as Error).message, 'check SSH_AUTH_SOCK (with `ssh -A`, is agent forwarding allowed?)', EXIT.LOCKED);
  }
  try {
    return await fn(agent);
  } catch (err) {
    if (err instanceof AgentClientError) throw new KeyholdError(`SSH agent: ${err.message}`, 'check the agent and try again', EXIT.DENIED);
    throw err;
  } finally {
    agent.close();
  }
}

/** `--key FP|PUBFILE`: a `SHA256:` fingerprint, or a public key file (authorized_keys format). */
export function parseKeySpec(spec: string): { fingerprint: string; blob?: Buffer } {
  if (/^SHA256:[A-Za-z0-9+/]{43}$/.test(spec)) return { fingerprint: spec };
  if (spec.startsWith('SHA256:')) throw usageError(`malformed fingerprint ${JSON.stringify(spec.slice(0, 60))}`, 'copy it from `ssh-add -l`');
  // A public key line is a few KiB at most (RSA 16384: under 3 KiB); /dev/zero is not one.
  const text = readCapped(spec, 64 * 1024, 'public key file', {
    missing: () => notFound(`no public key file ${spec}`, 'pass a SHA256: fingerprint from `ssh-add -l`, or a .pub file'),
  }).toString('utf8');
  const line = text.split('\n').map((l) => l.trim()).find((l) => l && !l.startsWith('#'));
  const fields = line?.split(/\s+/) ?? [];
  const blob = fields[1] ? Buffer.from(fields[1], 'base64') : undefined;
  let type: string | undefined;
  try {
    type = blob ? blobKeyType(blob) : undefined;
  } catch {
    type = undefined;
  }
  if (!blob || type !== fields[0]) {
    throw usageError(`${spec} is not a public key file`, 'pass a .pub file (one `type base64 comment` line) or a SHA256: fingerprint');
  }
  return { fingerprint: fingerprint(blob), blob };
}

function refuseIneligible(type: string): void {
  const reason = ineligibleReason(type);
  if (reason) throw new KeyholdError(`refused: ${reason}`, undefined, EXIT.DENIED);
}

/** Signs a factor's message with the agent and returns the raw signature bytes, verified. */
async function signChallenge(agent: AgentClient, vaultId: string, factor: Pick<SshAgentFactor, 'id' | 'challenge' | 'key'>): Promise<Buffer> {
  const blob = Buffer.from(factor.key.blob, 'base64');
  const message = sshAgentMessage(vaultId, factor.id, factor.challenge);
  const rsa = factor.key.type === 'ssh-rsa';
  const signatureBlob = await agent.sign(blob, message, rsa ? SIGN_FLAG_RSA_SHA2_512 : 0);
  if (!signatureBlob) {
    throw new KeyholdError(`the SSH agent refused to sign with ${factor.key.fingerprint}`, 'was the key added with restrictions (ssh-add -h) or confirmation?', EXIT.DENIED);
  }
  let parsed;
  try {
    parsed = parseSignatureBlob(signatureBlob);
  } catch {
    throw new KeyholdError('the SSH agent returned a malformed signature', undefined, EXIT.DENIED);
  }
  const expected = rsa ? 'rsa-sha2-512' : 'ssh-ed25519';
  if (parsed.algorithm !== expected || !verifySsh(blob, signatureBlob, message)) {
    throw new KeyholdError(`the SSH agent returned a bad ${parsed.algorithm.slice(0, 40)} signature`, `it must sign ${expected}`, EXIT.DENIED);
  }
  return parsed.signature;
}

function eligibleList(identities: Identity[]): string {
  const eligible = identities.filter((i) => ELIGIBLE_TYPES.has(safeType(i.keyBlob)));
  if (eligible.length === 0) return 'the agent holds no ed25519 or RSA key';
  return `the agent holds ${eligible.map((i) => `${fingerprint(i.keyBlob)} (${safeType(i.keyBlob)}${i.comment ? ` ${i.comment}` : ''})`).join(', ')}`;
}

function safeType(blob: Buffer): string {
  try {
    return blobKeyType(blob);
  } catch {
    return '?';
  }
}

/**
 * Enrolls the key named by `spec` in the agent at `socketPath`: signs the new factor's message
 * twice and refuses unless both signatures are the same (a deterministic signer).
 */
export async function enrollSshAgent(vaultId: string, socketPath: string | undefined, spec: string | undefined): Promise<EnrolledFactor<SshAgentFactor>> {
  const wanted = spec === undefined ? undefined : parseKeySpec(spec);
  if (wanted?.blob) refuseIneligible(blobKeyType(wanted.blob));
  return withAgent(socketPath, async (agent) => {
    const identities = await agent.identities();
    if (!wanted) {
      throw usageError('name the key to enroll with --key FP|PUBFILE', eligibleList(identities));
    }
    const identity = identities.find((i) => fingerprint(i.keyBlob) === wanted.fingerprint);
    if (!identity) throw notFound(`the SSH agent does not hold ${wanted.fingerprint}`, eligibleList(identities));
    const type = safeType(identity.keyBlob);
    refuseIneligible(type);
    try {
      publicKeyFromBlob(identity.keyBlob);
    } catch {
      throw new KeyholdError(`the agent's key ${wanted.fingerprint} is malformed or too small`, undefined, EXIT.DENIED);
    }
    const key: AgentKeyRef = { type: type as AgentKeyRef['type'], fingerprint: wanted.fingerprint, blob: identity.keyBlob.toString('base64') };
    const factor = newSshAgentFactor(key);
    const first = await signChallenge(agent, vaultId, factor);
    const second = await signChallenge(agent, vaultId, factor);
    const deterministic = first.equals(second);
    second.fill(0);
    if (!deterministic) {
      first.fill(0);
      throw new KeyholdError('refused: the agent signed the same message twice with different signatures', 'only a deterministic signer (ed25519, RSA) can unlock a vault', EXIT.DENIED);
    }
    const kek = sshAgentKek(vaultId, factor.id, first);
    first.fill(0);
    return { factor, kek };
  });
}

/**
 * KEKs for `factors` whose key the agent holds. With `required`, exit 4 naming the enrolled keys
 * when the agent holds none of them; without, an agent we cannot reach is a source that does not
 * apply (one that misbehaves is still an error).
 */
async function sshAgentKeks(vaultId: string, factors: SshAgentFactor[], socketPath: string | undefined, required: boolean): Promise<FactorKeks> {
  const keks: FactorKeks = new Map();
  if (factors.length === 0 || (!required && !socketPath)) return keks;
  try {
    return await withAgent(socketPath, async (agent) => {
      const held = new Set((await agent.identities()).map((i) => i.keyBlob.toString('base64')));
      for (const factor of factors) {
        if (!held.has(factor.key.blob)) continue;
        const signature = await signChallenge(agent, vaultId, factor);
        keks.set(factor.id, sshAgentKek(vaultId, factor.id, signature));
        signature.fill(0);
      }
      if (keks.size === 0 && required) {
        throw new KeyholdError(
          `the SSH agent holds none of this vault's enrolled keys (${factors.map((f) => f.key.fingerprint).join(', ')})`,
          'forward the agent that holds it (ssh -A), or ssh-add it',
          EXIT.DENIED,
        );
      }
      return keks;
    });
  } catch (err) {
    // The KEKs of keys signed before the agent failed are dropped with the rest.
    for (const kek of keks.values()) kek.fill(0);
    keks.clear();
    if (!required && err instanceof KeyholdError && err.exitCode === EXIT.LOCKED) return keks;
    throw err;
  }
}

/** The fingerprint and type are derived data: they must describe the blob the agent is asked for. */
function describesBlob(key: AgentKeyRef): boolean {
  const blob = Buffer.from(key.blob, 'base64');
  try {
    return blobKeyType(blob) === key.type && fingerprint(blob) === key.fingerprint;
  } catch {
    return false;
  }
}

const agentKeySchema = v.pipe(
  v.object({
    type: v.picklist(['ssh-ed25519', 'ssh-rsa']),
    fingerprint: v.pipe(v.string(), v.regex(FINGERPRINT_PATTERN)),
    blob: v.pipe(v.string(), v.maxLength(4096), v.check((s) => isCanonicalBase64(s))),
  }),
  v.check(describesBlob),
);

export const sshAgentKind: FactorKind<SshAgentFactor> = {
  type: 'ssh-agent',
  idPrefix: SSH_AGENT_ID_PREFIX,
  summary: 'an ed25519 or RSA key in the agent at SSH_AUTH_SOCK (e.g. forwarded with ssh -A)',
  source: 'an SSH agent (SSH_AUTH_SOCK, or ssh -A) holding an enrolled key',
  fields: {
    key: agentKeySchema,
    challenge: v.pipe(v.string(), v.check((s) => isCanonicalBase64(s, 32))),
    kdf: v.object({ name: v.literal('hkdf-sha256'), info: v.literal(SSH_AGENT_KDF_INFO) }),
  },
  addOptions: {
    key: { type: 'string', describe: 'ssh-agent: the key, as SHA256:fingerprint or a .pub file' },
  },
  describe: (factor) => `${factor.id} (ssh-agent ${factor.key.fingerprint})`,
  details: (factor) => ({ column: `${factor.key.fingerprint} (${factor.key.type})`, json: { key_type: factor.key.type, fingerprint: factor.key.fingerprint } }),
  async enroll(context) {
    const enrolled = await enrollSshAgent(context.vaultId, context.env.SSH_AUTH_SOCK || undefined, context.options.key as string | undefined);
    const existing = context.keyring?.factors.find(
      (f) => f.type === sshAgentKind.type && (f as SshAgentFactor).key.fingerprint === enrolled.factor.key.fingerprint,
    );
    if (existing) {
      enrolled.kek.fill(0);
      throw new KeyholdError(`${enrolled.factor.key.fingerprint} is already enrolled as ${existing.id}`, 'nothing was changed');
    }
    return enrolled;
  },
  prove: (factors, context) => sshAgentKeks(context.keyring.vault_id, factors, context.env.SSH_AUTH_SOCK || undefined, context.required),
};
