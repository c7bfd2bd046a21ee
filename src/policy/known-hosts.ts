// Host names in a policy resolved to host key fingerprints the way ssh finds a host's keys: the
// known_hosts files, read as sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT" describes them (patterns with
// * and ?, negation, [host]:port, hashed names, @revoked, @cert-authority).
import { createHmac, timingSafeEqual } from 'node:crypto';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { blobKeyType, fingerprint } from '../agent-protocol/public-key.js';
import { usageError } from '../errors.js';
import { readCapped } from '../read-capped.js';
import { globMatch } from './compile.js';
import { fieldLine, type ParsedPolicy } from './parse.js';
import type { PolicyDocument, PolicyRule, ResolvedHost } from './policy.js';

/** A known_hosts file larger than this is read only up to it (no user has one near it). */
const MAX_KNOWN_HOSTS_BYTES = 64 * 1024 * 1024;

/** ssh's default UserKnownHostsFile and GlobalKnownHostsFile, in the order ssh reads them. */
export function defaultKnownHostsFiles(): string[] {
  const ssh = join(homedir(), '.ssh');
  return [join(ssh, 'known_hosts'), join(ssh, 'known_hosts2'), '/etc/ssh/ssh_known_hosts', '/etc/ssh/ssh_known_hosts2'];
}

interface Entry {
  file: string;
  line: number;
  revoked: boolean;
  /** Comma-separated patterns, or one hashed name. */
  hosts: HostMatcher;
  fingerprint: string;
}

type HostMatcher = (name: string) => boolean;

export interface HostKeyMatch {
  fingerprint: string;
  /** Where each fingerprint was found, for `policy set` to say. */
  file: string;
  line: number;
}

/**
 * How a policy writes a host: `name` (port 22) or `[name]:port`, as known_hosts holds it. Names
 * are compared lowercased, as ssh lowercases the host it looks up; port 22 is written without one.
 */
export function knownHostsName(host: string): string {
  const lower = host.toLowerCase();
  const bracketed = /^\[([^\]]+)\]:([0-9]+)$/.exec(lower);
  if (bracketed && Number(bracketed[2]) === 22) return bracketed[1]!;
  return lower;
}

export class KnownHosts {
  private constructor(
    private readonly entries: readonly Entry[],
    /** The files that were read (missing or unreadable ones are left out). */
    readonly files: readonly string[],
  ) {}

  /**
   * Reads ssh's files (`files`; a missing or unreadable one is skipped, as ssh does) and the ones
   * the user named (`named`: one that cannot be read is an error). A line that is not a host key is skipped.
   */
  static load(files: readonly string[], named: readonly string[] = []): KnownHosts {
    const entries: Entry[] = [];
    const read: string[] = [];
    for (const file of [...named, ...files]) {
      let text: string;
      try {
        // `-` is a file of that name here, not stdin (the policy itself may come from stdin).
        const path = file === '-' ? './-' : file;
        text = readCapped(path, MAX_KNOWN_HOSTS_BYTES, 'known_hosts file', { regularFile: true }).toString('utf8');
      } catch (err) {
        if (named.includes(file)) throw err;
        continue;
      }
      read.push(file);
      entries.push(...parseKnownHosts(text, file));
    }
    return new KnownHosts(entries, read);
  }

  static fromText(text: string, file = 'known_hosts'): KnownHosts {
    return new KnownHosts(parseKnownHosts(text, file), [file]);
  }

  /** The host keys ssh would accept for `host` (`name` or `[name]:port`), revoked ones left out. */
  resolve(host: string): HostKeyMatch[] {
    const name = knownHostsName(host);
    const matching = this.entries.filter((e) => e.hosts(name));
    const revoked = new Set(matching.filter((e) => e.revoked).map((e) => e.fingerprint));
    const seen = new Set<string>();
    const out: HostKeyMatch[] = [];
    for (const e of matching) {
      if (e.revoked || revoked.has(e.fingerprint) || seen.has(e.fingerprint)) continue;
      seen.add(e.fingerprint);
      out.push({ fingerprint: e.fingerprint, file: e.file, line: e.line });
    }
    return out;
  }
}

