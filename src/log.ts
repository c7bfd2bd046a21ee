// pino to stderr: JSON, or human-readable when stderr is a terminal. Level, first that is set:
// the caller's (serve's --log-level), KEYHOLD_LOG_LEVEL, the caller's default (the config file's
// log_level), info.
import type { Logger, pino as PinoFactory } from 'pino';
import type PinoPretty from 'pino-pretty';
import { writeSync } from 'node:fs';
import { usageError } from './errors.js';
import { loadOnFirstUse } from './load-on-first-use.js';

// Only serve and bridge log: every other command starts without pino (or pino-pretty, for a terminal).
const pinoModule = loadOnFirstUse<typeof PinoFactory>('pino');
const prettyModule = loadOnFirstUse<typeof PinoPretty>('pino-pretty');

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export const isLogLevel = (text: string): boolean => (LOG_LEVELS as readonly string[]).includes(text);

/** KEYHOLD_LOG_LEVEL, checked: a typo must not quietly hide the lines its user asked for. */
export function envLogLevel(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const requested = env.KEYHOLD_LOG_LEVEL?.toLowerCase();
  if (!requested) return undefined;
  if (!isLogLevel(requested)) throw usageError(`KEYHOLD_LOG_LEVEL=${JSON.stringify(requested.slice(0, 40))} is not a log level`, `use one of ${LOG_LEVELS.join(', ')}`);
  return requested;
}

export function createLogger(env: NodeJS.ProcessEnv = process.env, defaultLevel = 'info', level?: string): Logger {
  if (level === undefined) {
    const requested = env.KEYHOLD_LOG_LEVEL?.toLowerCase();
    level = requested && isLogLevel(requested) ? requested : defaultLevel;
  }
  const options = { level, base: { pid: process.pid }, name: 'keyhold' };
  const pino = pinoModule();
  if (process.stderr.isTTY) return pino(options, prettyModule()({ destination: 2, sync: true, colorize: true }));
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
