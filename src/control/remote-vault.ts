// VaultApi through a daemon's control socket: the daemon runs each call on the vault it holds.
import { VAULT_METHODS, type VaultApi } from '../vault/api.js';
import type { ControlClient } from './client.js';
import type { VaultCall } from './requests.js';

export function remoteVaultApi(client: ControlClient, vaultId: string): VaultApi {
  const api: Record<string, (...args: unknown[]) => Promise<unknown>> = {};
  for (const method of VAULT_METHODS) {
    // The client checks the call against the method's schema before it is sent.
    api[method] = (...args: unknown[]) => client.call({ op: 'call', vaultId, method, args } as VaultCall);
  }
  return api as unknown as VaultApi;
}
