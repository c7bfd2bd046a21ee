// Key constraints of SSH_AGENTC_ADD_ID_CONSTRAINED (draft-ietf-sshm-ssh-agent §4.2.6, OpenSSH's
// PROTOCOL.agent §2 and ssh-agent.c parse_key_constraints): lifetime (1), confirm (2) and the
// extension (255) restrict-destination-v00@openssh.com. Anything else, or any constraint given
// twice, makes the request malformed, as OpenSSH refuses it.
import { UnsupportedAddError } from './private-key.js';
import { publicKeyFromBlob } from './public-key.js';
import { WireFormatError, WireReader, WireWriter } from './wire.js';

export const CONSTRAIN = { LIFETIME: 1, CONFIRM: 2, EXTENSION: 255 } as const;
export const EXT_RESTRICT_DESTINATION = 'restrict-destination-v00@openssh.com';
/** As OpenSSH's AGENT_MAX_DEST_CONSTRAINTS. */
export const MAX_DESTINATION_CONSTRAINTS = 1024;

export interface HostKeySpec {
  keyBlob: Buffer;
  /** The key is a certificate authority's, for host certificates. */
  isCa: boolean;
}

export interface DestinationHop {
  /** null when empty (any user; always null for `from`). */
  user: string | null;
  /** null when empty: for `from`, the host running the agent (the first hop). */
  hostname: string | null;
  hostKeys: HostKeySpec[];
}

/** One `ssh-add -h` path element: a key may be used from `from` to `to`. */
export interface DestinationConstraint {
  from: DestinationHop;
  to: DestinationHop;
}

export interface KeyConstraints {
  /** `ssh-add -t`: seconds the key stays; null: no lifetime. */
  lifetimeSeconds: number | null;
  /** `ssh-add -c`: every use needs confirmation. */
  confirm: boolean;
  /** `ssh-add -h`: where the key may be used; empty: anywhere. */
  destinations: DestinationConstraint[];
}

/** Reads constraints up to the end of the message. Fields are copies: the request may be wiped. */
export function readConstraints(r: WireReader): KeyConstraints {
  const constraints: KeyConstraints = { lifetimeSeconds: null, confirm: false, destinations: [] };
  let destinationsSeen = false;
  while (r.remaining > 0) {
    const kind = r.byte();
    if (kind === CONSTRAIN.LIFETIME) {
      if (constraints.lifetimeSeconds !== null) throw new WireFormatError('lifetime constraint given twice');
      constraints.lifetimeSeconds = r.uint32();
    } else if (kind === CONSTRAIN.CONFIRM) {
      if (constraints.confirm) throw new WireFormatError('confirm constraint given twice');
      constraints.confirm = true;
    } else if (kind === CONSTRAIN.EXTENSION) {
      const name = r.utf8();
      if (name !== EXT_RESTRICT_DESTINATION) throw new UnsupportedAddError(`unsupported constraint extension ${JSON.stringify(name.slice(0, 64))}`);
      if (destinationsSeen) throw new WireFormatError(`${EXT_RESTRICT_DESTINATION} given twice`);
      destinationsSeen = true;
      constraints.destinations = readDestinations(new WireReader(r.string()));
    } else {
      throw new UnsupportedAddError(`unsupported constraint ${kind}`);
    }
  }
  return constraints;
}

function readDestinations(r: WireReader): DestinationConstraint[] {
  const destinations: DestinationConstraint[] = [];
  while (r.remaining > 0) {
    if (destinations.length >= MAX_DESTINATION_CONSTRAINTS) throw new WireFormatError('too many destination constraints');
    const c = new WireReader(r.string());
    const from = readHop(new WireReader(c.string()));
    const to = readHop(new WireReader(c.string()));
    if (c.string().length !== 0) throw new WireFormatError('destination constraint extensions are not supported');
    c.end();
    // As OpenSSH: `from` names a host exactly when it lists its keys, and never a user; `to` both.
    if ((from.hostname === null) !== (from.hostKeys.length === 0) || from.user !== null) {
      throw new WireFormatError('inconsistent "from" in destination constraint');
    }
    if (to.hostname === null || to.hostKeys.length === 0) throw new WireFormatError('incomplete "to" in destination constraint');
    destinations.push({ from, to });
  }
  return destinations;
}

function readHop(r: WireReader): DestinationHop {
  const user = cstring(r);
  const hostname = cstring(r);
  if (r.string().length !== 0) throw new WireFormatError('destination hop extensions are not supported');
  const hostKeys: HostKeySpec[] = [];
  while (r.remaining > 0) {
    const keyBlob = Buffer.from(r.string());
    checkHostKey(keyBlob);
    hostKeys.push({ keyBlob, isCa: r.byte() !== 0 });
  }
  return { user: user || null, hostname: hostname || null, hostKeys };
}

/** A host key this agent can check a session-bind against. */
function checkHostKey(blob: Buffer): void {
  try {
    publicKeyFromBlob(blob);
  } catch (err) {
    throw err instanceof WireFormatError ? err : new WireFormatError('bad host key in destination constraint');
  }
}

/** A string that must not hold NUL (OpenSSH's sshbuf_get_cstring). */
export function cstring(r: WireReader): string {
  const bytes = r.string();
  if (bytes.includes(0)) throw new WireFormatError('string holds a NUL byte');
  return bytes.toString('utf8');
}

export function writeConstraints(w: WireWriter, constraints: KeyConstraints): WireWriter {
  if (constraints.lifetimeSeconds !== null) w.byte(CONSTRAIN.LIFETIME).uint32(constraints.lifetimeSeconds);
  if (constraints.confirm) w.byte(CONSTRAIN.CONFIRM);
  if (constraints.destinations.length > 0) {
    const all = new WireWriter();
    for (const { from, to } of constraints.destinations) {
      all.string(new WireWriter().string(hopBytes(from)).string(hopBytes(to)).string(Buffer.alloc(0)).toBuffer());
    }
    w.byte(CONSTRAIN.EXTENSION).string(EXT_RESTRICT_DESTINATION).string(all.toBuffer());
  }
  return w;
}

function hopBytes(hop: DestinationHop): Buffer {
  const w = new WireWriter().string(hop.user ?? '').string(hop.hostname ?? '').string(Buffer.alloc(0));
  for (const key of hop.hostKeys) w.string(key.keyBlob).boolean(key.isCa);
  return w.toBuffer();
}
