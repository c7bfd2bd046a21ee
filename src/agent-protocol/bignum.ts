// Big-endian magnitudes as BigInt, for RSA's CRT values and consistency checks. BigInt values are
// immutable and live in the V8 heap until collected: nothing here can zero them.

export const toBigInt = (magnitude: Buffer): bigint => BigInt(`0x${magnitude.toString('hex') || '0'}`);

export function fromBigInt(n: bigint): Buffer {
  const hex = n.toString(16);
  return Buffer.from(hex.length % 2 ? `0${hex}` : hex, 'hex');
}

/** a⁻¹ mod m; throws when there is none. */
export function modInverse(a: bigint, m: bigint): bigint {
  let [oldR, r] = [a % m, m];
  let [oldS, s] = [1n, 0n];
  while (r !== 0n) {
    const q = oldR / r;
    [oldR, r] = [r, oldR - q * r];
    [oldS, s] = [s, oldS - q * s];
  }
  if (oldR !== 1n) throw new RangeError('not invertible');
  return ((oldS % m) + m) % m;
}