function parseKnownHosts(text: string, file: string): Entry[] {
  const entries: Entry[] = [];
  const lines = text.split('\n');
  for (const [index, raw] of lines.entries()) {
    const fields = raw.trim().split(/[ \t]+/);
    if (fields[0] === undefined || fields[0] === '' || fields[0].startsWith('#')) continue;
    let revoked = false;
    if (fields[0].startsWith('@')) {
      // A CA key signs host certificates; it is not any host's key.
      if (fields[0] !== '@revoked') continue;
      revoked = true;
      fields.shift();
    }
    const [hostField, type, base64] = fields;
    if (!hostField || !type || !base64) continue;
    const blob = Buffer.from(base64, 'base64');
    try {
      if (blob.length === 0 || blob.toString('base64').replace(/=+$/, '') !== base64.replace(/=+$/, '') || blobKeyType(blob) !== type) continue;
    } catch {
      continue;
    }
    const hosts = hostMatcher(hostField);
    if (!hosts) continue;
    entries.push({ file, line: index + 1, revoked, hosts, fingerprint: fingerprint(blob) });
  }
  return entries;
}

function hostMatcher(field: string): HostMatcher | null {
  if (field.startsWith('|')) {
    // |1|salt|hash: HMAC-SHA1 of the name keyed with the salt (ssh-keygen -H, HashKnownHosts).
    const parts = field.split('|');
    if (parts.length !== 4 || parts[1] !== '1') return null;
    const salt = Buffer.from(parts[2]!, 'base64');
    const hash = Buffer.from(parts[3]!, 'base64');
    if (salt.length !== 20 || hash.length !== 20) return null;
    return (name) => timingSafeEqual(createHmac('sha1', salt).update(name).digest(), hash);
  }
  const patterns = field.split(',').filter((p) => p.length > 0).map((p) => ({
    negated: p.startsWith('!'),
    test: wildcard(p.startsWith('!') ? p.slice(1) : p),
  }));
  if (patterns.length === 0) return null;
  // As match_hostname(3) in OpenSSH: a negated pattern that matches rules the line out, whatever else matches.
  return (name) => {
    let matched = false;
    for (const p of patterns) {
      if (!p.test(name)) continue;
      if (p.negated) return false;
      matched = true;
    }
    return matched;
  };
}

/** OpenSSH's match_pattern: `*` any run, `?` one character; names are looked up lowercased. */
function wildcard(pattern: string): (name: string) => boolean {
  const lower = pattern.toLowerCase();
  return (name) => globMatch(lower, name);
}

/** A policy's host as the vault keeps it, and where known_hosts said so. */
export interface HostResolution extends ResolvedHost {
  /** Empty for a host written as a fingerprint. */
  found: HostKeyMatch[];
}

/**
 * The parsed file as a storable document: each `hosts` entry resolved (a fingerprint stands for
 * itself). A name known_hosts does not know is an error naming the file, line and host (exit 2).
 */
export function resolvePolicyHosts(parsed: ParsedPolicy, knownHosts: KnownHosts): { document: PolicyDocument; hosts: HostResolution[] } {
  const all = new Map<string, HostResolution>();
  const rules = parsed.rules.map((written, index): PolicyRule => {
    const { hosts, ...rest } = written;
    if (!hosts) return rest;
    const resolved = hosts.map((name): ResolvedHost => {
      let resolution = all.get(name);
      if (!resolution) {
        if (name.startsWith('SHA256:')) resolution = { name, fingerprints: [name], found: [] };
        else {
          const found = knownHosts.resolve(name);
          if (found.length === 0) {
            const searched = knownHosts.files.length > 0 ? knownHosts.files.join(', ') : 'no readable known_hosts file';
            throw usageError(
              `${parsed.file}:${fieldLine(parsed, index, 'hosts')}: rule ${index + 1}: hosts: no known host key for ${JSON.stringify(name)} (searched ${searched})`,
              `connect once with ssh and check the key, or add it with \`ssh-keyscan ${name.replace(/^\[(.*)\]:([0-9]+)$/, '-p $2 $1')} >> ~/.ssh/known_hosts\` after checking its fingerprint; or write the host key's SHA256: fingerprint`,
            );
          }
          resolution = { name, fingerprints: found.map((f) => f.fingerprint), found };
        }
        all.set(name, resolution);
      }
      return { name, fingerprints: [...resolution.fingerprints] };
    });
    return { ...rest, hosts: resolved };
  });
  return { document: { default: parsed.default, rules }, hosts: [...all.values()] };
}
