// The agent backend for one scope: the vault's key cache, re-checked on every request. While the
// vault is locked there is no cache: no identities, and every signature is refused. Every
// signature and refusal is recorded for the audit log.
import { createHash } from 'node:crypto';
import { verifiedCertificateOf } from '../agent-protocol/certificate.js';
import { fingerprint } from '../agent-protocol/public-key.js';
import { signatureAlgorithmFor, signSsh, type SignatureAlgorithm } from '../agent-protocol/signature.js';
import { parseUserauthRequest, type UserauthRequest } from '../agent-protocol/userauth.js';
import type { AuditEvent } from '../audit/audit-log.js';
import type { ApprovalQuestion, Approvals, Caller } from '../policy/approvals.js';
import { authenticationHost, classifySignedData, hostKeyFingerprint } from '../policy/classify.js';
import type { CompiledPolicy } from '../policy/compile.js';
import { NO_POLICY_COMPILED } from '../policy/policy-cache.js';
import { peerAccount, peerIdentity, PolicyState } from '../policy/grants.js';
import type { SignFacts } from '../policy/policy.js';
import type { AgentBackend, RequestContext, SignResult } from '../signer/backend.js';
import type { CachedKey, KeyCache, ScopeKeys } from '../vault/key-cache.js';
import { expired, identityPermitted, signRefusalByDestinations, type CompiledConstraints } from '../policy/ssh-add-constraints.js';
import type { SignPool } from './sign-pool.js';

export interface ScopeBackendOptions {
  /** SHA-1 `ssh-rsa` signatures; refused unless explicitly allowed. */
  allowSha1: boolean;
  /** Resolves once the event's line is in the audit log; rejects if it cannot be written. */
  record: (event: AuditEvent, options?: { signature?: boolean }) => Promise<void>;
  /** Why the audit log cannot be written now, or null when it can. */
  auditFailure: () => { code: string } | null;
  /** A sign request refused because the audit log cannot be written (counted, not logged one by one). */
  countAuditRefusal: () => void;
  /** Signing threads for RSA (see sign-pool.ts); without one, everything signs inline. */
  pool?: SignPool | null;
  /** The scope's policy, compiled once per vault version (no policy: inactive). */
  policy?: (scope: string) => CompiledPolicy;
  /** Where confirmations wait; without it a confirm is refused as unanswered. */
  approvals?: Approvals | null;
}

/** Who asked, a digest of what was signed and, for an SSH login, as whom and to which host. */
function signDetails(scope: string, data: Buffer, context: RequestContext, userauth: UserauthRequest | null): AuditEvent {
  const event: AuditEvent = {
    event: 'sign',
    scope,
    peer: context.peer,
    ...(context.tokenId ? { token_id: context.tokenId } : {}),
    data_sha256: createHash('sha256').update(data).digest('hex'),
  };
  if (userauth) {
    event.user = userauth.user;
    // The host key comes from the request itself (hostbound) or from a verified session-bind.
    const hostKey = userauth.hostKey ?? context.bindings.find((b) => b.sessionId.equals(userauth.sessionId))?.hostKey;
    if (hostKey) {
      event.host_key = hostKeyFingerprint(hostKey);
      // A host bound by its certificate: host_key is the certified key; say which certificate and CA.
      const cert = verifiedCertificateOf(hostKey);
      if (cert) event.host_certificate = { key_id: cert.keyId, serial: cert.serial.toString(), ca: fingerprint(cert.signatureKey) };
    }
  }
  return event;
}

function connectionBinds(context: RequestContext) {
  return { bindings: context.bindings, bindAttempted: context.sessionBindAttempted === true };
}

/** The scope's identities less those ssh-add's constraints hide here: expired, or not for this destination. */
function permittedIdentities(scopeKeys: ScopeKeys, context: RequestContext) {
  const now = Date.now();
  const binds = connectionBinds(context);
  return scopeKeys.identities.filter((identity) => {
    const constraints = scopeKeys.constraints.get(identity.keyBlob.toString('latin1'));
    return constraints === undefined || (!expired(constraints, now) && identityPermitted(constraints.destinations, binds, null));
  });
}

