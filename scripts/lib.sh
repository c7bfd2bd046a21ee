# Shared by scripts/start.sh and scripts/test.sh: bring the checkout to a runnable state.

# Debian packages the given commands need, installed when missing (root: apt-get; else: say how).
# Each argument is COMMAND:PACKAGE; COMMAND may be an absolute path, for a package that puts no
# command on PATH (openssh-tests: /usr/lib/openssh/regress/run-tests).
ensure_os_packages() {
  local need=() cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*} pkg=${pair#*:}
    if [[ $cmd == /* ]]; then
      [ -x "$cmd" ] || need+=("$pkg")
    else
      command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
    fi
  done
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ]; then
    echo "keyhold: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "keyhold: missing ${need[*]} (install them: sudo apt-get install ${need[*]})" >&2
    return 1
  fi
}

# npm dependencies (native modules build from source: better-sqlite3-multiple-ciphers, koffi).
ensure_node_deps() {
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
  fi
}

build() {
  npx --no-install tsc -p tsconfig.json
}
