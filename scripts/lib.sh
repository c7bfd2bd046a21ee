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

# What node-gyp needs to build better-sqlite3-multiple-ciphers from source, which it does wherever
# its prebuilt binary cannot be downloaded from GitHub (koffi's binaries come from npm itself).
NATIVE_BUILD_PACKAGES=(g++:build-essential make:make python3:python3)

# npm dependencies, installed when node_modules is missing or older than the lockfile.
ensure_node_deps() {
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    ensure_os_packages "${NATIVE_BUILD_PACKAGES[@]}"
    echo "keyhold: installing npm dependencies (native modules build from source: about a minute)…" >&2
    npm ci --no-audit --no-fund
  fi
}

build() {
  npx --no-install tsc -p tsconfig.json
}

# tsc takes a while on a small machine: skip it when dist/ is newer than everything it is built from.
build_if_stale() {
  if [ ! -f dist/cli/main.js ] || [ -n "$(find src tsconfig.json package-lock.json -newer dist/cli/main.js -print -quit)" ]; then
    echo "keyhold: building…" >&2
    build
  fi
}
