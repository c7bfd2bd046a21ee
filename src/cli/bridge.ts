// `keyhold bridge` (container side): a plain agent socket in, the token handshake out.
import { chmodSync } from 'node:fs';
import { readCapped } from '../read-capped.js';
import { connect, createServer, type Socket } from 'node:net';
import type { Argv } from 'yargs';
import { MSG } from '../agent-protocol/messages.js';
import { KeyholdError, usageError, EXIT } from '../errors.js';
import { createLogger } from '../log.js';
import { clearStaleSocket, closeServer, trackConnections } from '../signer/unix-listener.js';
import { MAX_TOKEN_BYTES, parseListenAddress, type ListenAddress } from '../signer/token-listener.js';
import type { GlobalArgs } from './common.js';

const DIAL_RETRY_MS = 10_000;
/** How long the start-up check waits for the signer's answer (its own handshake timeout is 5 s). */
const CHECK_ANSWER_MS = 15_000;
const REFUSED = 'token refused (invalid, expired or revoked)';
const REFUSED_HINT = "the host's `keyhold serve` log says which; a locked vault refuses every token too; `keyhold token issue SCOPE` makes a new one";

function readToken(file: string | undefined): Buffer {
  let raw: Buffer;
  if (file) {
    // Room for the token and the whitespace around it; more is not a token file.
    raw = readCapped(file, MAX_TOKEN_BYTES + 4096, 'token file', EXIT.USAGE);
  } else if (process.env.KEYHOLD_TOKEN) {
    raw = Buffer.from(process.env.KEYHOLD_TOKEN);
  } else {
    throw new KeyholdError('no token', 'pass --token-file F or set KEYHOLD_TOKEN', EXIT.USAGE);
  }
  const token = Buffer.from(raw.toString('utf8').trim());
  if (token.length < 1 || token.length > MAX_TOKEN_BYTES) {
    throw usageError(`the token must be 1 to ${MAX_TOKEN_BYTES} bytes`, 'use the token `keyhold token issue` printed');
  }
  return token;
}

/** Dials the signer, retrying while it is not up yet (refused / no socket) for a bounded time. */
function dial(address: ListenAddress): Promise<Socket> {
  const deadline = Date.now() + DIAL_RETRY_MS;
  return new Promise((resolve, reject) => {
    let delay = 50;
    const attempt = () => {
      const socket = address.kind === 'unix' ? connect(address.path) : connect({ host: address.host, port: address.port });
      socket.once('connect', () => {
        socket.removeAllListeners('error');
        resolve(socket);
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        socket.destroy();
        const retryable = ['ECONNREFUSED', 'ENOENT', 'EAGAIN', 'ECONNRESET'].includes(err.code ?? '');
        if (!retryable || Date.now() + delay > deadline) return reject(err);
        setTimeout(attempt, delay);
        delay = Math.min(delay * 2, 1000);
      });
    };
    attempt();
  });
}

/** Where the signer is, as the user wrote it, for messages. */
function describeAddress(address: ListenAddress): string {
  return address.kind === 'unix' ? `unix:${address.path}` : `tcp:${address.host}:${address.port}`;
}

/**
 * Before saying ready: one handshake and a REQUEST_IDENTITIES upstream. The contract answers a
 * bad token by closing with nothing written, so a close (or a reset: the signer drops our unread
 * request) before any reply byte is a refused token; any agent reply is a good one.
 */
