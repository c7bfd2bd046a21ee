import type { Argv } from 'yargs';
import type { Logger } from 'pino';
import { parseDuration, parseOpenSshDuration } from '../duration.js';
import { EXIT, KeyholdError, usageError } from '../errors.js';
import { createLogger, envLogLevel, LOG_LEVELS } from '../log.js';
import { loadConfig } from '../config/config.js';
import { MAX_CONFIRM_TIMEOUT_MS } from '../policy/approvals.js';
import { runtimeDir } from '../runtime-dir.js';
import { parseListenAddress } from '../signer/token-listener.js';
import { readKeyring } from '../vault/keyring.js';
import { vaultPaths } from '../vault/paths.js';
import { existsSync } from 'node:fs';
import type { AuditPeer } from '../audit/audit-log.js';
import type { GlobalArgs } from './common.js';
import { collectKeks, NoUnlockSourceError } from '../unlock/prove.js';

/**
 * The last line of defence: a fault that no handler caught is logged and the daemon goes on
 * serving (it holds the unlocked vault; dying would refuse every client, and a restart loses the
 * unlock). Only the error's kind and where it was thrown are logged: its message may quote a request.
 */
function keepServingThroughUncaughtFaults(log: Logger): void {
  const where = (err: unknown) => (err instanceof Error ? (err.stack ?? '').split('\n').map((l) => l.trim()).filter((l) => l.startsWith('at ')).slice(0, 5) : []);
  process.on('uncaughtException', (err) => {
    log.error({ error: err?.name, code: (err as NodeJS.ErrnoException)?.code, at: where(err) }, 'uncaught fault; still serving');
  });
  process.on('unhandledRejection', (reason) => {
    log.error({ error: (reason as Error)?.name, code: (reason as NodeJS.ErrnoException)?.code, at: where(reason) }, 'unhandled rejection; still serving');
  });
}

export const optionalDuration = (text: string | undefined, flag: string): number | null =>
  text === undefined ? null : parseDuration(text, flag);

export function serveCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'serve',
    'run the daemon in the foreground: one agent socket per scope, the control socket, token listeners',
    (c) =>
      c
        .option('scope-sockets', { type: 'boolean', default: true, describe: 'serve a socket per scope (--no-scope-sockets to disable)' })
        .option('listen', {
          type: 'string',
          array: true,
          default: [] as string[],
          describe: 'token-gated signer for containers: unix:PATH or tcp:HOST:PORT (repeatable)',
        })
        .option('idle-lock', { type: 'string', describe: 'lock after this long without requests (90s, 30m, 8h, 7d)' })
        .option('lock-after', { type: 'string', describe: 'lock this long after each unlock, whatever the activity' })
        .option('locked', { type: 'boolean', default: false, describe: 'start locked; unlock later with `keyhold unlock`' })
        .option('allow-sha1', { type: 'boolean', default: false, describe: 'sign SHA-1 ssh-rsa requests (refused by default)' })
        .option('config', { type: 'string', describe: 'config file (default: $KEYHOLD_CONFIG or ~/.config/keyhold/config.toml); flags win over it' })
        .option('log-level', {
          type: 'string',
          choices: LOG_LEVELS,
          describe: 'what the daemon logs on stderr (default: $KEYHOLD_LOG_LEVEL, else log_level of the config, else info)',
        })
        .option('confirm-program', {
          type: 'string',
          describe: 'SSH_ASKPASS-style program asked to confirm requests (default: $SSH_ASKPASS when a display is set)',
        })
        .option('confirm-timeout', { type: 'string', describe: 'how long a request waits for a confirmation (default 30s)' })
        .option('add-lifetime', {
          type: 'string',
          describe: "as ssh-agent -t: keys ssh-add adds without -t expire from their scope after this long (seconds, or OpenSSH's 1h30m)",
        }),
    async (args) => {
      const config = loadConfig(args.config).serve;
      const listen =
        args.listen.length === 0
          ? (config.listen ?? [])
          : args.listen.map((text) => {
              const address = parseListenAddress(text);
              if (!address) throw usageError(`invalid --listen ${JSON.stringify(text)}`, 'use unix:PATH or tcp:HOST:PORT');
              return address;
            });
      const lockTimers = {
        idleMs: optionalDuration(args['idle-lock'], '--idle-lock') ?? config.idleLockMs ?? null,
        ttlMs: optionalDuration(args['lock-after'], '--lock-after') ?? config.lockAfterMs ?? null,
      };
      const confirmTimeoutMs = optionalDuration(args['confirm-timeout'], '--confirm-timeout') ?? config.confirmTimeoutMs ?? null;
      if (confirmTimeoutMs !== null && confirmTimeoutMs > MAX_CONFIRM_TIMEOUT_MS) {
        throw usageError('--confirm-timeout is at most 1h', 'a client waiting longer than that has given up');
      }
      const confirmProgram = args['confirm-program'] ?? config.confirmProgram;
      // 0 is no lifetime, as ssh-agent -t 0.
      const addLifetimeSeconds = args['add-lifetime'] === undefined ? null : parseOpenSshDuration(args['add-lifetime'], '--add-lifetime') || null;
      const paths = vaultPaths(args.vault);
      const keyring = readKeyring(paths.keys);
      if (!existsSync(paths.db)) {
        throw new KeyholdError(`no vault database at ${paths.db}`, 'create a vault with `keyhold init`, or pass --vault');
      }
      const log = createLogger(process.env, config.logLevel ?? 'info', args['log-level'] ?? envLogLevel());
      keepServingThroughUncaughtFaults(log);
      if (config.offlineGraceMs !== undefined) {
        log.debug({ offline_grace_ms: config.offlineGraceMs }, 'offline_grace is for PostgreSQL vaults (planned): no effect on this vault');
      }
      // The daemon's modules load only here: every other command starts without them.
      const { startDaemon } = await import('../daemon/daemon.js');
      const daemon = await startDaemon({
        paths,
        vaultId: keyring.vault_id,
        lockTimers,
        // Unlock at start with what applies (passphrase sources, SSH agent); with none, start
        // locked and wait for `keyhold unlock`. A wrong passphrase is still an error (exit 4).
        unlockWith: async () => {
          if (args.locked) return null;
          try {
            return await collectKeks(keyring, { file: args['passphrase-file'] });
          } catch (err) {
            if (err instanceof NoUnlockSourceError || (err instanceof KeyholdError && err.exitCode === EXIT.LOCKED)) {
              log.info('no unlock source: starting locked; unlock with `keyhold unlock`');
              return null;
            }
            throw err;
          }
        },
        runtimeDir: runtimeDir(),
        log,
        scopeSockets: args['scope-sockets'],
        listen,
        scopes: config.scopes ?? [],
        allowSha1: args['allow-sha1'],
        addLifetimeSeconds,
        ...(confirmProgram ? { confirmProgram } : {}),
        ...(confirmTimeoutMs !== null ? { confirmTimeoutMs } : {}),
      });
      await new Promise<void>((resolve) => {
        const stop = (reason: string, actor?: AuditPeer) => {
          daemon.stop(reason, actor).then(resolve, (err: Error) => {
            log.error({ err: err.message }, 'error while stopping');
            resolve();
          });
        };
        for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
          process.once(signal, () => {
            log.info({ signal }, 'stopping');
            stop('daemon stopping');
          });
        }
        void daemon.stopRequested.then((actor) => {
          log.info({ peer: actor }, 'stopping: asked by `keyhold stop`');
          stop('keyhold stop', actor);
        });
      });
    },
  );
}
