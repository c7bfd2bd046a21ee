// pino to stderr: JSON, or human-readable when stderr is a terminal. Level from KEYHOLD_LOG_LEVEL.
import pino, { type Logger } from 'pino';
import pretty from 'pino-pretty';

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export function createLogger(env: NodeJS.ProcessEnv = process.env, defaultLevel = 'info'): Logger {
  const requested = env.KEYHOLD_LOG_LEVEL?.toLowerCase();
  const level = requested && LEVELS.includes(requested) ? requested : defaultLevel;
  const options = { level, base: { pid: process.pid }, name: 'keyhold' };
  if (process.stderr.isTTY) return pino(options, pretty({ destination: 2, sync: true, colorize: true }));
  return pino(options, pino.destination({ fd: 2, sync: true }));
}
