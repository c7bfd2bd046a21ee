#!/usr/bin/env bash
# The peer suite: OpenSSH's own regression tests for the agent (Debian's package openssh-tests,
# the suite of the system's OpenSSH) run against an agent: keyhold through
# scripts/ssh-agent-compat, or OpenSSH's ssh-agent for comparison.
#
#   scripts/openssh-regress.sh [--agent keyhold|openssh] [--keep] [test ...]
#
# Prints one line per test, `ok NAME`, `FAIL NAME` or `SKIP NAME` (a skip counts as a failure),
# each failure followed by the suite's own FAIL lines, indented. Exits 1 if any test did not pass.
# The suite needs a user that is not root and may sudo without a password (it runs sshd through
# sudo, and agent-getpeereid/agent-ptrace skip as root). Run as root, it runs the tests as user
# $KEYHOLD_REGRESS_USER (default kh-regress), creating that user and its sudoers file if missing.
# Needs a built project (npx tsc) for --agent keyhold. KEYHOLD_REGRESS_TIMEOUT: the whole run's
# time budget in seconds (default 300).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
suite=/usr/lib/openssh/regress
all_tests=(agent agent-timeout agent-restrict agent-subprocess agent-getpeereid agent-ptrace)
# The whole run's time budget in seconds: a test still running when it is spent is stopped.
budget=${KEYHOLD_REGRESS_TIMEOUT:-300}

die() {
  echo "openssh-regress: $*" >&2
  exit 2
}

agent=keyhold keep=
while [ $# -gt 0 ]; do
  case $1 in
    --agent) agent=${2:-}; shift 2 ;;
    --agent=*) agent=${1#--agent=}; shift ;;
    --keep) keep=1; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[ "$agent" = keyhold ] || [ "$agent" = openssh ] || die "--agent is keyhold or openssh"
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=("${all_tests[@]}")
[[ $budget =~ ^[1-9][0-9]*$ ]] || die "KEYHOLD_REGRESS_TIMEOUT is a number of seconds"
for t in "${tests[@]}"; do [ -f "$suite/$t.sh" ] || die "no test $t in $suite"; done

# What the suite needs, said plainly rather than skipped.
[ "$(uname -s)" = Linux ] || die "the peer suite runs on Linux only (it is Debian's openssh-tests)"
[ -x "$suite/run-tests" ] || die "$suite/run-tests is missing (install Debian's package openssh-tests)"
for cmd in make sudo gdb ssh-agent ssh-add ssh-keygen sshd setsid timeout rev; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || die "$cmd is missing (scripts/test.sh installs what the suite needs)"
done
node=$(command -v node) || die "node is missing"
if [ "$agent" = keyhold ] && [ ! -f "$repo/dist/cli/main.js" ]; then
  die "no built keyhold in $repo/dist (run npx tsc -p tsconfig.json)"
fi

# The user that runs the suite.
if [ "$(id -u)" -eq 0 ]; then
  user=${KEYHOLD_REGRESS_USER:-kh-regress}
  if ! id "$user" >/dev/null 2>&1; then
    echo "openssh-regress: creating user $user to run the suite (it refuses parts of itself as root)" >&2
    useradd -m -s /bin/sh "$user"
  fi
  sudoers=/etc/sudoers.d/$user
  if [ ! -e "$sudoers" ]; then
    echo "openssh-regress: letting $user sudo without a password ($sudoers): the suite runs sshd through sudo" >&2
    (umask 0227 && echo "$user ALL=(ALL) NOPASSWD: ALL" >"$sudoers.tmp") && mv "$sudoers.tmp" "$sudoers"
  fi
  as_user() { runuser -u "$user" -- "$@"; }
else
  user=$(id -un)
  sudo -n true 2>/dev/null || die "the suite needs passwordless sudo for $user (it runs sshd through sudo); or run this as root"
  as_user() { "$@"; }
fi
home=$(getent passwd "$user" | cut -d: -f6)