/** Who asks, as a confirmation question names them. */
function callerOf(context: RequestContext): Caller {
  const peer = context.peer;
  const where: Caller =
    peer.kind === 'unix'
      ? { pid: peer.pid, uid: peer.uid, exe: peer.exe, ...(context.processStart ? { start_time: context.processStart } : {}) }
      : { address: `${peer.address}:${peer.port}` };
  if (context.tokenId) return { ...where, token_id: context.tokenId, subject: context.tokenSubject ?? '' };
  return where;
}

/**
 * Every answer waits for its audit line: a signature leaves only once the line that records it is
 * in the log file (the writer batches a whole turn of the event loop into one write), and when the
 * log cannot be written nothing is signed at all.
 *
 * Under an active policy each request is classified once (login, sshsig, other), decided by the
 * compiled rules, and an allowed one counted against its rule's rate; a confirm is signed at once
 * when a remembered approval covers it, else it waits (a promise: other connections go on) for
 * an approval. A scope without a policy takes exactly the path, and writes exactly the audit
 * line, it always did, unless the key has ssh-add constraints.
 *
 * ssh-add's constraints are a filter in front of the policy, never a grant: an expired key is
 * neither offered nor used (before the daemon's sweep removes it), a destination-constrained key
 * is refused where OpenSSH's agent refuses it (rule `ssh-add`), and a key added with -c turns the
 * policy's allow into a confirm (rule `ssh-add`; every use asks, as OpenSSH's agent does).
 */
