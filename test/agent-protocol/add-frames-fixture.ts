// Loads test/fixtures/agent-add-frames.json (ssh-add's key operations against OpenSSH 9.2's
// ssh-agent, with throwaway keys) and pairs each request with its response. Not a test file itself.
import { readFileSync } from 'node:fs';
import type { CapturedFrame } from './golden-fixture.js';

export interface AddFramesFixture {
  generatedBy: string;
  opensshVersion: string;
  keys: Record<string, { publicKey: string; comment: string; fingerprint: string }>;
  certifiedKey: { publicKey: string; certificate: string };
  /** Per key type: a key and its certificate (the ECDSA and ed25519 ones by an ed25519 CA, the RSA one by an RSA CA). */
  certifiedKeys: Record<string, { publicKey: string; certificate: string }>;
  destHost: string;
  jumpHost: string;
  sshdHostKey: string;
  jumpHostKey: string;
  hostCaKey: string;
  lockPassword: string;
  wrongPassword: string;
  frames: CapturedFrame[];
}

export const addFixture: AddFramesFixture = JSON.parse(
  readFileSync(new URL('../fixtures/agent-add-frames.json', import.meta.url), 'utf8'),
) as AddFramesFixture;

export interface AddExchange {
  request: CapturedFrame;
  response: CapturedFrame;
}

/** Request/response pairs in capture order (each ssh-add run used one connection, in turn). */
export function addExchanges(): AddExchange[] {
  const out: AddExchange[] = [];
  const frames = addFixture.frames;
  for (let i = 0; i < frames.length; i += 2) {
    const [request, response] = [frames[i]!, frames[i + 1]!];
    if (request.direction !== 'request' || response?.direction !== 'response' || request.client !== response.client) {
      throw new Error(`frames ${i} and ${i + 1} are not a request and its response`);
    }
    out.push({ request, response });
  }
  return out;
}
