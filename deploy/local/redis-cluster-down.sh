#!/usr/bin/env bash
# Stop the nodes redis-cluster-up.sh started and forget the cluster (its nodes.conf files):
# nothing is persisted, so the next redis-cluster-up.sh creates a fresh, empty one. Idempotent.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lock_file .redis-cluster.lock
shopt -s nullglob
for pidfile in "$REDIS_CLUSTER_DIR"/*/redis.pid; do
  stop "redis-cluster node $(basename "$(dirname "$pidfile")")" "$pidfile" redis-server 10
done
rm -rf "$REDIS_CLUSTER_DIR"
