// SSH wire primitives (RFC 4251 §5): uint32, string, mpint, name-list, byte, boolean.

export class WireFormatError extends Error {
  override name = 'WireFormatError';
}

/** Sequential reader over one message body; every read is bounds-checked. */
export class WireReader {
  private offset = 0;

  constructor(private readonly buf: Buffer) {}

  get remaining(): number {
    return this.buf.length - this.offset;
  }

  byte(): number {
    this.need(1);
    return this.buf[this.offset++]!;
  }

  boolean(): boolean {
    return this.byte() !== 0;
  }

  uint32(): number {
    this.need(4);
    const value = this.buf.readUInt32BE(this.offset);
    this.offset += 4;
    return value;
  }

  uint64(): bigint {
    this.need(8);
    const value = this.buf.readBigUInt64BE(this.offset);
    this.offset += 8;
    return value;
  }

  /** Bytes read so far (for a signature over a message's leading part). */
  get position(): number {
    return this.offset;
  }

  /** A length-prefixed byte string; returns a view, not a copy. */
  string(): Buffer {
    const length = this.uint32();
    this.need(length);
    const view = this.buf.subarray(this.offset, this.offset + length);
    this.offset += length;
    return view;
  }

  utf8(): string {
    return this.string().toString('utf8');
  }

  /** Unsigned mpint as big-endian magnitude without the sign padding byte. */
  mpintUnsigned(): Buffer {
    const raw = this.string();
    if (raw.length > 0 && (raw[0]! & 0x80) !== 0) throw new WireFormatError('negative mpint');
    let start = 0;
    while (start < raw.length && raw[start] === 0) start++;
    return raw.subarray(start);
  }

  nameList(): string[] {
    const text = this.utf8();
    return text.length === 0 ? [] : text.split(',');
  }

  /** Everything not yet read. */
  rest(): Buffer {
    const view = this.buf.subarray(this.offset);
    this.offset = this.buf.length;
    return view;
  }

  end(): void {
    if (this.remaining !== 0) throw new WireFormatError(`${this.remaining} trailing bytes`);
  }

  private need(count: number): void {
    if (this.offset + count > this.buf.length) throw new WireFormatError('truncated message');
  }
}

/** Accumulates encoded fields; `toBuffer()` concatenates once. */
export class WireWriter {
  private readonly parts: Buffer[] = [];
  private length = 0;

  byte(value: number): this {
    return this.push(Buffer.of(value & 0xff));
  }

  boolean(value: boolean): this {
    return this.byte(value ? 1 : 0);
  }

  uint64(value: bigint): this {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64BE(value, 0);
    return this.push(b);
  }

  uint32(value: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(value >>> 0, 0);
    return this.push(b);
  }

  string(value: Buffer | string): this {
    const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
    this.uint32(bytes.length);
    return this.push(bytes);
  }

  /** Encodes a non-negative big-endian magnitude as an SSH mpint. */
  mpint(magnitude: Buffer): this {
    let start = 0;
    while (start < magnitude.length && magnitude[start] === 0) start++;
    const trimmed = magnitude.subarray(start);
    if (trimmed.length === 0) return this.uint32(0);
    if ((trimmed[0]! & 0x80) !== 0) {
      this.uint32(trimmed.length + 1);
      this.push(Buffer.of(0));
      return this.push(trimmed);
    }
    return this.string(trimmed);
  }

  nameList(names: readonly string[]): this {
    return this.string(names.join(','));
  }

  raw(bytes: Buffer): this {
    return this.push(bytes);
  }

  toBuffer(): Buffer {
    return Buffer.concat(this.parts, this.length);
  }

  private push(bytes: Buffer): this {
    this.parts.push(bytes);
    this.length += bytes.length;
    return this;
  }
}
