// contrib/ssh-agent-bridge.sh: the socat bridge for images without Node, against a real daemon.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyholdOk, makeKeyholdEnv, REPO, startServe, stopAllServes, waitFor, type KeyholdEnv } from '../helpers/keyhold.js';

const SCRIPT = join(REPO, 'contrib', 'ssh-agent-bridge.sh');

describe('contrib/ssh-agent-bridge.sh', () => {
  let k: KeyholdEnv;
  let signer: string;
  let token: string;
  let fingerprint: string;
  const bridges: ChildProcess[] = [];

  beforeAll(async () => {
    k = makeKeyholdEnv();
    keyholdOk(k, ['init']);
    keyholdOk(k, ['key', 'generate', 'web']);
    keyholdOk(k, ['key', 'generate', 'other']);
    fingerprint = JSON.parse(keyholdOk(k, ['key', 'list', '--scope', 'web', '--json']))[0].fingerprint;
    token = keyholdOk(k, ['token', 'issue', 'web']).trim();
    signer = join(k.dir, 'signer.sock');
    await startServe(k, ['--listen', `unix:${signer}`]);
  });

  afterAll(async () => {
    for (const bridge of bridges) if (bridge.pid) process.kill(-bridge.pid, 'SIGKILL');
    await stopAllServes();
    k.cleanup();
  });

  function startBridge(env: NodeJS.ProcessEnv, listen: string): ChildProcess {
    const bridge = spawn('sh', [SCRIPT, `unix:${signer}`, listen], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    bridges.push(bridge);
    return bridge;
  }

  it('serves ssh-add -l with the token from KEYHOLD_TOKEN, and keeps the token out of argv', async () => {
    const listen = join(k.dir, 'bridge.sock');
    const bridge = startBridge({ KEYHOLD_TOKEN: token }, listen);
    await waitFor(() => existsSync(listen), 5000, 'bridge socket');
    const listed = spawnSync('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: listen }, encoding: 'utf8', timeout: 10_000 });
    expect(listed.status, listed.stderr).toBe(0);
    expect(listed.stdout).toContain(fingerprint);
    expect(listed.stdout.trim().split('\n')).toHaveLength(1);
    const argvs = spawnSync('ps', ['-eo', 'args'], { encoding: 'utf8' }).stdout;
    expect(argvs).not.toContain(token);
    expect(bridge.exitCode).toBeNull();
  });

  it('with a revoked token the client gets no agent', async () => {
    const revoked = keyholdOk(k, ['token', 'issue', 'web']).trim();
    keyholdOk(k, ['token', 'revoke', '--scope', 'web', '--subject', '']);
    const listen = join(k.dir, 'revoked.sock');
    startBridge({ KEYHOLD_TOKEN: revoked }, listen);
    await waitFor(() => existsSync(listen), 5000, 'bridge socket');
    const listed = spawnSync('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: listen }, encoding: 'utf8', timeout: 10_000 });
    expect(listed.status).not.toBe(0);
    expect(listed.stdout).not.toContain(fingerprint);
  });

  it('refuses to start without a token', () => {
    const result = spawnSync('sh', [SCRIPT, `unix:${signer}`, join(k.dir, 'none.sock')], {
      env: { ...process.env, KEYHOLD_TOKEN: '' },
      encoding: 'utf8',
      timeout: 5000,
    });
    expect(result.status).toBe(2);
    expect(result.stderr).toContain('KEYHOLD_TOKEN');
  });
});
