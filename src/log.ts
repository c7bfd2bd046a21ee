// pino to stderr: JSON, or human-readable when stderr is a terminal. Level from KEYHOLD_LOG_LEVEL.
import pino, { type Logger } from 'pino';
import pretty from 'pino-pretty';
import { writeSync } from 'node:fs';

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export function createLogger(env: NodeJS.ProcessEnv = process.env, defaultLevel = 'info'): Logger {
  const requested = env.KEYHOLD_LOG_LEVEL?.toLowerCase();
  const level = requested && LEVELS.includes(requested) ? requested : defaultLevel;
  const options = { level, base: { pid: process.pid }, name: 'keyhold' };
  if (process.stderr.isTTY) return pino(options, pretty({ destination: 2, sync: true, colorize: true }));
  return pino(options, forgivingStderr());
}

/**
 * Log lines to stderr that are dropped, not thrown, when they cannot be written: a full disk
 * under the daemon's log (or stderr on /dev/full) must not end the daemon, whose every log call
 * would otherwise throw. A pipe that is full for a moment (EAGAIN) is waited for, briefly.
 */
function forgivingStderr(): { write(line: string): void } {
  const pause = new Int32Array(new SharedArrayBuffer(4));
  return {
    write(line: string) {
      const bytes = Buffer.from(line);
      let written = 0;
      for (let tries = 0; written < bytes.length && tries < 100; ) {
        try {
          written += writeSync(2, bytes, written);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') return;
          tries++;
          Atomics.wait(pause, 0, 0, 1);
        }
      }
    },
  };
}
