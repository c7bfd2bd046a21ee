// A CommonJS dependency loaded when first called for, not at import: a short command (and
// `$(keyhold socket web)` runs before every git push) should not pay for libraries it never uses.
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

/** A getter that loads the package on its first call and returns the same module after. */
export function loadOnFirstUse<T>(name: string): () => T {
  let loaded: T | undefined;
  return () => (loaded ??= require(name) as T);
}
