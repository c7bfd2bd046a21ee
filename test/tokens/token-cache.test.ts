// The daemon's token cache over a Vault opened directly: lookup by the presented token, expiry,
// and revocations / new tokens written by another Vault instance (another process, in real life).
import { afterEach, describe, expect, it, vi } from 'vitest';
import { TokenCache } from '../../src/tokens/token-cache.js';
import { mintToken, tokenHash } from '../../src/tokens/tokens.js';
import { Vault } from '../../src/vault/vault.js';
import { tempVaults } from '../helpers/temp-vaults.js';

const PASS = 'token cache unit passphrase';

const vaults = tempVaults('keyhold-token-cache-');

afterEach(() => {
  vi.restoreAllMocks();
});

/** The daemon's connection and a CLI's connection to the same vault file. */
async function daemonAndCli(): Promise<[Vault, Vault]> {
  const daemon = await Vault.create(vaults.paths, Buffer.from(PASS));
  const cli = await Vault.open(vaults.paths, async () => Buffer.from(PASS));
  vaults.closeAfter(daemon, cli);
  return [daemon, cli];
}

describe('TokenCache.lookup', () => {
  it('finds a token issued by another Vault instance, by the token (string bytes), with its scope and subject', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    cache.refresh();
    const { token, record } = cli.issueToken('web', 'ci-42', null);
    const found = cache.lookup(Buffer.from(token));
    expect(found).not.toBeNull();
    expect(found!.id).toBe(record.id);
    expect(found!.scope).toBe('web');
    expect(found!.subject).toBe('ci-42');
    expect(found!.revoked).toBeNull();
    expect(found!.expires).toBeNull();
    // The record the cache hands out carries no hash and no full token.
    expect(JSON.stringify(found)).not.toContain(token);
    expect(Object.keys(found!)).not.toContain('hash');
    expect(found!.prefix.length).toBeLessThanOrEqual(8);
  });

  it('unknown, altered, truncated or extended tokens are not found', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const { token } = cli.issueToken('web', '', null);
    const flip = token.slice(0, 20) + (token[20] === 'x' ? 'y' : 'x') + token.slice(21);
    for (const bad of [mintToken(), flip, token.slice(0, -1), token + 'A', token + '\n', token.toUpperCase(), '', 'khp_']) {
      expect(cache.lookup(Buffer.from(bad)), JSON.stringify(bad)).toBeNull();
    }
    // Presenting the stored hash instead of the token does not work either.
    expect(cache.lookup(tokenHash(token))).toBeNull();
    expect(cache.lookup(Buffer.from(token))).not.toBeNull();
  });

  it('tells tokens of different scopes apart', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const web = cli.issueToken('web', 'a', null);
    const api = cli.issueToken('api', 'b', null);
    expect(cache.lookup(Buffer.from(web.token))!.scope).toBe('web');
    expect(cache.lookup(Buffer.from(api.token))!.scope).toBe('api');
    expect(cache.lookup(Buffer.from(api.token))!.id).toBe(api.record.id);
  });
});

describe('TokenCache expiry', () => {
  it('a token is live before its expiry and refused at and after it (clock passed in)', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const { token, record } = cli.issueToken('web', 'ttl', 60_000);
    const expiresAt = Date.parse(record.expires!);
    expect(expiresAt - Date.now()).toBeGreaterThan(55_000);
    expect(expiresAt - Date.now()).toBeLessThanOrEqual(60_000);
    expect(cache.lookup(Buffer.from(token), expiresAt - 1)).not.toBeNull();
    expect(cache.usable(record.id, expiresAt - 1)).toBe(true);
    expect(cache.lookup(Buffer.from(token), expiresAt)).toBeNull();
    expect(cache.usable(record.id, expiresAt)).toBe(false);
    expect(cache.lookup(Buffer.from(token), expiresAt + 3_600_000)).toBeNull();
  });

  it('with the real clock: a 2 s token works now and is refused after 2.5 s', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const issuedAt = Date.now();
    const { token, record } = cli.issueToken('web', 'ttl', 2000);
    expect(cache.lookup(Buffer.from(token))).not.toBeNull();
    expect(cache.usable(record.id)).toBe(true);
    await new Promise((r) => setTimeout(r, Math.max(0, issuedAt + 2500 - Date.now())));
    expect(cache.lookup(Buffer.from(token))).toBeNull();
    expect(cache.usable(record.id)).toBe(false);
  });
});

