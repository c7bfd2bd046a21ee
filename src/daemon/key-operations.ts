// OpenSSH's key operations (ssh-add) on a scope socket: add stores the key in the vault and assigns
// it to the scope (a certificate is stored in the scope as an identity of its own, its key in the
// vault), remove unassigns the key or removes the certificate (the key stays in the vault), lock
// and unlock lock the daemon, the unlock password being a vault passphrase. Constraints (-c, -t,
// -h) are stored with the identity they constrain, the key's assignment or the certificate (see
// src/policy/ssh-add-constraints.ts); a re-add replaces them, as OpenSSH's agent does (ssh-add
// sends a key and then its certificate, each with the same constraints). Container tokens may do
// none of this. Each refusal logs one warning
// (rate-limited) naming the keyhold command that does it instead, never key material.
import type { Logger } from 'pino';
import { EXIT, KeyholdError } from '../errors.js';
import type { AddIdentityRequest } from '../agent-protocol/messages.js';
import type { AuditEvent, AuditPeer } from '../audit/audit-log.js';
import type { AgentBackend, RequestContext } from '../signer/backend.js';
import type { AuditedConstraints, DaemonVaultApi } from '../vault/api.js';
import { destinationHostNames, storedConstraints } from '../policy/ssh-add-constraints.js';
import { describeSupportedKey, toPkcs8 } from '../vault/key-material.js';
import { readKeyring, zeroKeks, type FactorKeks } from '../vault/keyring.js';
import { passphraseKeks } from '../unlock/passphrase.js';
import type { VaultSession } from './vault-session.js';

export interface KeyOperationsOptions {
  session: VaultSession;
  log: Logger;
  /** Runs a change through the vault API as the control socket's `call` does (write lock, audit, sockets). */
  changeVault: <T>(actor: AuditPeer, change: (api: DaemonVaultApi) => Promise<T>) => Promise<T>;
  /** Unlocks as the control socket's `unlock` does; rejects when the KEKs do not open the vault. */
  unlock: (keks: FactorKeks, actor: AuditPeer) => Promise<void>;
  record: (event: AuditEvent) => Promise<void>;
  /** Shared by every scope of the daemon: failed unlocks slow down the next, whichever socket. */
  unlockAttempts: UnlockAttempts;
  /** ssh-agent -t: the lifetime (seconds) of an add that names none; null: none. */
  addLifetimeSeconds?: number | null;
}

type Operation = 'add' | 'remove' | 'remove-all' | 'lock' | 'unlock';
type KeyOperations = Required<Pick<AgentBackend, 'addIdentity' | 'addRefused' | 'removeIdentity' | 'removeAllIdentities' | 'lock' | 'unlock'>>;

/** As OpenSSH's agent: each failed unlock delays the next one a little longer. */
export const UNLOCK_DELAY_STEP_MS = 100;
export const UNLOCK_DELAY_MAX_MS = 10_000;
/** One warning per kind of refusal per scope in this window; the rest are counted. */
const WARNING_INTERVAL_MS = 60_000;

/** The keyhold command that does what ssh-add asked, for the refusal's warning. */
function insteadFor(operation: Operation, scope: string): string {
  switch (operation) {
    case 'add':
      return `keyhold key import ${scope} FILE`;
    case 'remove':
    case 'remove-all':
      return `keyhold key unassign ${scope} FINGERPRINT`;
    case 'lock':
      return 'keyhold lock';
    case 'unlock':
      return 'keyhold unlock';
  }
}

/** Logs a refusal's warning at most once per interval for each kind of refusal. */
class RateLimitedWarnings {
  private readonly last = new Map<string, { at: number; suppressed: number }>();
  constructor(private readonly log: Logger) {}

  warn(kind: string, fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    const seen = this.last.get(kind);
    if (seen && now - seen.at < WARNING_INTERVAL_MS) {
      seen.suppressed++;
      return;
    }
    if (this.last.size >= 1000) this.last.clear();
    this.last.set(kind, { at: now, suppressed: 0 });
    this.log.warn({ ...fields, ...(seen?.suppressed ? { suppressed: seen.suppressed } : {}) }, message);
  }
}

/** Unlock attempts through ssh-add -X, one at a time, each after the delay earlier failures earned. */
export class UnlockAttempts {
  private failures = 0;
  private queue: Promise<unknown> = Promise.resolve();

