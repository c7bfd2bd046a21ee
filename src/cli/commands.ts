// Every command keyhold has, in the order `keyhold --help` lists them: main.ts registers them,
// scripts/build-man.mjs writes keyhold(1) from the same definitions.
import type { Argv } from 'yargs';
import type { GlobalArgs } from './common.js';
import { initCommand } from './init.js';
import { keyCommand } from './key.js';
import { scopeCommand } from './scope.js';
import { serveCommand } from './serve.js';
import { tokenCommand } from './token.js';
import { bridgeCommand } from './bridge.js';
import { lockCommand, statusCommand, stopCommand, unlockCommand } from './unlock.js';
import { factorCommand, passphraseCommand } from './factor.js';
import { secretCommand } from './secret.js';
import { envCommand } from './env.js';
import { auditCommand } from './audit.js';
import { approvalsCommand, approveCommand, denyCommand } from './approvals.js';
import { policyCommand } from './policy.js';
import { completionCommand } from './completion.js';
import { doctorCommand } from './doctor.js';

export const COMMANDS: ((yargs: Argv<GlobalArgs>) => unknown)[] = [
  initCommand,
  keyCommand,
  scopeCommand,
  tokenCommand,
  serveCommand,
  bridgeCommand,
  unlockCommand,
  lockCommand,
  statusCommand,
  stopCommand,
  factorCommand,
  passphraseCommand,
  secretCommand,
  envCommand,
  auditCommand,
  policyCommand,
  approvalsCommand,
  approveCommand,
  denyCommand,
  doctorCommand,
  completionCommand,
];
