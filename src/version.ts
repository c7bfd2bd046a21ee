// The package's version, read from the package.json shipped beside dist/: yargs' own guess walks up
// from its install path, which names the wrong package.json under pnpm or a hoisted layout.
import { readFileSync } from 'node:fs';

export function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : 'unknown';
  } catch {
    return 'unknown';
  }
}
