# shellcheck shell=bash disable=SC2034  # the paths are used by the scripts that source this
# Shared by stack-up.sh and stack-down.sh (sourced, not run).
# Every path is derived from this file's location, so the scripts work from any cwd.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STACK="$ROOT/.stack"                     # all runtime state; git-ignored

KAFKA_DIR="$STACK/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_CONF="$KAFKA_DIR/server.properties"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$STACK/logs/kafka.log"
REDIS_DIR="$STACK/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

die() { echo "$*" >&2; exit 1; }

# True when something accepts TCP connections on host:port (bash's /dev/tcp, no nc needed).
tcp_open() { timeout 2 bash -c ">/dev/tcp/$1/$2" 2>/dev/null; }

# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds; fail after the deadline.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# True when the pid file names a live process (a stale file after a crash or reboot is not).
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Only one stack-up/stack-down at a time (parallel test sessions call them too).
# The lock lives on fd 9: daemons started under it must close fd 9, or they would hold
# the lock for as long as they run.
lock_stack() {
  mkdir -p "$STACK"
  exec 9>"$STACK/.lock"
  flock -w 180 9 || die "another stack-up/stack-down has held $STACK/.lock for 3 minutes"
}
