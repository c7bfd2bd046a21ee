// Compiled policies per scope, rebuilt only when the vault's version counter moves: deciding a sign
// request reads no database and parses nothing.
import type { Vault } from '../vault/vault.js';
import { compilePolicy, type CompiledPolicy } from './compile.js';
import { describePolicyProblem, NO_POLICY, policyDocumentProblem, type PolicyDocument } from './policy.js';

/** Shared by every scope without a policy: inactive, signs as before. */
export const NO_POLICY_COMPILED: CompiledPolicy = compilePolicy(NO_POLICY);

/** What a stored policy that cannot be used becomes: fail closed, refuse everything. */
const DENY_ALL: PolicyDocument = { default: 'deny', rules: [] };
const DENY_ALL_COMPILED: CompiledPolicy = compilePolicy(DENY_ALL);

export class PolicyCache {
  private builtFrom = -1;
  private scopes = new Map<string, CompiledPolicy>();
  private damaged: string[] = [];

  /** `observe` reads the vault's version counter (the daemon passes a cheaper, per-turn one). */
  constructor(
    private readonly vault: Vault,
    private readonly observe: () => number = () => vault.observedVersion(),
  ) {}

  /** Rebuilds when the vault changed; returns true if it did. */
  refresh(): boolean {
    const version = this.observe();
    if (version === this.builtFrom) return false;
    let rows;
    try {
      rows = this.vault.policies();
    } catch {
      // The vault cannot be read right now (busy, an I/O error): keep what we have and try again
      // at the next request.
      return false;
    }
    const scopes = new Map<string, CompiledPolicy>();
    const damaged: string[] = [];
    for (const row of rows) {
      const { policy, problem } = compileStored(row.document);
      scopes.set(row.scope, policy);
      if (problem) damaged.push(`the stored policy of scope ${row.scope} is damaged (${problem}): every request of the scope is refused until it is set again`);
    }
    this.scopes = scopes;
    this.damaged = damaged;
    this.builtFrom = version;
    return true;
  }

  /** The vault version the cache was built from; -1 before the first build. */
  get version(): number {
    return this.builtFrom;
  }

  /**
   * The compiled policy of a scope as of the last refresh (NO_POLICY_COMPILED without one). Before
   * the policies could be read even once, nobody knows which scopes have one: every scope refuses
   * (fail closed) rather than sign as if none had.
   */
  forScope(scope: string): CompiledPolicy {
    if (this.builtFrom === -1) return DENY_ALL_COMPILED;
    return this.scopes.get(scope) ?? NO_POLICY_COMPILED;
  }

  /** True once the policies were read at least once (until then every scope refuses). */
  get loaded(): boolean {
    return this.builtFrom !== -1;
  }

  /** Stored policies that could not be used (compiled as deny-all), one sentence each, for the log. */
  problems(): string[] {
    return [...this.damaged];
  }

  clear(): void {
    this.scopes = new Map();
    this.damaged = [];
    this.builtFrom = -1;
  }
}

function compileStored(json: string): { policy: CompiledPolicy; problem?: string } {
  let document: unknown;
  try {
    document = JSON.parse(json);
  } catch {
    return { policy: compilePolicy(DENY_ALL), problem: 'not JSON' };
  }
  const problem = policyDocumentProblem(document);
  if (problem) return { policy: compilePolicy(DENY_ALL), problem: describePolicyProblem(problem) };
  try {
    return { policy: compilePolicy(document as PolicyDocument) };
  } catch (err) {
    return { policy: compilePolicy(DENY_ALL), problem: err instanceof Error ? err.message : 'does not compile' };
  }
}