# A work dir the test user can read: the suite's run dirs, and what the agent runs from. The agent
# program is a copy: agent-ptrace.sh chowns the program it is given (to root and back to the test
# user), which must not happen to /usr/bin/ssh-agent or to the repository's files.
tmp=${TMPDIR:-/tmp}
[ "$(id -u)" -eq 0 ] && tmp=/tmp   # root's TMPDIR may be closed to the test user
work=$(mktemp -d "$tmp/keyhold-regress.XXXXXXXX")
chmod 755 "$work"
cleanup() {
  # Agents a failed test left running: every process whose command line names the work dir is ours.
  local pid
  for pid in $(pgrep -f -- "$work/" || true); do [ "$pid" != $$ ] && kill -TERM "$pid" 2>/dev/null || true; done
  if [ "$keep" ]; then
    echo "openssh-regress: kept $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP
if [ "$agent" = openssh ]; then
  mkdir "$work/openssh"
  cp /usr/bin/ssh-agent "$work/openssh/ssh-agent"
  agent_program=$work/openssh/ssh-agent
else
  # The built project, hard-linked where it can be (node_modules is large), else copied.
  mkdir -p "$work/keyhold/scripts"
  for part in bin dist node_modules package.json; do
    cp -al "$repo/$part" "$work/keyhold/" 2>/dev/null || { rm -rf "${work:?}/keyhold/$part" && cp -R "$repo/$part" "$work/keyhold/"; }
  done
  cp "$repo/scripts/ssh-agent-compat" "$work/keyhold/scripts/"
  agent_program=$work/keyhold/scripts/ssh-agent-compat
  as_user test -r "$work/keyhold/dist/cli/main.js" -a -r "$work/keyhold/package.json" ||
    die "$user cannot read the project's files in $work (are they readable by others?)"
fi
as_user env PATH="$(dirname "$node"):/usr/bin:/bin" node --version >/dev/null 2>&1 ||
  die "$user cannot run $node (install node where other users can run it)"
mkdir "$work/tmp" && chown "$user" "$work/tmp" && chmod 700 "$work/tmp"

run_test() {
  local t=$1 dir=$work/run-$1 status=0 began=$SECONDS left=$((deadline - SECONDS))
  mkdir "$dir" && chown "$user" "$dir"
  if [ "$left" -le 0 ]; then echo "124 0" >"$dir.status"; return; fi
  # A clean, small environment: the suite reads USER, HOME and SUDO, and the agent's temp dirs go
  # into the work dir (TMPDIR), where nothing outlives the run.
  as_user env -i PATH="$(dirname "$node"):/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
    HOME="$home" USER="$user" LOGNAME="$user" SHELL=/bin/sh LANG=C.UTF-8 TMPDIR="$work/tmp" \
    timeout -k 10 "$left" "$suite/run-tests" "$dir" t-exec LTESTS="$t" TEST_SSH_SSHAGENT="$agent_program" \
    >"$dir.log" 2>&1 || status=$?
  echo "$status $((SECONDS - began))" >"$dir.status"
}

# agent-timeout.sh sleeps 20 s: it runs beside the others, which run one after another.
started=$SECONDS deadline=$((SECONDS + budget))
pids=()
for t in "${tests[@]}"; do
  if [ "$t" = agent-timeout ]; then run_test "$t" & pids+=($!); fi
done
for t in "${tests[@]}"; do [ "$t" = agent-timeout ] || run_test "$t"; done
for pid in "${pids[@]}"; do wait "$pid" || true; done

# The suite's FAIL and FATAL lines, in order, each with the trace line it came after (`at: ...`).
# Each failure appends the test's log since its last trace line to failed-regress.log, then a
# blank line: the failure is the last line of such a paragraph, its trace line the first. (A
# FATAL line is followed by the same message as a FAIL line: that one is left out.)
suite_failures() {
  [ -f "$1" ] || return 0
  awk 'BEGIN { RS = "" }
    { n = split($0, line, "\n"); at = line[1] ~ /^trace: / ? line[1] : ""; sub(/^trace: /, "", at)
      last = line[n]; if (last !~ /^(FAIL|FATAL): /) next
      if (last == "FAIL: " fatal) { fatal = ""; next }
      fatal = last ~ /^FATAL: / ? substr(last, 8) : ""
      print last (at != "" ? " (at: " at ")" : "") }' "$1"
}

failed=0
for t in "${tests[@]}"; do
  dir=$work/run-$t
  read -r status seconds <"$dir.status"
  if [ "$status" -eq 0 ] && grep -qi '^skipped' "$dir.log"; then
    echo "SKIP $t (${seconds}s)"
    grep -i '^skipped' "$dir.log" | sed 's/^/    /'
    failed=1
  elif [ "$status" -eq 0 ]; then
    echo "ok $t (${seconds}s)"
  else
    echo "FAIL $t (${seconds}s)"
    [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && echo "    timed out (the run's budget is ${budget}s)"
    suite_failures "$dir/regress/failed-regress.log" | sed 's/^/    /'
    failed=1
  fi
done
echo "openssh-regress: $agent agent, ${#tests[@]} tests in $((SECONDS - started)) s (OpenSSH $(ssh -V 2>&1 | cut -d, -f1))" >&2
exit "$failed"
