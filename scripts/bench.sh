#!/usr/bin/env bash
# keyhold against OpenSSH's ssh-agent, side by side (see README, "Performance").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_os_packages ssh-agent:openssh-client ssh-add:openssh-client ssh-keygen:openssh-client
ensure_node_deps
build
npx --no-install tsc -p bench/tsconfig.json
# 5,000 idle connections need as many descriptors in the daemon and in the load generator.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec node dist-bench/bench/run.js "$@"