describe('TokenCache and revocation by another Vault instance', () => {
  it('revokeToken(id) written by the CLI connection is seen on the next lookup', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const a = cli.issueToken('web', 'ci', null);
    const b = cli.issueToken('web', 'ci', null);
    expect(cache.lookup(Buffer.from(a.token))).not.toBeNull();
    expect(cache.usable(a.record.id)).toBe(true);
    const revoked = cli.revokeToken(a.record.id);
    expect(revoked.revoked).not.toBeNull();
    expect(cache.lookup(Buffer.from(a.token))).toBeNull();
    expect(cache.usable(a.record.id)).toBe(false);
    // Only that one.
    expect(cache.lookup(Buffer.from(b.token))).not.toBeNull();
    expect(cache.usable(b.record.id)).toBe(true);
  });

  it('revokeTokens(scope, subject) revokes only the matching tokens', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const webCi1a = cli.issueToken('web', 'ci-1', null);
    const webCi1b = cli.issueToken('web', 'ci-1', null);
    const webCi2 = cli.issueToken('web', 'ci-2', null);
    const apiCi1 = cli.issueToken('api', 'ci-1', null);
    for (const t of [webCi1a, webCi1b, webCi2, apiCi1]) expect(cache.lookup(Buffer.from(t.token))).not.toBeNull();

    expect(cli.revokeTokens('web', 'ci-1')).toBe(2);
    expect(cache.lookup(Buffer.from(webCi1a.token))).toBeNull();
    expect(cache.lookup(Buffer.from(webCi1b.token))).toBeNull();
    expect(cache.lookup(Buffer.from(webCi2.token))).not.toBeNull();
    expect(cache.lookup(Buffer.from(apiCi1.token))).not.toBeNull();

    expect(cli.revokeTokens('web')).toBe(1);
    expect(cache.lookup(Buffer.from(webCi2.token))).toBeNull();
    expect(cache.usable(webCi2.record.id)).toBe(false);
    expect(cache.lookup(Buffer.from(apiCi1.token))).not.toBeNull();
    expect(cache.usable(apiCi1.record.id)).toBe(true);

    // Revoking again changes nothing and finds nothing to revoke.
    expect(cli.revokeTokens('web')).toBe(0);
    expect(cache.lookup(Buffer.from(apiCi1.token))).not.toBeNull();
  });

  it('a revocation written by a third, short-lived Vault instance is seen too', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const { token, record } = cli.issueToken('web', '', null);
    expect(cache.lookup(Buffer.from(token))).not.toBeNull();
    const third = await Vault.open(vaults.paths, async () => Buffer.from(PASS));
    third.revokeToken(record.id);
    third.close();
    expect(cache.lookup(Buffer.from(token))).toBeNull();
  });

  it('a token unknown to the cache at build time is found once issued (rebuild on version change)', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const first = cli.issueToken('web', '', null);
    expect(cache.lookup(Buffer.from(first.token))).not.toBeNull();
    const second = cli.issueToken('web', '', null);
    expect(cache.lookup(Buffer.from(second.token))).not.toBeNull();
  });

  it('re-reads the vault only when the version moved (no DB read per lookup)', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const { token, record } = cli.issueToken('web', '', null);
    const reads = vi.spyOn(daemon, 'activeTokens');
    for (let i = 0; i < 50; i++) {
      expect(cache.lookup(Buffer.from(token))).not.toBeNull();
      expect(cache.usable(record.id)).toBe(true);
    }
    expect(reads).toHaveBeenCalledTimes(1);
    cli.listTokens(); // a read by another connection is not a change
    cache.lookup(Buffer.from(token));
    expect(reads).toHaveBeenCalledTimes(1);
    cli.revokeToken(record.id);
    expect(cache.lookup(Buffer.from(token))).toBeNull();
    expect(reads).toHaveBeenCalledTimes(2);
    expect(cache.usable(record.id)).toBe(false);
    expect(reads).toHaveBeenCalledTimes(2);
  });

  it('revoking an unknown id throws a not-found error and revokes nothing', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const { token } = cli.issueToken('web', '', null);
    const version = cli.version();
    expect(() => cli.revokeToken('tok_000000000000')).toThrow(/no token/);
    expect(cli.version()).toBe(version);
    expect(cache.lookup(Buffer.from(token))).not.toBeNull();
  });
});

describe('TokenCache.refusal (why a token was refused, for the daemon log)', () => {
  it('says revoked or expired with the token id, and unknown for a token the vault never issued', async () => {
    const [daemon, cli] = await daemonAndCli();
    const cache = new TokenCache(daemon);
    const revoked = cli.issueToken('web', 'r', null);
    const expiring = cli.issueToken('web', 'e', 60_000);
    cli.revokeToken(revoked.record.id);
    expect(cache.lookup(Buffer.from(revoked.token))).toBeNull();
    expect(cache.refusal(Buffer.from(revoked.token))).toEqual({ reason: 'revoked', tokenId: revoked.record.id });
    const after = Date.parse(expiring.record.expires!) + 1;
    expect(cache.lookup(Buffer.from(expiring.token), after)).toBeNull();
    expect(cache.refusal(Buffer.from(expiring.token), after)).toEqual({ reason: 'expired', tokenId: expiring.record.id });
    expect(cache.refusal(Buffer.from(mintToken()))).toEqual({ reason: 'unknown' });
    // Both revoked and past its expiry: revoked (the act the operator took) is what the log says.
    cli.revokeToken(expiring.record.id);
    expect(cache.refusal(Buffer.from(expiring.token), after)).toEqual({ reason: 'revoked', tokenId: expiring.record.id });
  });
});