export function scopeBackend(keys: () => KeyCache | null, scope: string, options: ScopeBackendOptions): AgentBackend {
  const AUDIT_UNAVAILABLE: SignResult = { ok: false, reason: 'audit-unavailable' };
  const refusal = (reason: Exclude<SignResult, { ok: true }>['reason'], fp?: string): SignResult => ({ ok: false, reason, ...(fp ? { fingerprint: fp } : {}) });
  /** The result, once its audit line is written; a signature whose line cannot be written is withheld. */
  const audited = (result: SignResult, event: AuditEvent): Promise<SignResult> => {
    const recorded = result.ok
      ? options.record({ ...event, fingerprint: result.fingerprint, algorithm: result.algorithm }, { signature: true })
      : options.record({ ...event, event: 'sign-refused', reason: result.reason, ...(result.fingerprint ? { fingerprint: result.fingerprint } : {}) });
    return recorded.then(
      () => result,
      () => (result.ok ? AUDIT_UNAVAILABLE : result),
    );
  };
  const signWith = (entry: CachedKey, algorithm: SignatureAlgorithm, data: Buffer, event: AuditEvent): Promise<SignResult> => {
    const signed = (signature: Buffer): SignResult => ({ ok: true, signature, fingerprint: entry.fingerprint, algorithm });
    if (options.pool && entry.type === 'ssh-rsa' && options.pool.offload()) {
      return options.pool.sign(entry.fingerprint, entry.key, algorithm, data).then(
        (signature) => audited(signed(signature), event),
        () => audited(refusal('error', entry.fingerprint), event),
      );
    }
    return audited(signed(signSsh(entry.key, algorithm, data)), event);
  };

  // Grants and rate counters live as long as the policy they were made under. Every vault change
  // compiles every policy anew; one whose document is the same keeps its state (a secret set or a
  // token issued must not forget approvals), any other change starts afresh.
  let state: PolicyState | null = null;
  let stateDocument = '';
  const stateFor = (policy: CompiledPolicy): PolicyState => {
    if (state?.policy === policy) return state;
    const document = JSON.stringify(policy.document);
    if (state && document === stateDocument) state.adopt(policy);
    else state = new PolicyState(policy);
    stateDocument = document;
    return state;
  };

  const decide = (
    policy: CompiledPolicy,
    scopeKeys: ScopeKeys,
    keyBlob: Buffer,
    entry: CachedKey,
    algorithm: SignatureAlgorithm,
    data: Buffer,
    userauth: UserauthRequest | null,
    context: RequestContext,
    event: AuditEvent,
    constraints: CompiledConstraints | undefined,
  ): Promise<SignResult> => {
    // Filled in place rather than spread into a new object: this runs for every signature.
    const facts = classifySignedData(data, context.bindings, userauth) as SignFacts;
    facts.key = entry.fingerprint;
    const peer = context.peer;
    if (peer.kind === 'unix') facts.exe = peer.exe;
    if (context.tokenSubject !== undefined) facts.subject = context.tokenSubject;
    const decision = policy.decide(facts);
    // ssh-add -c: what the policy allows still needs a confirmation (a deny stays a deny).
    const keyConfirm = constraints?.confirm === true && decision.action === 'allow';
    event.decision = keyConfirm ? 'confirm' : decision.action;
    event.rule = keyConfirm ? 'ssh-add' : decision.rule === null ? 'default' : decision.rule + 1;
    event.purpose = facts.purpose;
    if (facts.namespace !== undefined) event.namespace = facts.namespace;
    const fp = entry.fingerprint;
    if (decision.action === 'deny') return audited(refusal('policy', fp), event);
    const current = stateFor(policy);
    const rule = decision.rule === null ? null : policy.rules[decision.rule]!;
    if (rule?.rate && !current.takeRate(peerAccount(context), rule)) return audited(refusal('rate', fp), event);
    if (decision.action === 'allow' && !keyConfirm) return signWith(entry, algorithm, data, event);

    // A grant covers what was approved: this process or token, key and rule, and the same kind of
    // request by the same route (a local login's approval must not cover what a forwarded
    // connection of the same ssh process asks, nor another purpose).
    const who = peerIdentity(context);
    // A key's own -c is asked every time, as OpenSSH's agent asks: no remembered approval covers it.
    const identity = who === null || keyConfirm ? null : `${who}|${facts.purpose}|${facts.forwarded ? 'forwarded' : 'local'}`;
    if (identity && current.granted(identity, fp, decision.rule)) {
      event.approved_by = { channel: 'remembered' };
      return signWith(entry, algorithm, data, event);
    }
    const approvals = options.approvals;
    if (!approvals) return audited(refusal('confirm-timeout', fp), event);
    const comment = scopeKeys.identities.find((identity) => identity.keyBlob.equals(keyBlob))?.comment ?? '';
    const question: ApprovalQuestion = {
      scope,
      key: { fingerprint: fp, comment },
      purpose: facts.purpose,
      ...(facts.hostKey !== undefined ? { host: facts.hostKey } : {}),
      ...(facts.user !== undefined ? { user: facts.user } : {}),
      ...(facts.namespace !== undefined ? { namespace: facts.namespace } : {}),
      rule: keyConfirm ? 'ssh-add' : decision.rule === null ? 'default' : decision.rule + 1,
      caller: callerOf(context),
    };
    // The data is a view into a socket chunk, and the answer may take seconds.
    const kept = Buffer.from(data);
    return approvals.ask(question, peerAccount(context), context.hangup).then((outcome) => {
      if (!outcome.approved) {
        if (outcome.reason === 'denied') event.denied_by = outcome.by;
        return audited(refusal(outcome.reason, fp), event);
      }
      event.approved_by = outcome.by;
      // Approved while the vault was locked, or the key left the scope meanwhile: not signed.
      const now = keys();
      if (!now) return audited(refusal('locked', fp), event);
      const nowKeys = now.scope(scope);
      const id = keyBlob.toString('latin1');
      const nowConstraints = nowKeys.constraints.get(id);
      if (!nowKeys.byBlob.has(id) || expired(nowConstraints, Date.now())) return audited(refusal('unknown-key', fp), event);
      // ssh-add -h given again meanwhile: its destinations as they are now (read from our copy of the data).
      if (nowConstraints && nowConstraints.destinations.length > 0) {
        const why = signRefusalByDestinations(nowConstraints.destinations, connectionBinds(context), parseUserauthRequest(kept), keyBlob);
        if (why !== null) {
          event.detail = why;
          return audited(refusal('policy', fp), event);
        }
      }
      // The policy changed while the request waited: what it says now decides whether an approval
      // still counts (a rule that now denies wins over the approval given under the old one).
      const latest = options.policy?.(scope);
      if (latest && latest !== policy && latest.decide(facts).action === 'deny') return audited(refusal('policy', fp), event);
      const rememberMs = outcome.rememberMs ?? rule?.rememberMs ?? null;
      if (rememberMs !== null && identity) current.grant(identity, fp, decision.rule, rememberMs);
      return signWith(entry, algorithm, kept, event);
    });
  };

  return {
    identities(context) {
      const cache = keys();
      if (!cache) return [];
      const scopeKeys = cache.scope(scope);
      const policy = options.policy?.(scope);
      const offered = scopeKeys.constraints.size === 0 ? scopeKeys.identities : permittedIdentities(scopeKeys, context);
      if (!policy?.active) return offered;
      // Routing: a connection ssh bound to a host for authentication is offered only the keys
      // some rule may allow or confirm for that host.
      const hostKey = authenticationHost(context.bindings);
      if (hostKey === null) return offered;
      const peer = context.peer;
      const facts = {
        hostKey,
        forwarded: context.bindings.some((b) => b.isForwarding),
        ...(peer.kind === 'unix' ? { exe: peer.exe } : {}),
        ...(context.tokenSubject !== undefined ? { subject: context.tokenSubject } : {}),
      };
      return offered.filter((identity) => {
        const entry = scopeKeys.byBlob.get(identity.keyBlob.toString('latin1'));
        return entry !== undefined && policy.mayOffer({ ...facts, key: entry.fingerprint });
      });
    },
    sign(keyBlob, data, flags, context): SignResult | Promise<SignResult> {
      const cache = keys();
      const userauth = parseUserauthRequest(data);
      // Locked: refused at once (the refusal is kept in memory until an unlock can write it).
      if (!cache) return audited(refusal('locked'), signDetails(scope, data, context, userauth));
      if (options.auditFailure()) {
        options.countAuditRefusal();
        return AUDIT_UNAVAILABLE;
      }
      // The data is a view into a socket chunk: the audit digest is taken now, not later.
      const event = signDetails(scope, data, context, userauth);
      const scopeKeys = cache.scope(scope);
      const id = keyBlob.toString('latin1');
      const entry = scopeKeys.byBlob.get(id);
      if (!entry) return audited(refusal('unknown-key'), event);
      const constraints = scopeKeys.constraints.size === 0 ? undefined : scopeKeys.constraints.get(id);
      // Expired but not yet swept: as if it were gone already.
      if (constraints && expired(constraints, Date.now())) return audited(refusal('unknown-key'), event);
      if (entry.certificate) event.certificate = entry.certificate;
      const algorithm = signatureAlgorithmFor(entry.type, flags);
      if (algorithm === 'ssh-rsa' && !options.allowSha1) return audited(refusal('sha1-refused', entry.fingerprint), event);
      if (constraints && constraints.destinations.length > 0) {
        const why = signRefusalByDestinations(constraints.destinations, connectionBinds(context), userauth, keyBlob);
        if (why !== null) {
          event.decision = 'deny';
          event.rule = 'ssh-add';
          event.detail = why;
          return audited(refusal('policy', entry.fingerprint), event);
        }
      }
      const policy = options.policy?.(scope);
      if (policy?.active || constraints?.confirm) {
        return decide(policy ?? NO_POLICY_COMPILED, scopeKeys, keyBlob, entry, algorithm, data, userauth, context, event, constraints);
      }
      return signWith(entry, algorithm, data, event);
    },
  };
}
