#!/usr/bin/env bash
# The whole test suite from a fresh clone: OS packages, npm dependencies, build, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_os_packages sshd:openssh-server ssh:openssh-client ssh-agent:openssh-client git:git openssl:openssl socat:socat unshare:util-linux flock:util-linux mount:mount tcsh:tcsh \
  /usr/lib/openssh/regress/run-tests:openssh-tests sudo:sudo gdb:gdb runuser:util-linux rev:util-linux setpriv:util-linux prlimit:util-linux \
  dbus-daemon:dbus-daemon busctl:systemd groff:groff-base man:man-db systemd-analyze:systemd /usr/lib/systemd/systemd:systemd \
  /usr/lib/polkit-1/polkitd:polkitd pkcheck:polkitd pkaction:polkitd keyctl:keyutils gnome-keyring-daemon:gnome-keyring \
  "${NATIVE_BUILD_PACKAGES[@]}"
ensure_node_deps
build
npx --no-install vitest run "$@"
