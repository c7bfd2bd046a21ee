// VaultApi through a daemon's control socket: the daemon runs each call on the vault it holds.
import { VAULT_METHODS, type VaultApi } from '../vault/api.js';
import type { ControlClient } from './client.js';

export function remoteVaultApi(client: ControlClient, vaultId: string): VaultApi {
  const api: Record<string, (...args: unknown[]) => Promise<unknown>> = {};
  for (const method of VAULT_METHODS) {
    api[method] = (...args: unknown[]) => client.call({ op: 'call', vaultId, method, args });
  }
  return api as unknown as VaultApi;
}
