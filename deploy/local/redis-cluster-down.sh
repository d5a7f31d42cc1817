#!/usr/bin/env bash
# Stop the nodes redis-cluster-up.sh started on REDIS_CLUSTER_PORT's six ports (default
# 7000-7005) and forget that cluster (its nodes' folders and nodes.conf files): nothing is
# persisted, so the next redis-cluster-up.sh creates a fresh, empty one. A cluster on other
# ports is left alone. Idempotent: a second run says it is not running.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE="$(redis_cluster_base)"
lock_file .redis-cluster.lock
found=false
for port in $(redis_cluster_ports "$BASE"); do
  dir="$REDIS_CLUSTER_DIR/$port"
  [[ -d $dir ]] || continue
  found=true
  stop "redis-cluster node $port" "$dir/redis.pid" redis-server 10
  rm -rf "$dir"
done
$found || echo "redis-cluster: not running on 127.0.0.1:$BASE-$((BASE + REDIS_CLUSTER_NODES - 1)) (or not started by these scripts)"
# The last cluster gone: its create.log too.
if [[ -d $REDIS_CLUSTER_DIR ]] && ! compgen -G "$REDIS_CLUSTER_DIR/[0-9]*" >/dev/null; then
  rm -rf "$REDIS_CLUSTER_DIR"
fi
