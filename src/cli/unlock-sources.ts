// What a CLI process can prove to unlock a vault: the KEKs of its factors, from the passphrase
// sources and the SSH agent at SSH_AUTH_SOCK, in the contract's order.
import { EXIT, KeyholdError } from '../errors.js';
import { passphraseKeks, zeroKeks, type FactorKeks, type Keyring } from '../vault/keyring.js';
import { sshAgentKeks } from '../vault/ssh-agent-factor.js';
import { explicitPassphrase, fallbackPassphrase, noPassphraseSource, readPassphrase, type PassphraseRequest } from './passphrase.js';

export type FactorChoice = 'passphrase' | 'ssh-agent';

export interface UnlockRequest extends PassphraseRequest {
  /** `unlock --factor`: only this kind of factor. */
  factor?: FactorChoice | undefined;
}

const AGENT_SOURCE = 'an SSH agent (SSH_AUTH_SOCK) holding an enrolled key';

async function keksOfPassphrase(keyring: Keyring, passphrase: Buffer): Promise<FactorKeks> {
  try {
    return await passphraseKeks(keyring, passphrase);
  } finally {
    passphrase.fill(0);
  }
}

function requirePassphraseFactor(keyring: Keyring): void {
  if (!keyring.factors.some((f) => f.type === 'passphrase')) {
    throw new KeyholdError('this vault has no passphrase factor', 'unlock it with its SSH agent factor (ssh -A)', EXIT.DENIED);
  }
}

/**
 * Policy `any`: an explicit passphrase (file, credential), else an enrolled key in the agent,
 * else KEYHOLD_PASSPHRASE or a prompt; exit 3 naming them when none applies.
 * Policy `all`: the passphrase (any of its sources) and the agent, both required.
 */
export async function collectKeks(keyring: Keyring, request: UnlockRequest): Promise<FactorKeks> {
  const env = request.env ?? process.env;
  const hasPassphrase = keyring.factors.some((f) => f.type === 'passphrase');
  const hasAgent = keyring.factors.some((f) => f.type === 'ssh-agent');
  const agentSocket = env.SSH_AUTH_SOCK || undefined;

  if (keyring.policy === 'all') {
    const keks: FactorKeks = new Map();
    try {
      if (hasPassphrase) for (const [id, kek] of await keksOfPassphrase(keyring, await readPassphrase(request))) keks.set(id, kek);
      if (hasAgent) for (const [id, kek] of await sshAgentKeks(keyring, agentSocket, true)) keks.set(id, kek);
      return keks;
    } catch (err) {
      zeroKeks(keks);
      if (err instanceof KeyholdError && (err.exitCode === EXIT.LOCKED || err.exitCode === EXIT.DENIED)) {
        const needs = [hasPassphrase ? 'the passphrase' : '', hasAgent ? 'an enrolled key in the SSH agent' : ''].filter(Boolean).join(' and ');
        throw new KeyholdError(`this vault needs every factor (policy all: ${needs}); ${err.message}`, err.hint, err.exitCode);
      }
      throw err;
    }
  }

  if (request.factor === 'ssh-agent') return sshAgentKeks(keyring, agentSocket, true);
  if (request.factor === 'passphrase') {
    requirePassphraseFactor(keyring);
    return keksOfPassphrase(keyring, await readPassphrase(request));
  }

  const explicit = explicitPassphrase(request);
  if (explicit) {
    if (!hasPassphrase) explicit.fill(0);
    requirePassphraseFactor(keyring);
    return keksOfPassphrase(keyring, explicit);
  }
  if (hasAgent && agentSocket) {
    try {
      const keks = await sshAgentKeks(keyring, agentSocket, false);
      if (keks.size > 0) return keks;
    } catch (err) {
      // An agent we cannot reach is a source that does not apply; one that misbehaves is an error.
      if (!(err instanceof KeyholdError && err.exitCode === EXIT.LOCKED)) throw err;
    }
  }
  if (hasPassphrase) {
    const passphrase = await fallbackPassphrase(request);
    if (passphrase) return keksOfPassphrase(keyring, passphrase);
  }
  throw hasPassphrase
    ? noPassphraseSource([...(hasAgent ? [AGENT_SOURCE] : []), ...(request.alternatives ?? [])])
    : new KeyholdError('no unlock factor available', `this vault unlocks with ${AGENT_SOURCE}; connect with \`ssh -A\``, EXIT.LOCKED);
}
