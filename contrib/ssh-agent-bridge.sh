#!/bin/sh
# keyhold's container bridge for images without Node: POSIX sh + socat.
#
#   KEYHOLD_TOKEN=khp_… contrib/ssh-agent-bridge.sh unix:/run/keyhold/signer.sock /tmp/agent.sock &
#   SSH_AUTH_SOCK=/tmp/agent.sock git push
#
# Listens on a 0600 Unix socket; for each client it dials the signer (unix:PATH or tcp:HOST:PORT),
# sends the handshake (uint32 big-endian length, then the token), then relays both ways.
# The token comes from KEYHOLD_TOKEN or the file named by KEYHOLD_TOKEN_FILE, never from argv:
# the per-connection relay reads it from its environment.
set -eu

if [ "${1:-}" = "--relay" ]; then
  token=$KEYHOLD_TOKEN
  n=${#token}
  # shellcheck disable=SC2059 # the format is built from octal escapes on purpose
  printf "\\$(printf %03o $((n >> 24 & 255)))\\$(printf %03o $((n >> 16 & 255)))\\$(printf %03o $((n >> 8 & 255)))\\$(printf %03o $((n & 255)))"
  printf '%s' "$token"
  exec cat
fi
if [ "${1:-}" = "--connection" ]; then
  # Handshake and client bytes into a socat connected to the signer; its output goes to the client.
  sh "$0" --relay | socat - "$KEYHOLD_BRIDGE_TARGET"
  exit
fi

usage() { echo "usage: KEYHOLD_TOKEN=… $0 unix:PATH|tcp:HOST:PORT [LISTEN_PATH]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in
  unix:?*) target="UNIX-CONNECT:${1#unix:}" ;;
  tcp:?*) target="TCP:${1#tcp:}" ;;
  *) usage ;;
esac
listen=${2:-${TMPDIR:-/tmp}/keyhold-agent.$$.sock}
if [ -z "${KEYHOLD_TOKEN:-}" ] && [ -n "${KEYHOLD_TOKEN_FILE:-}" ]; then
  KEYHOLD_TOKEN=$(cat "$KEYHOLD_TOKEN_FILE")
fi
[ -n "${KEYHOLD_TOKEN:-}" ] || { echo "keyhold-bridge: set KEYHOLD_TOKEN or KEYHOLD_TOKEN_FILE" >&2; exit 2; }
export KEYHOLD_TOKEN
KEYHOLD_BRIDGE_TARGET=$target
export KEYHOLD_BRIDGE_TARGET
command -v socat >/dev/null 2>&1 || { echo "keyhold-bridge: socat is not installed" >&2; exit 1; }

self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
echo "SSH_AUTH_SOCK=$listen"
# socat's address syntax gives ':' and ',' meanings, so the signer address travels in the
# environment, not in the command below (this script's own path must not contain spaces).
exec socat UNIX-LISTEN:"$listen",fork,unlink-early,mode=600 EXEC:"sh $self --connection"
