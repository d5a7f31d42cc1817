# shellcheck shell=bash disable=SC2034  # the paths are used by the scripts that source this
# Shared by the scripts in this folder (sourced, not run).
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
REDIS_CLUSTER_NODES=6
S3_DIR="$STACK/s3"                       # moto in server mode: its state is in memory only
S3_PID="$S3_DIR/moto.pid"
S3_PORT_FILE="$S3_DIR/moto.port"         # the port ours listens on
S3_LOG="$STACK/logs/s3.log"

die() { echo "$*" >&2; exit 1; }

apt_install() {
  # Not root: through sudo, when there is one (as install-tools.sh does).
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || die "cannot apt-get install $*: not root, and no sudo"
    sudo=(sudo DEBIAN_FRONTEND=noninteractive)
  fi
  # Try the cached package lists first: `apt-get update` is slow and usually unnecessary.
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q "$@" >/dev/null; } \
    || die "could not apt-get install $*"
}

# The local Redis Cluster's first port (REDIS_CLUSTER_PORT, default 7000) and all its ports.
redis_cluster_base() {
  local base="${REDIS_CLUSTER_PORT:-7000}"
  [[ $base =~ ^[0-9]{1,5}$ ]] && ((base > 0 && base < 65530)) \
    || die "redis-cluster: REDIS_CLUSTER_PORT=$base is not a port"
  echo "$base"
}
redis_cluster_ports() { seq "$1" $(($1 + REDIS_CLUSTER_NODES - 1)); }

# redis-cli that gives up after 3 s: a hung Redis (or something else on its port) must not
# hang the scripts, some of which hold a lock meanwhile.
rcli() { timeout 3 redis-cli "$@"; }

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

# pid_alive PIDFILE COMMAND: true when the pid file names a live process running COMMAND.
# A stale file after a crash is not; nor, after a reboot, a pid now reused by an unrelated
# process: the scripts signal only what this says is alive, so they never signal that.
pid_alive() {
  local pid comm
  [[ -s $1 ]] || return 1
  pid="$(cat "$1")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm="$(ps -o comm= -p "$pid" 2>/dev/null)" || return 1
  [[ $comm == "$2"* ]]
}

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
  if ! pid_alive "$pidfile" "$expect"; then
    if [[ -s $pidfile ]]; then
      echo "$name: pid $(cat "$pidfile") is not a running $expect; stale pid file removed"
    else
      echo "$name: not running (or not started by these scripts)"
    fi
    rm -f "$pidfile"; return
  fi
  pid="$(cat "$pidfile")"
  kill -TERM "$pid"
  if ! wait_for "$grace" bash -c "! kill -0 $pid 2>/dev/null"; then
    echo "$name: still running after ${grace}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_for 5 bash -c "! kill -0 $pid 2>/dev/null" || true
  fi
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}
