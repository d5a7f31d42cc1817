#!/usr/bin/env bash
# Stop the Kafka and Redis that stack-up.sh started (known by their pid files); services it
# merely reused are left alone. Idempotent. --purge also deletes Kafka's data, so the next
# stack-up formats a fresh, empty cluster.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=false
case "${1:-}" in
  "") ;;
  --purge) purge=true ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

# stop NAME PIDFILE EXPECTED_COMMAND SECONDS: SIGTERM (Kafka then shuts down cleanly, so
# the next start skips log recovery), SIGKILL only if it outlives the deadline.
stop() {
  local name=$1 pidfile=$2 expect=$3 grace=$4 pid
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"; echo "$name: not running (or not started by stack-up)"; return
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

lock_stack
stop kafka "$KAFKA_PID" java 30
# Redis was started with save "" and no AOF, so SIGTERM exits without writing anything.
stop redis "$REDIS_PID" redis-server 10
if $purge; then
  rm -rf "$KAFKA_DATA" "$KAFKA_CONF"
  echo "kafka: data purged (${KAFKA_DATA#"$ROOT"/})"
fi
