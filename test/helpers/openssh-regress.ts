// Runs scripts/openssh-regress.sh (OpenSSH's own agent regression tests, Debian's openssh-tests)
// against an agent and reads its report: one `ok|FAIL|SKIP NAME (Ns)` line per test, each failure
// followed by the suite's FAIL/FATAL lines, indented, as `FAIL: message (at: trace line)`.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { REPO } from './keyhold.js';

export const RUNNER = join(REPO, 'scripts', 'openssh-regress.sh');

export const PEER_TESTS = ['agent', 'agent-timeout', 'agent-restrict', 'agent-subprocess', 'agent-getpeereid', 'agent-ptrace'] as const;
export type PeerTest = (typeof PEER_TESTS)[number];

export interface PeerTestResult {
  outcome: 'ok' | 'FAIL' | 'SKIP';
  seconds: number;
  /** The suite's FAIL/FATAL lines (and the runner's notes: a timeout, a skip's reason), in order. */
  failures: string[];
}

export interface PeerRun {
  status: number | null;
  signal: NodeJS.Signals | null;
  seconds: number;
  output: string;
  stderr: string;
  results: Map<string, PeerTestResult>;
}

export function parsePeerReport(output: string): Map<string, PeerTestResult> {
  const results = new Map<string, PeerTestResult>();
  let current: PeerTestResult | null = null;
  for (const line of output.split('\n')) {
    const head = /^(ok|FAIL|SKIP) (\S+) \((\d+)s\)$/.exec(line);
    if (head) {
      current = { outcome: head[1] as PeerTestResult['outcome'], seconds: Number(head[3]), failures: [] };
      results.set(head[2]!, current);
    } else if (current && line.startsWith('    ')) {
      current.failures.push(line.slice(4));
    }
  }
  return results;
}

/**
 * Runs the runner for `agent` within `budgetSeconds` (its own bound: it stops the test still
 * running then); stopped 30 s after that if it has not exited (SIGTERM: it ends what it started).
 */
export function runPeerSuite(agent: 'keyhold' | 'openssh', budgetSeconds: number): Promise<PeerRun> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [RUNNER, '--agent', agent], {
      env: { ...process.env, KEYHOLD_REGRESS_TIMEOUT: String(budgetSeconds) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGTERM');
      setTimeout(() => child.kill('SIGKILL'), 15_000).unref();
    }, (budgetSeconds + 30) * 1000);
    child.on('error', reject);
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, seconds: (Date.now() - started) / 1000, output, stderr, results: parsePeerReport(output) });
    });
  });
}
