// Where each key of a TOML file is, for errors that name the line: the parser gives a line for
// syntax errors only, not for a value that parses but is wrong. The text has already parsed as
// TOML, so the scanner follows the grammar loosely; whatever it cannot place is left out, and an
// error then falls back to the line of the enclosing table, or line 1. It never throws.

/** A key's place: its path (array-of-tables elements by index) → the line it first appears on. */
export class TomlLines {
  private readonly lines = new Map<string, number>();
  private readonly children = new Map<string, Map<string, number>>();

  /** The line of `path` (1-based), if it was found. */
  line(...path: (string | number)[]): number | undefined {
    return this.lines.get(joinPath(path.map(String)));
  }

  /** The keys directly under `path`, each with its line. */
  childLines(...path: (string | number)[]): ReadonlyMap<string, number> {
    return this.children.get(joinPath(path.map(String))) ?? new Map();
  }

  /** Records `path` and each of its prefixes, keeping the first line each was seen on. */
  record(path: readonly string[], line: number): void {
    for (let depth = 1; depth <= path.length; depth++) {
      const key = joinPath(path.slice(0, depth));
      if (this.lines.has(key)) continue;
      this.lines.set(key, line);
      const parent = joinPath(path.slice(0, depth - 1));
      let siblings = this.children.get(parent);
      if (!siblings) this.children.set(parent, (siblings = new Map()));
      siblings.set(path[depth - 1]!, line);
    }
  }
}

// A NUL cannot appear in a TOML key, so it separates path segments unambiguously.
const joinPath = (path: readonly string[]) => path.join('\u0000');

export function tomlLines(text: string): TomlLines {
  const found = new TomlLines();
  try {
    new Scanner(text, found).run();
  } catch {
    /* keep what was found */
  }
  return found;
}

class Scanner {
  private i = 0;
  private line = 1;
  /** The table the last header opened, with array-of-tables elements resolved to their index. */
  private table: string[] = [];
  /** How many elements each array of tables has so far (by resolved path). */
  private readonly arrays = new Map<string, number>();

  constructor(
    private readonly text: string,
    private readonly found: TomlLines,
  ) {}

  run(): void {
    for (let guard = 0; guard < this.text.length + 1; guard++) {
      this.skipBlank(true);
      if (this.i >= this.text.length) return;
      if (this.peek() === '[') this.header();
      else this.keyValue(this.table);
    }
  }

  private peek(offset = 0): string {
    return this.text[this.i + offset] ?? '';
  }

  private advance(n = 1): void {
    for (let k = 0; k < n && this.i < this.text.length; k++) {
      if (this.text[this.i] === '\n') this.line++;
      this.i++;
    }
  }

  /** Spaces, tabs, comments; newlines too when `newlines`. */
  private skipBlank(newlines: boolean): void {
    while (this.i < this.text.length) {
      const c = this.peek();
      if (c === ' ' || c === '\t' || c === '\r' || (newlines && c === '\n')) this.advance();
      else if (c === '#') while (this.i < this.text.length && this.peek() !== '\n') this.advance();
      else return;
    }
  }

  /** `[a.b]` or `[[a.b]]`: an array of tables gets a new element; `[a.b]` after `[[a]]` is inside a's last one. */
  private header(): void {
    const line = this.line;
    const array = this.peek(1) === '[';
    this.advance(array ? 2 : 1);
    const parts = this.keyPath();
    this.advance(array ? 2 : 1);
    const resolved: string[] = [];
    parts.forEach((part, index) => {
      resolved.push(part);
      const key = joinPath(resolved);
      if (array && index === parts.length - 1) {
        const element = (this.arrays.get(key) ?? -1) + 1;
        this.arrays.set(key, element);
        resolved.push(String(element));
      } else if (this.arrays.has(key)) {
        resolved.push(String(this.arrays.get(key)));
      }
    });
    this.table = resolved;
    this.found.record(resolved, line);
  }

  private keyValue(table: readonly string[]): void {
    const line = this.line;
    const path = [...table, ...this.keyPath()];
    this.skipBlank(false);
    if (this.peek() === '=') this.advance();
    this.found.record(path, line);
    this.value(path);
  }

  /** `a`, `"a b"`, `'a'`, dotted: `a."b".c`. */
  private keyPath(): string[] {
    const path: string[] = [];
    for (;;) {
      this.skipBlank(false);
      const c = this.peek();
      if (c === '"') path.push(this.basicString());
      else if (c === "'") path.push(this.literalString());
      else {
        const start = this.i;
        while (/[A-Za-z0-9_-]/.test(this.peek())) this.advance();
        if (this.i === start) throw new Error('no key');
        path.push(this.text.slice(start, this.i));
      }
      this.skipBlank(false);
      if (this.peek() !== '.') return path;
      this.advance();
    }
  }

  /** A value at `path`: an array's elements are `path.0`, `path.1`…; an inline table's keys are under `path`. */
  private value(path: readonly string[]): void {
    this.skipBlank(false);
    const c = this.peek();
    if (c === '"' || c === "'") {
      if (c === '"') this.basicString();
      else this.literalString();
      return;
    }
    if (c === '[') {
      this.advance();
      for (let element = 0; ; ) {
        this.skipBlank(true);
        if (this.peek() === ']') return this.advance();
        if (this.peek() === ',') {
          this.advance();
          continue;
        }
        if (this.i >= this.text.length) throw new Error('unterminated array');
        const elementPath = [...path, String(element++)];
        this.found.record(elementPath, this.line);
        this.value(elementPath);
      }
    }
    if (c === '{') {
      this.advance();
      for (;;) {
        this.skipBlank(true);
        if (this.peek() === '}') return this.advance();
        if (this.peek() === ',') {
          this.advance();
          continue;
        }
        if (this.i >= this.text.length) throw new Error('unterminated table');
        this.keyValue(path);
      }
    }
    // A number, boolean or date: up to the next separator.
    const start = this.i;
    while (this.i < this.text.length && !/[,\]}\n#]/.test(this.peek())) this.advance();
    if (this.i === start) throw new Error('no value');
  }

  private basicString(): string {
    const multi = this.text.startsWith('"""', this.i);
    this.advance(multi ? 3 : 1);
    const start = this.i;
    for (;;) {
      if (this.i >= this.text.length) throw new Error('unterminated string');
      const c = this.peek();
      if (c === '\\') {
        this.advance(2);
        continue;
      }
      if (multi ? this.text.startsWith('"""', this.i) : c === '"') break;
      this.advance();
    }
    const raw = this.text.slice(start, this.i);
    if (multi) {
      // Up to two more quotes may close the content (`""""` ends with a quote in the string).
      this.advance(3);
      while (this.peek() === '"') this.advance();
    } else this.advance();
    try {
      return JSON.parse(`"${raw}"`) as string;
    } catch {
      return raw;
    }
  }

  private literalString(): string {
    const multi = this.text.startsWith("'''", this.i);
    this.advance(multi ? 3 : 1);
    const start = this.i;
    const end = this.text.indexOf(multi ? "'''" : "'", this.i);
    if (end < 0) throw new Error('unterminated string');
    this.advance(end - this.i);
    const raw = this.text.slice(start, this.i);
    this.advance(multi ? 3 : 1);
    if (multi) while (this.peek() === "'") this.advance();
    return raw;
  }
}
