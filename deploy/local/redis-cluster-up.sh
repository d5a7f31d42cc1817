#!/usr/bin/env bash
# Start a local Redis Cluster: 6 Debian redis-server instances on 127.0.0.1 (ports 7000-7005;
# REDIS_CLUSTER_PORT moves the first), joined by `redis-cli --cluster create` as 3 primaries
# with one replica each, unless it already answers with cluster_state:ok. A node that is down
# (a chaos test killed it) is started again from its nodes.conf and rejoins, as a replica when
# its replica took over. Idempotent; the cluster tests and `make chaos` call it on demand.
# Point popscore at it with POPSCORE_REDIS_URL=redis://127.0.0.1:7000 POPSCORE_REDIS_CLUSTER=true.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE="$(redis_cluster_base)"
NODES=$REDIS_CLUSTER_NODES
START_TIMEOUT_S=30
# Failover within ~2 s of a primary's death (the default 15 s would stall a chaos run).
NODE_TIMEOUT_MS=2000

ports() { redis_cluster_ports "$BASE"; }
node_dir() { echo "$REDIS_CLUSTER_DIR/$1"; }
ping() { [[ $(rcli -p "$1" ping 2>/dev/null) == PONG ]]; }
cluster_ok() {
  local info
  info="$(rcli -p "$BASE" cluster info 2>/dev/null)" || return 1
  grep -q '^cluster_state:ok' <<<"$info" && grep -q "^cluster_known_nodes:$NODES" <<<"$info"
}
all_up() { local p; for p in $(ports); do ping "$p" || return 1; done; }

start_node() {
  local port=$1 dir; dir="$(node_dir "$1")"
  mkdir -p "$dir"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout "$NODE_TIMEOUT_MS" \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" 9>&-  # 9: see lock_stack
  wait_for "$START_TIMEOUT_S" ping "$port" || { tail -n 20 "$dir/redis.log" >&2; die "redis-cluster: node $port did not start"; }
}

lock_file .redis-cluster.lock
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server
if all_up && cluster_ok; then echo "redis-cluster: reused 127.0.0.1:$BASE-$((BASE + NODES - 1))"; exit 0; fi

created=false
for port in $(ports); do
  ping "$port" && continue
  # Not a Redis that answers, yet the port is taken: fail now, not after the start deadline.
  tcp_open 127.0.0.1 "$port" && die "redis-cluster: 127.0.0.1:$port is taken by something that does not answer PING"
  [[ -s $(node_dir "$port")/nodes.conf ]] && created=true
  start_node "$port"
done
if ! $created && ! cluster_ok; then
  hosts=()
  for port in $(ports); do hosts+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >"$REDIS_CLUSTER_DIR/create.log" 2>&1 \
    || { cat "$REDIS_CLUSTER_DIR/create.log" >&2; die "redis-cluster: create failed"; }
fi
wait_for "$START_TIMEOUT_S" cluster_ok || {
  rcli -p "$BASE" cluster info >&2 || true
  die "redis-cluster: not ok within ${START_TIMEOUT_S}s"
}
echo "redis-cluster: up on 127.0.0.1:$BASE-$((BASE + NODES - 1)) (3 primaries, 3 replicas)"
