// OpenSSH certificates made by the real ssh-keygen -s, for the certificate tests.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

export interface CertificateOptions {
  keyId: string;
  /** `-n`: principals (user names, or host names for a host certificate); none: any. */
  principals?: string[];
  serial?: number;
  /** `-V`, e.g. `-5m:+1h`, `always:forever`, `20200101:20200102`. */
  validity?: string;
  host?: boolean;
  /** `-t` for an RSA CA: ssh-rsa, rsa-sha2-256 or rsa-sha2-512. */
  rsaSignatureAlgorithm?: string;
  /** `-O` options, e.g. `force-command=/bin/true` (user certificates). */
  options?: string[];
}

export interface MadeCertificate {
  path: string;
  /** The `-cert.pub` line. */
  line: string;
  blob: Buffer;
}

/** Signs `publicKeyPath` with the CA key at `caPath`; writes `<key>-cert.pub` beside it. */
export function signCertificate(caPath: string, publicKeyPath: string, options: CertificateOptions): MadeCertificate {
  const args = ['-q', '-s', caPath, '-I', options.keyId];
  if (options.host) args.push('-h');
  if (options.principals?.length) args.push('-n', options.principals.join(','));
  if (options.serial !== undefined) args.push('-z', String(options.serial));
  if (options.validity) args.push('-V', options.validity);
  if (options.rsaSignatureAlgorithm) args.push('-t', options.rsaSignatureAlgorithm);
  for (const option of options.options ?? []) args.push('-O', option);
  args.push(publicKeyPath);
  execFileSync('ssh-keygen', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 30_000 });
  const path = publicKeyPath.replace(/\.pub$/, '') + '-cert.pub';
  const line = readFileSync(path, 'utf8').trim();
  return { path, line, blob: Buffer.from(line.split(/\s+/)[1]!, 'base64') };
}

/** The blob of an OpenSSH public key or certificate line. */
export function lineBlob(line: string): Buffer {
  return Buffer.from(line.trim().split(/\s+/)[1]!, 'base64');
}
