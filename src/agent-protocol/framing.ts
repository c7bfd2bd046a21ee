// Agent-protocol framing: uint32 length, then `length` bytes (type byte + body).

/** Largest frame payload accepted (the contract's 256 KiB; OpenSSH uses the same bound). */
export const MAX_FRAME_LENGTH = 256 * 1024;

const INITIAL_PARTIAL = 4096;

export class FrameError extends Error {
  override name = 'FrameError';
}

export function frame(payload: Buffer): Buffer {
  const out = Buffer.allocUnsafe(4 + payload.length);
  out.writeUInt32BE(payload.length, 0);
  payload.copy(out, 4);
  return out;
}

/**
 * Incremental frame reader. Chunks may split frames anywhere or hold several; each payload
 * (type byte + body) comes out once complete. A length of 0 or over MAX_FRAME_LENGTH throws
 * FrameError as soon as the 4 length bytes are known, so a peer cannot make us buffer it.
 * A partial frame is copied into one buffer that grows geometrically up to its announced size:
 * one byte at a time costs O(n), not O(n²), and memory follows the bytes actually received.
 */
export class FrameReader {
  private readonly header = Buffer.alloc(4);
  private headerFill = 0;
  private partial: Buffer | null = null;
  private partialFill = 0;
  /** The announced length of the frame being assembled in `partial`. */
  private partialLength = 0;

  constructor(private readonly maxLength = MAX_FRAME_LENGTH) {}

  /** Bytes held for an incomplete frame. */
  get buffered(): number {
    return this.partial ? 4 + this.partialFill : this.headerFill;
  }

  /**
   * Memory allocated for the incomplete frame: the capacity of its growing buffer, which runs
   * ahead of `buffered` (up to twice it, and at least 4 KiB once a body has begun).
   */
  get held(): number {
    return this.partial ? this.partial.length : 0;
  }

  /**
   * Feeds bytes in; calls `onFrame` for each complete payload, in order, before looking further.
   * Payloads may be views into `chunk`: use them before the next push. Throws FrameError at the
   * first bad length, after the frames before it were delivered.
   */
  push(chunk: Buffer, onFrame: (payload: Buffer) => void): void {
    let offset = 0;
    while (offset < chunk.length) {
      if (this.partial) {
        const take = Math.min(this.partialLength - this.partialFill, chunk.length - offset);
        if (this.partialFill + take > this.partial.length) {
          // Grow geometrically: memory follows the bytes received, not the length announced, so
          // a peer that announces 256 KiB and sends 4 bytes holds 4 KiB, and copying stays O(n).
          const grown = Buffer.allocUnsafe(Math.min(this.partialLength, Math.max(this.partial.length * 2, this.partialFill + take)));
          this.partial.copy(grown, 0, 0, this.partialFill);
          this.partial = grown;
        }
        chunk.copy(this.partial, this.partialFill, offset, offset + take);
        this.partialFill += take;
        offset += take;
        if (this.partialFill === this.partialLength) {
          const payload = this.partial;
          this.partial = null;
          this.partialFill = 0;
          onFrame(payload);
        }
        continue;
      }
      let length: number;
      if (this.headerFill === 0 && chunk.length - offset >= 4) {
        length = chunk.readUInt32BE(offset);
        offset += 4;
      } else {
        const take = Math.min(4 - this.headerFill, chunk.length - offset);
        chunk.copy(this.header, this.headerFill, offset, offset + take);
        this.headerFill += take;
        offset += take;
        if (this.headerFill < 4) break;
        length = this.header.readUInt32BE(0);
        this.headerFill = 0;
      }
      this.checkLength(length);
      if (chunk.length - offset >= length) {
        offset += length;
        onFrame(chunk.subarray(offset - length, offset));
      } else {
        this.partial = Buffer.allocUnsafe(Math.min(length, INITIAL_PARTIAL));
        this.partialLength = length;
        this.partialFill = 0;
      }
    }
  }

  private checkLength(length: number): void {
    if (length === 0) throw new FrameError('zero-length frame');
    if (length > this.maxLength) throw new FrameError(`frame of ${length} bytes exceeds ${this.maxLength}`);
  }
}
