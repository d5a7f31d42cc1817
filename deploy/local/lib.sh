# shellcheck shell=bash disable=SC2034  # the paths are used by the scripts that source this
# Shared by stack-up.sh, stack-down.sh, s3-up.sh and s3-down.sh (sourced, not run).
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
REDIS_CLUSTER_DIR="$STACK/redis-cluster"   # one folder per node: nodes.conf, pid, log
S3_DIR="$STACK/s3"                       # moto in server mode: its state is in memory only
S3_PID="$S3_DIR/moto.pid"
S3_PORT_FILE="$S3_DIR/moto.port"         # the port ours listens on
S3_LOG="$STACK/logs/s3.log"

die() { echo "$*" >&2; exit 1; }

apt_install() {
  # Try the cached package lists first: `apt-get update` is slow and usually unnecessary.
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; } \
    || die "could not apt-get install $*"
}

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

# Only one stack-up/stack-down at a time (parallel test sessions call them too); s3-up and
# s3-down take a lock of their own, so they never wait behind a Kafka start.
# The lock lives on fd 9: daemons started under it must close fd 9, or they would hold
# the lock for as long as they run.
lock_file() {
  mkdir -p "$STACK"
  exec 9>"$STACK/$1"
  flock -w 180 9 || die "another start or stop has held $STACK/$1 for 3 minutes"
}
lock_stack() { lock_file .lock; }
lock_s3() { lock_file .s3.lock; }

# stop NAME PIDFILE EXPECTED_COMMAND SECONDS: stop what our pid file names: SIGTERM (Kafka
# then shuts down cleanly, so the next start skips log recovery), SIGKILL only if it outlives
# the deadline. Services we merely reused have no pid file and are left alone.
stop() {
  local name=$1 pidfile=$2 expect=$3 grace=$4 pid
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"; echo "$name: not running (or not started by these scripts)"; return
  fi
  pid="$(cat "$pidfile")"
  # After a reboot the pid may belong to an unrelated process: never signal that.
  if [[ $(ps -o comm= -p "$pid") != "$expect"* ]]; then
    rm -f "$pidfile"; echo "$name: pid $pid is not $expect; stale pid file removed"; return
  fi
  kill -TERM "$pid"
  if ! wait_for "$grace" bash -c "! kill -0 $pid 2>/dev/null"; then
    echo "$name: still running after ${grace}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_for 5 bash -c "! kill -0 $pid 2>/dev/null" || true
  fi
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}
