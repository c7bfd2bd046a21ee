// Where a key is in a TOML file, for errors that name the line: the parser gives a line for syntax
// errors only, not for a value that parses but is wrong. A plain scan of headers and `key =` lines;
// a key it cannot place (written inline, say) gets the line of its table, or line 1.

const HEADER = /^\s*(\[\[?)\s*([^\]]*?)\s*\]\]?\s*(?:#.*)?$/;

/** `a . "b"` → `a.b`: table names compared without spaces and quotes. */
function normalizeName(name: string): string {
  return name
    .split('.')
    .map((part) => part.trim().replace(/^(["'])(.*)\1$/, '$2'))
    .join('.');
}

function keyPattern(key: string): RegExp {
  const escaped = key.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return new RegExp(`^\\s*(?:${escaped}|"${escaped}"|'${escaped}')\\s*(?:=|\\.)`);
}

/**
 * The 1-based line of `key` in table `table` (`[]` = the top level; for an array of tables,
 * `occurrence` picks its nth `[[table]]`, counting from 0).
 */
export function lineOfKey(text: string, table: readonly string[], key: string, occurrence?: number): number {
  const lines = text.split('\n');
  const wanted = table.join('.');
  const pattern = keyPattern(key);
  let current = '';
  let seen = new Map<string, number>();
  let inWanted = wanted === '' && occurrence === undefined;
  let tableLine = 1;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    const header = HEADER.exec(line);
    if (header) {
      current = normalizeName(header[2]!);
      const count = seen.get(current) ?? 0;
      seen.set(current, count + 1);
      if (wanted === '') {
        // A top-level key that is a table: its header is where it is.
        if (current === key || current.startsWith(`${key}.`)) return i + 1;
        inWanted = false;
        continue;
      }
      inWanted = current === wanted && (occurrence === undefined || (header[1] === '[[' && count === occurrence));
      if (inWanted) tableLine = i + 1;
      continue;
    }
    if (inWanted && pattern.test(line)) return i + 1;
  }
  return tableLine;
}
