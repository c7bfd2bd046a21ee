// The lines `keyhold unlock --scope S` prints for eval, in a Bourne shell and in csh.
import { describe, expect, it } from 'vitest';
import { cshQuote, setenvLine, shellQuote } from '../../src/shell-quote.js';

describe('setenvLine', () => {
  it('leaves a plain path bare in both syntaxes', () => {
    expect(setenvLine('SSH_AUTH_SOCK', '/run/user/1000/keyhold/scopes/web.sock', false)).toBe('export SSH_AUTH_SOCK=/run/user/1000/keyhold/scopes/web.sock');
    expect(setenvLine('SSH_AUTH_SOCK', '/run/user/1000/keyhold/scopes/web.sock', true)).toBe('setenv SSH_AUTH_SOCK /run/user/1000/keyhold/scopes/web.sock;');
  });

  it("quotes ', ! and spaces for csh, whose history substitution works inside single quotes", () => {
    expect(cshQuote("/tmp/it's here!")).toBe(`'/tmp/it'\\''s here'\\!''`);
    expect(shellQuote("/tmp/it's here!")).toBe(`'/tmp/it'\\''s here!'`);
  });

  it('refuses a newline for csh, which cannot take one from eval', () => {
    expect(() => cshQuote('/tmp/a\nb')).toThrow(/newline/);
    expect(shellQuote('/tmp/a\nb')).toBe("'/tmp/a\nb'");
  });
});