  /** `attempt` answers whether it unlocked; a false (or a throw) counts as a failure, a true resets the count. */
  run(attempt: () => Promise<boolean>): Promise<boolean> {
    const next = this.queue.then(async () => {
      const delay = Math.min(UNLOCK_DELAY_STEP_MS * this.failures, UNLOCK_DELAY_MAX_MS);
      // A timer, not a busy wait: the other connections are answered meanwhile.
      if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
      let unlocked = false;
      try {
        unlocked = await attempt();
        return unlocked;
      } finally {
        this.failures = unlocked ? 0 : this.failures + 1;
      }
    });
    this.queue = next.catch(() => undefined);
    return next;
  }

  get failed(): number {
    return this.failures;
  }
}

export function keyOperations(scope: string, options: KeyOperationsOptions): KeyOperations {
  const { session, log } = options;
  const warnings = new RateLimitedWarnings(log);
  const actorOf = (context: RequestContext) => context.peer as AuditPeer;
  /** Every refusal is audited (`reason`: why, in a word) and logged with what to do instead. */
  /** `kind`: what the warning's rate limit counts as one kind of refusal (by default, `why`). */
  const refuse = (context: RequestContext, operation: Operation, why: string, message: string, fields: Record<string, unknown> = {}, kind = why): false => {
    void options
      .record({ event: 'agent-operation-refused', scope, operation, ...(context.tokenId ? { token_id: context.tokenId } : {}), peer: actorOf(context), reason: why })
      .catch(() => log.warn({ scope, operation }, 'agent-operation-refused not in the audit log (it cannot be written now)'));
    warnings.warn(`${operation}:${kind}`, { scope, operation, ...fields }, message);
    return false;
  };
  /** Container tokens may only list and sign: every key operation is refused. */
  const refusedForToken = (operation: Operation, context: RequestContext): boolean => {
    if (!context.tokenId) return false;
    refuse(context, operation, 'container token', `ssh-add through a container token cannot ${operation === 'remove-all' ? 'remove keys' : `${operation} keys`}; on the host use \`${insteadFor(operation, scope)}\``, {
      token_id: context.tokenId,
    });
    return true;
  };
  /** A vault change that failed: FAILURE, with a warning saying why (the error's message carries no secret). */
  const failed = (context: RequestContext, operation: Operation, err: unknown): false => {
    if (!session.unlocked) return refuse(context, operation, 'locked', `ssh-add cannot ${operation === 'add' ? 'add keys' : 'remove keys'} while the vault is locked; use \`keyhold unlock\` (or ssh-add -X) first`);
    return refuse(context, operation, 'error', `ssh-add ${operation} failed: ${(err as Error).message}; use \`${insteadFor(operation, scope)}\``);
  };

  return {
    addRefused(reason, context) {
      if (refusedForToken('add', context)) return;
      refuse(context, 'add', 'unsupported', `ssh-add cannot add this: ${reason}; keyhold holds ed25519, ECDSA and RSA keys (\`keyhold key generate ${scope}\` makes one)`, {}, `unsupported:${reason}`);
    },

    async addIdentity(request: AddIdentityRequest, context) {
      if (refusedForToken('add', context)) return false;
      const constraints = { ...request.constraints };
      // As ssh-agent -t: a key added without a lifetime gets the agent's.
      if (constraints.lifetimeSeconds === null && options.addLifetimeSeconds) constraints.lifetimeSeconds = options.addLifetimeSeconds;
      const audited: AuditedConstraints = {
        ...(constraints.confirm ? { confirm: true as const } : {}),
        ...(constraints.lifetimeSeconds !== null ? { lifetime_s: constraints.lifetimeSeconds } : {}),
        ...(constraints.destinations.length > 0 ? { hosts: destinationHostNames(constraints.destinations) } : {}),
      };
      try {
        describeSupportedKey(request.key.key);
      } catch (err) {
        return refuse(context, 'add', 'unsupported', `ssh-add cannot add this key: ${(err as Error).message}; use \`keyhold key generate ${scope}\` for a new one`, {
          fingerprint: request.key.fingerprint,
        });
      }
      const key = request.key.key;
      const certificate = request.key.certificate;
      const auditedOrNull = Object.keys(audited).length > 0 ? audited : null;
      if (certificate) {
        try {
          await options.changeVault(actorOf(context), (api) =>
            api.addAgentCertificate(scope, toPkcs8(key), certificate.blob, request.comment, storedConstraints(constraints, Date.now()), auditedOrNull),
          );
          log.info({ scope, fingerprint: request.key.fingerprint, certificate: { key_id: certificate.keyId, serial: certificate.serial.toString() }, ...audited }, 'ssh-add: certificate added');
          return true;
        } catch (err) {
          return failed(context, 'add', err);
        }
      }
      try {
        // Each attempt exports its own PKCS#8 copy: importKey zeroes what it is given.
        // Dated when stored (each retry anew), so a busy vault does not shorten the lifetime.
        await options.changeVault(actorOf(context), (api) =>
          api.addAgentKey(scope, toPkcs8(key), request.comment, storedConstraints(constraints, Date.now()), auditedOrNull),
        );
        log.info({ scope, fingerprint: request.key.fingerprint, ...audited }, 'ssh-add: key added');
        return true;
      } catch (err) {
        return failed(context, 'add', err);
      }
    },

    async removeIdentity(keyBlob, context) {
      if (refusedForToken('remove', context)) return false;
      const entry = session.keys()?.scope(scope).byBlob.get(keyBlob.toString('latin1'));
      if (!session.unlocked) return failed(context, 'remove', null);
      if (!entry) return refuse(context, 'remove', 'unknown', `ssh-add -d: that key is not in scope ${scope}; see \`keyhold key list --scope ${scope}\``);
      if (entry.certificate) {
        // A certificate goes alone: its key's plain assignment, if any, stays (as OpenSSH).
        const blob = Buffer.from(keyBlob);
        try {
          await options.changeVault(actorOf(context), (api) => api.removeCertificate(scope, blob));
          log.info({ scope, fingerprint: entry.fingerprint, certificate: entry.certificate }, 'ssh-add -d: certificate removed');
          return true;
        } catch (err) {
          return failed(context, 'remove', err);
        }
      }
      try {
        await options.changeVault(actorOf(context), (api) => api.unassign(scope, entry.fingerprint));
        log.info({ scope, fingerprint: entry.fingerprint }, 'ssh-add -d: key unassigned');
        return true;
      } catch (err) {
        return failed(context, 'remove', err);
      }
    },

    async removeAllIdentities(context) {
      if (refusedForToken('remove-all', context)) return false;
      const cache = session.keys();
      if (!cache) return failed(context, 'remove-all', null);
      const scopeKeys = cache.scope(scope);
      const fingerprints: string[] = [];
      const certificates: Buffer[] = [];
      for (const identity of scopeKeys.identities) {
        const entry = scopeKeys.byBlob.get(identity.keyBlob.toString('latin1'));
        if (entry?.certificate) certificates.push(identity.keyBlob);
        else if (entry) fingerprints.push(entry.fingerprint);
      }
      // A retry (the vault was busy part way) finds what it already removed gone: that is what
      // was asked, not a failure.
      const goneIsDone = (err: unknown) => {
        if (!(err instanceof KeyholdError && err.exitCode === EXIT.NOT_FOUND)) throw err;
      };
      try {
        await options.changeVault(actorOf(context), async (api) => {
          for (const fingerprint of fingerprints) await api.unassign(scope, fingerprint).catch(goneIsDone);
          for (const certificate of certificates) await api.removeCertificate(scope, certificate).catch(goneIsDone);
        });
        log.info({ scope, count: fingerprints.length + certificates.length }, 'ssh-add -D: keys unassigned');
        return true;
      } catch (err) {
        return failed(context, 'remove-all', err);
      }
    },

    lock(_passphrase, context) {
      if (refusedForToken('lock', context)) return false;
      // As OpenSSH: locking a locked agent fails.
      if (!session.unlocked) return refuse(context, 'lock', 'locked', 'ssh-add -x: the daemon is already locked; `keyhold status` shows it');
      // The lock password is not kept: the daemon unlocks with a vault passphrase.
      session.lock('ssh-add -x', actorOf(context));
      log.info({ scope }, 'ssh-add -x: daemon locked; ssh-add -X unlocks with a vault passphrase');
      return true;
    },

    unlock(passphrase, context) {
      if (refusedForToken('unlock', context)) return false;
      // As OpenSSH: unlocking an unlocked agent fails (not counted as a wrong password).
      if (session.unlocked) return refuse(context, 'unlock', 'unlocked', 'ssh-add -X: the daemon is not locked; `keyhold status` shows it');
      // The passphrase is a view the connection wipes once answered: this copy is ours to zero.
      const copy = Buffer.from(passphrase);
      const actor = actorOf(context);
      const attempt = async (): Promise<boolean> => {
        if (session.unlocked) return true;
        let keks: FactorKeks | null = null;
        try {
          keks = await passphraseKeks(readKeyring(session.paths.keys), copy);
          await options.unlock(keks, actor);
        } catch {
          return refuse(context, 'unlock', 'wrong', 'ssh-add -X: the password is not a vault passphrase; use `keyhold unlock`', { failures: options.unlockAttempts.failed + 1 });
        } finally {
          if (keks) zeroKeks(keks);
        }
        log.info({ scope }, 'ssh-add -X: daemon unlocked');
        return true;
      };
      return options.unlockAttempts.run(attempt).finally(() => copy.fill(0));
    },
  };
}