async function checkUpstream(address: ListenAddress, handshake: Buffer): Promise<void> {
  const where = describeAddress(address);
  let signer: Socket;
  try {
    signer = await dial(address);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
    throw new KeyholdError(`cannot reach the signer at ${where}: ${code}`, 'is `keyhold serve --listen …` running there, and is --connect right?', EXIT.ERROR);
  }
  const requestIdentities = Buffer.from([0, 0, 0, 1, MSG.REQUEST_IDENTITIES]);
  await new Promise<void>((resolve, reject) => {
    let received = Buffer.alloc(0);
    const finish = (err?: KeyholdError) => {
      clearTimeout(timer);
      signer.removeAllListeners();
      signer.on('error', () => {});
      signer.destroy();
      if (err) reject(err);
      else resolve();
    };
    const timer = setTimeout(
      () => finish(new KeyholdError(`no answer from the signer at ${where} within ${CHECK_ANSWER_MS / 1000}s`, 'is --connect a keyhold token listener?', EXIT.ERROR)),
      CHECK_ANSWER_MS,
    );
    const closedEarly = () => {
      if (received.length === 0) finish(new KeyholdError(REFUSED, REFUSED_HINT, EXIT.DENIED));
      else finish(new KeyholdError(`the signer at ${where} closed the connection in the middle of its answer`, 'see its log', EXIT.ERROR));
    };
    signer.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      if (received.length < 5) return;
      const length = received.readUInt32BE(0);
      const type = received[4]!;
      if (length >= 1 && length <= 256 * 1024 && (type === MSG.IDENTITIES_ANSWER || type === MSG.FAILURE)) return finish();
      finish(new KeyholdError(`the signer at ${where} did not answer as an SSH agent`, 'is --connect a keyhold token listener?', EXIT.ERROR));
    });
    signer.on('error', closedEarly);
    signer.on('close', closedEarly);
    signer.write(Buffer.concat([handshake, requestIdentities]));
  });
}

export function bridgeCommand(yargs: Argv<GlobalArgs>) {
  return yargs.command(
    'bridge',
    'container side: serve a plain agent socket that forwards to the token-gated signer; the token is checked first (exit 4 refused, 1 signer unreachable)',
    (c) =>
      c
        .option('connect', { type: 'string', demandOption: true, describe: 'the signer: unix:PATH or tcp:HOST:PORT' })
        .option('listen', { type: 'string', demandOption: true, describe: 'agent socket to create (for SSH_AUTH_SOCK)' })
        .option('token-file', { type: 'string', describe: 'file holding the token (- for stdin); else $KEYHOLD_TOKEN' })
        .option('token', { type: 'string', hidden: true }),
    async (args) => {
      if (args.token !== undefined) {
        throw usageError('--token is not accepted: a token in argv is visible to every process', 'use --token-file F or KEYHOLD_TOKEN');
      }
      const upstream = parseListenAddress(args.connect);
      if (!upstream) throw usageError(`invalid --connect ${JSON.stringify(args.connect)}`, 'use unix:PATH or tcp:HOST:PORT');
      const token = readToken(args['token-file']);
      const handshake = Buffer.alloc(4 + token.length);
      handshake.writeUInt32BE(token.length, 0);
      token.copy(handshake, 4);
      token.fill(0);
      const log = createLogger();
      await checkUpstream(upstream, handshake);
      const listenPath = args.listen;
      try {
        clearStaleSocket(listenPath);
      } catch (err) {
        throw new KeyholdError((err as Error).message, 'pick another --listen path');
      }
      const server = trackConnections(createServer((client) => {
        client.pause();
        client.on('error', () => {});
        dial(upstream).then(
          (signer) => {
            // A close the client did not ask for is logged with what the bridge can know: no
            // answer at all means the handshake was refused; after answers, the session was ended.
            let answered = false;
            let clientGone = false;
            signer.once('data', () => (answered = true));
            const signerClosed = () => {
              if (!clientGone) {
                clientGone = true; // once: an error is followed by its close
                if (answered) log.warn({ connect: args.connect }, 'the signer closed the session (token revoked or expired, vault locked, idle, or the signer stopped)');
                else log.warn({ connect: args.connect }, `the signer closed the connection without answering: ${REFUSED}, or its vault is locked`);
              }
              client.destroy();
            };
            signer.on('error', signerClosed);
            signer.on('close', signerClosed);
            client.on('close', () => {
              clientGone = true;
              signer.destroy();
            });
            signer.write(handshake);
            client.pipe(signer);
            signer.pipe(client);
            client.resume();
          },
          (err: Error) => {
            log.error({ connect: args.connect, err: err.message }, 'cannot reach the signer');
            client.destroy();
          },
        );
      }));
      await new Promise<void>((resolve, reject) => {
        server.once('error', (err) => reject(new KeyholdError(`cannot listen on ${listenPath}: ${err.message}`, 'pick another --listen path')));
        server.listen(listenPath, () => resolve());
      });
      chmodSync(listenPath, 0o600);
      process.stdout.write(`SSH_AUTH_SOCK=${listenPath}\n`);
      log.info({ listen: listenPath, connect: args.connect }, 'bridge ready');
      await new Promise<void>((resolve) => {
        for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
          process.once(signal, () => void closeServer(server).then(resolve));
        }
      });
    },
  );
}
