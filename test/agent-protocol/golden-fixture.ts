// Loads test/fixtures/agent-frames.json (frames captured between OpenSSH 9.2 clients and ssh-agent)
// and pairs each request with the response that followed it. Not a test file itself.
import { readFileSync } from 'node:fs';

export interface CapturedFrame {
  client: string;
  keyType: string | null;
  conn: number;
  direction: 'request' | 'response';
  msgType: number;
  hex: string;
}

export interface AgentFramesFixture {
  generatedBy: string;
  opensshVersion: string;
  publicKeys: Record<string, string>;
  sshdHostKey: string;
  frames: CapturedFrame[];
}

export const fixture: AgentFramesFixture = JSON.parse(
  readFileSync(new URL('../fixtures/agent-frames.json', import.meta.url), 'utf8'),
) as AgentFramesFixture;

/** The whole frame (length header included), as captured. */
export const frameBytes = (f: CapturedFrame): Buffer => Buffer.from(f.hex, 'hex');

/** Payload (type byte + body) of a captured frame; throws if the header disagrees with the capture. */
export function payloadOf(f: CapturedFrame): Buffer {
  const bytes = frameBytes(f);
  if (bytes.length < 5 || bytes.readUInt32BE(0) !== bytes.length - 4) {
    throw new Error(`fixture frame has inconsistent length header: ${f.client} ${f.direction} ${f.msgType}`);
  }
  return bytes.subarray(4);
}

export interface PublicLine {
  type: string;
  blob: Buffer;
  comment: string;
}

/** Splits an authorized_keys style line into type, blob and comment. */
export function parseLine(line: string): PublicLine {
  const [type, b64, ...rest] = line.trim().split(/\s+/);
  if (!type || !b64) throw new Error(`bad public key line: ${line}`);
  return { type, blob: Buffer.from(b64, 'base64'), comment: rest.join(' ') };
}

export const label = (f: CapturedFrame, i: number): string =>
  `#${i} ${f.client} [${f.keyType ?? '-'}] conn ${f.conn} ${f.direction} ${f.msgType}`;

export interface Exchange {
  index: number;
  request: CapturedFrame;
  response: CapturedFrame;
}

/**
 * Request/response pairs: within one (client, keyType, conn) stream the frames alternate
 * request, response. Throws when they don't, so a reordered fixture is caught.
 */
export function exchanges(): Exchange[] {
  const open = new Map<string, { index: number; frame: CapturedFrame }>();
  const out: Exchange[] = [];
  fixture.frames.forEach((frame, index) => {
    const key = `${frame.client}\u0000${frame.keyType}\u0000${frame.conn}`;
    const pending = open.get(key);
    if (frame.direction === 'request') {
      if (pending) throw new Error(`two requests in a row in stream ${key}`);
      open.set(key, { index, frame });
    } else {
      if (!pending) throw new Error(`response without request in stream ${key}`);
      out.push({ index: pending.index, request: pending.frame, response: frame });
      open.delete(key);
    }
  });
  if (open.size) throw new Error(`unanswered requests: ${[...open.keys()].join(', ')}`);
  return out;
}
