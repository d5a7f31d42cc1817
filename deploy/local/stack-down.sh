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

lock_stack
stop kafka "$KAFKA_PID" java 30
# Redis was started with save "" and no AOF, so SIGTERM exits without writing anything.
stop redis "$REDIS_PID" redis-server 10
if $purge; then
  rm -rf "$KAFKA_DATA" "$KAFKA_CONF"
  echo "kafka: data purged (${KAFKA_DATA#"$ROOT"/})"
fi
