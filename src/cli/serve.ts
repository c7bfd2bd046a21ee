import type { Argv } from 'yargs';
import { startDaemon } from '../daemon/daemon.js';
import { createLogger } from '../log.js';
import { runtimeDir } from '../runtime-dir.js';
import { usageError } from '../errors.js';
import { parseListenAddress } from '../signer/token-listener.js';
import { openVault, type GlobalArgs } from './common.js';

export function serveCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'serve',
    'run the daemon in the foreground: one agent socket per scope',
    (c) =>
      c
        .option('scope-sockets', { type: 'boolean', default: true, describe: 'serve a socket per scope (--no-scope-sockets to disable)' })
        .option('listen', {
          type: 'string',
          array: true,
          default: [] as string[],
          describe: 'token-gated signer for containers: unix:PATH or tcp:HOST:PORT (repeatable)',
        })
        .option('allow-sha1', { type: 'boolean', default: false, describe: 'sign SHA-1 ssh-rsa requests (refused by default)' }),
    async (args) => {
      const listen = args.listen.map((text) => {
        const address = parseListenAddress(text);
        if (!address) throw usageError(`invalid --listen ${JSON.stringify(text)}`, 'use unix:PATH or tcp:HOST:PORT');
        return address;
      });
      const log = createLogger();
      const vault = await openVault(args);
      const daemon = await startDaemon({
        vault,
        runtimeDir: runtimeDir(),
        log,
        scopeSockets: args['scope-sockets'],
        listen,
        allowSha1: args['allow-sha1'],
      }).catch((err) => {
        vault.close();
        throw err;
      });
      await new Promise<void>((resolve) => {
        const stop = (signal: string) => {
          log.info({ signal }, 'stopping');
          daemon.stop().then(resolve, (err: Error) => {
            log.error({ err: err.message }, 'error while stopping');
            resolve();
          });
        };
        for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.once(signal, () => stop(signal));
      });
    },
  );
}
