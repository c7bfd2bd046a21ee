#!/usr/bin/env bash
# Runs the daemon on the default vault, creating it on first use: a generated passphrase kept in
# ~/.config/keyhold/passphrase (0600), an ed25519 key in scope "default", and the line to export.
# Says what it does on each slow step (stderr); the export line goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_node_deps
build_if_stale
keyhold() { node bin/keyhold "$@"; }

config_dir=${XDG_CONFIG_HOME:-$HOME/.config}/keyhold
pass_file=$config_dir/passphrase
vault=${KEYHOLD_VAULT:-${XDG_DATA_HOME:-$HOME/.local/share}/keyhold/vault.db}
if [ ! -e "$vault.keys" ]; then
  echo "keyhold: creating the vault…" >&2
  mkdir -p "$config_dir" && chmod 700 "$config_dir"
  # init's own note ("the passphrase above is shown only once") does not fit a passphrase kept in a
  # file: show its stderr only when it fails.
  if ! init_errors=$( (umask 077 && keyhold init --generate-passphrase >"$pass_file") 2>&1 ); then
    rm -f "$pass_file"
    echo "$init_errors" >&2
    exit 1
  fi
  echo "keyhold: created $vault; its passphrase is in $pass_file" >&2
fi
if [ -z "${KEYHOLD_PASSPHRASE_FILE:-}" ] && [ -f "$pass_file" ]; then
  export KEYHOLD_PASSPHRASE_FILE=$pass_file
fi
if [ "$(keyhold key list --scope default --json)" = "[]" ]; then
  echo "keyhold: generating an ed25519 key in scope \"default\"…" >&2
  keyhold key generate default --comment "keyhold-default" >&2
fi

socket=$(keyhold socket default)
echo "keyhold: starting the daemon…" >&2
node bin/keyhold serve &
daemon=$!
# Ctrl-C reaches the daemon itself (same process group): keep waiting while it stops. A TERM sent
# to this script alone is passed on.
trap ':' INT
trap 'kill -TERM "$daemon" 2>/dev/null' TERM
daemon_state=
for _ in $(seq 100); do
  kill -0 "$daemon" 2>/dev/null || break
  daemon_state=$(keyhold status --json 2>/dev/null | tr -d ' \n') || true
  case $daemon_state in *'"running":true'*) break ;; esac
  sleep 0.2
done
# Only our daemon's readiness counts (another one running here makes ours exit at once).
kill -0 "$daemon" 2>/dev/null || daemon_state=
case $daemon_state in
  *'"running":true'*)
    case $daemon_state in *'"locked":true'*) echo "keyhold: the daemon runs locked: \`keyhold unlock\` unlocks it" >&2 ;; esac
    echo "keyhold: ready. In another shell:" >&2
    echo "export SSH_AUTH_SOCK=$socket"
    echo "keyhold: then ssh-add -l lists the key, and ssh, git and ssh-keygen -Y sign use it; \`keyhold key pub default\` prints the line for authorized_keys. Ctrl-C here stops the daemon." >&2
    ;;
esac
while kill -0 "$daemon" 2>/dev/null; do wait "$daemon" || true; done
# bash keeps an exited job's status: the daemon's own, whatever interrupted the waits above.
status=0
wait "$daemon" || status=$?
exit "$status"
