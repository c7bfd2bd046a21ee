// Which scope sockets a sync keeps: scopes with keys, and scopes that lost their keys, up to a bound.
import { describe, expect, it } from 'vitest';
import { EmptiedScopes } from '../../src/signer/scope-sockets.js';

const set = (...scopes: string[]) => new Set(scopes);
const sorted = (scopes: Iterable<string>) => [...scopes].sort();

describe('EmptiedScopes', () => {
  it('keeps a served scope that lost its keys, and forgets it once it has keys again', () => {
    const emptied = new EmptiedScopes(4);
    expect(sorted(emptied.keep(set('web', 'ops'), []))).toEqual(['ops', 'web']);
    expect(sorted(emptied.keep(set('web'), ['web', 'ops']))).toEqual(['ops', 'web']);
    expect(sorted(emptied.keep(set('web', 'ops'), ['web', 'ops']))).toEqual(['ops', 'web']);
    // ops has keys again, so emptying web now leaves one empty scope, not two
    const dropped: string[] = [];
    expect(sorted(emptied.keep(set('ops'), ['web', 'ops'], (s) => dropped.push(s)))).toEqual(['ops', 'web']);
    expect(dropped).toEqual([]);
  });

  it('beyond the bound, closes the scope empty the longest first, and says which', () => {
    const emptied = new EmptiedScopes(2);
    const dropped: string[] = [];
    let served = [...emptied.keep(set('a', 'b', 'c', 'keep'), [])];
    // a, then b, then c lose their last key
    for (const withKeys of [set('b', 'c', 'keep'), set('c', 'keep'), set('keep')]) served = [...emptied.keep(withKeys, served, (s) => dropped.push(s))];
    expect(dropped).toEqual(['a']);
    expect(sorted(served)).toEqual(['b', 'c', 'keep']);
  });

  it('never counts or drops a scope that has keys (or is configured)', () => {
    const emptied = new EmptiedScopes(0);
    const dropped: string[] = [];
    expect(sorted(emptied.keep(set('x', 'y'), ['x', 'y', 'z'], (s) => dropped.push(s)))).toEqual(['x', 'y']);
    expect(dropped).toEqual(['z']);
  });
});
