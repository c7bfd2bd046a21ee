#!/usr/bin/env bash
# Runs the daemon on the default vault, creating it on first use: a generated passphrase kept in
# ~/.config/keyhold/passphrase (0600), an ed25519 key in scope "default", and the line to export.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_node_deps
build
keyhold() { node bin/keyhold "$@"; }

config_dir=${XDG_CONFIG_HOME:-$HOME/.config}/keyhold
pass_file=$config_dir/passphrase
vault=${KEYHOLD_VAULT:-${XDG_DATA_HOME:-$HOME/.local/share}/keyhold/vault.db}
if [ ! -e "$vault.keys" ]; then
  mkdir -p "$config_dir" && chmod 700 "$config_dir"
  (umask 077 && keyhold init --generate-passphrase >"$pass_file" 2>/dev/null)
  echo "keyhold: created $vault; its passphrase is in $pass_file" >&2
fi
if [ -z "${KEYHOLD_PASSPHRASE_FILE:-}" ] && [ -f "$pass_file" ]; then
  export KEYHOLD_PASSPHRASE_FILE=$pass_file
fi
if [ "$(keyhold key list --scope default --json)" = "[]" ]; then
  keyhold key generate default --comment "keyhold-default" >&2
fi
echo "export SSH_AUTH_SOCK=$(keyhold socket default)"
exec node bin/keyhold serve
