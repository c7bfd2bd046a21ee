// One well-formed argument list (or more) per vault method, made the way the CLI makes them
// (the real enrolment functions for factors), for the control request tests.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { describeKey, fingerprint } from '../../src/agent-protocol/public-key.js';
import type { VaultMethod } from '../../src/vault/api.js';
import { enrollPassphrase } from '../../src/unlock/passphrase.js';
import { newSshAgentFactor } from '../../src/unlock/ssh-agent.js';
import { type EnrolledFactor } from '../../src/vault/keyring.js';

export const FP = fingerprint(randomBytes(40));

export function agentKeyRef() {
  const blob = describeKey(generateKeyPairSync('ed25519').publicKey).blob;
  return { type: 'ssh-ed25519' as const, fingerprint: fingerprint(blob), blob: blob.toString('base64') };
}

export async function enrolledPassphrase(): Promise<EnrolledFactor> {
  return enrollPassphrase(Buffer.from('correct horse'), { log2n: 14, r: 8, p: 1 });
}

export function enrolledSshAgent(): EnrolledFactor {
  return { factor: newSshAgentFactor(agentKeyRef()), kek: randomBytes(32) };
}

export async function validCalls(): Promise<Record<VaultMethod, unknown[][]>> {
  const pp = await enrolledPassphrase();
  const sa = enrolledSshAgent();
  return {
    generateKey: [
      ['web', 'ed25519', undefined, 'me@host'],
      ['web', 'rsa', 3072, ''],
      ['web', 'ecdsa', 521, 'c'],
    ],
    importKey: [['web', randomBytes(1200), 'imported']],
    importCertificate: [['web', randomBytes(48), randomBytes(400), 'me-cert']],
    removeCertificate: [['web', randomBytes(400)]],
    listKeys: [[], ['web'], [undefined]],
    scopeConstraints: [['web']],
    assign: [['web', FP], ['a.b_c-d', FP.slice('SHA256:'.length)]],
    unassign: [['web', FP]],
    removeKey: [[FP], [FP.slice('SHA256:'.length)]],
    scopes: [[]],
    issueToken: [['web', 'ci-42', null], ['web', '', 90_000]],
    listTokens: [[], ['web']],
    revokeToken: [['tok_0123456789ab']],
    revokeTokens: [['web'], ['web', 'ci-42']],
    setSecret: [['web', 'API_TOKEN', Buffer.from('v')], ['web', '_', Buffer.alloc(0)], ['web', 'BIG', Buffer.alloc(1024 * 1024)]],
    getSecret: [['web', 'API_TOKEN']],
    listSecrets: [['web']],
    removeSecret: [['web', 'API_TOKEN']],
    secretValues: [[['web', 'api']], [[]]],
    setPolicy: [
      ['web', { default: 'deny', rules: [] }, ''],
      [
        'web',
        {
          default: 'allow',
          rules: [
            { action: 'allow', purpose: 'ssh-login', hosts: [{ name: 'github.com', fingerprints: [FP] }], users: ['git'], exe: ['/usr/bin/*'] },
            { action: 'confirm', purpose: 'sshsig', namespaces: ['git'], keys: [FP], subjects: ['ci-*'], forwarded: false, remember: '10m', rate: '60/m' },
          ],
        },
        'default = "allow"\n',
      ],
    ],
    getPolicy: [['web']],
    removePolicy: [['web']],
    addFactor: [[pp], [sa]],
    removeFactor: [['pp-0123abcd'], ['sa-0123abcd']],
    replaceFactor: [[pp]],
    verifyAudit: [[]],
  };
}
