#!/usr/bin/env bash
# Start a local single-node Kafka (KRaft, 127.0.0.1:9092) and Redis (127.0.0.1:6379),
# unless reachable ones already exist, and wait until both serve requests.
# Idempotent: a second run finds both answering and returns in well under a second.
# POPSCORE_KAFKA_BOOTSTRAP / POPSCORE_REDIS_URL point it at existing services instead.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_START_TIMEOUT_S=90    # without progress: the broker logged nothing new for this long
KAFKA_START_CAP_S=270       # since this script started (bash's SECONDS): under the tests' 300 s
REDIS_START_TIMEOUT_S=30
KAFKA_MIN_JAVA=17           # Kafka 4 runs on Java 17 or newer
# wait_our_kafka's readiness check: 0 ready, 1 not yet, PROCESS_GONE when our broker is gone.
PROCESS_GONE=3

# --- helpers ----------------------------------------------------------------------

# host:port of the first entry of a bootstrap list ("PLAINTEXT://h:9092,h2:9092").
first_hostport() { local hp="${1%%,*}"; echo "${hp#*://}"; }

# host:port of a redis:// or rediss:// URL, without any user:password@ or /db.
redis_hostport() { local hp="${1#*://}"; hp="${hp##*@}"; hp="${hp%%/*}"; [[ $hp == *:* ]] || hp="$hp:6379"; echo "$hp"; }

# An override that names the default local address may be started by us; any other
# address is someone else's service and must already be up.
is_local_default() { [[ $1 == "127.0.0.1:$2" || $1 == "localhost:$2" ]]; }

redis_ping() { [[ $(rcli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]]; }

# A Python that has confluent_kafka (the project's .venv, else python3), if any: it lets the
# readiness check ask the broker for metadata instead of trusting an open port.
probe_python() {
  local py
  for py in "$ROOT/.venv/bin/python" python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import confluent_kafka' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

# True when the broker at $1 (host:port) answers a metadata request naming a broker.
# Without confluent_kafka an open port is the best we can check here.
kafka_answers() {
  tcp_open "${1%:*}" "${1##*:}" || return 1
  [[ -n ${PROBE_PY:-} ]] || return 0
  "$PROBE_PY" - "$1" 2>/dev/null <<'PY'
import sys
from confluent_kafka.admin import AdminClient
md = AdminClient({"bootstrap.servers": sys.argv[1]}).list_topics(timeout=3)
sys.exit(0 if md.brokers else 1)
PY
}

# Our own broker is ready once it logged the end of start-up (KafkaRaftServer prints this
# after the broker is unfenced) and answers; it failed if the process is gone. Every "not yet"
# is 1 (grep says 2 for a missing log): only a gone process is PROCESS_GONE.
our_kafka_ready() {
  pid_alive "$KAFKA_PID" java || return "$PROCESS_GONE"
  grep -qs 'Kafka Server started' "$KAFKA_LOG" || return 1
  kafka_answers 127.0.0.1:9092 || return 1
}

# A broker that loads many partitions (a dev box after weeks of test topics) logs all along,
# so the deadline moves while its log grows; one that hangs stops logging and fails.
wait_our_kafka() {
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT_S)) cap=$KAFKA_START_CAP_S
  local rc size seen=-1
  while true; do
    rc=0; our_kafka_ready || rc=$?
    ((rc == 0)) && return 0
    size="$(stat -c %s "$KAFKA_LOG" 2>/dev/null || echo 0)"
    if ((size != seen)); then seen=$size; deadline=$((SECONDS + KAFKA_START_TIMEOUT_S)); fi
    if ((rc == PROCESS_GONE)); then kafka_not_ready "the process exited"; exit 1; fi
    if ((SECONDS >= deadline)); then kafka_not_ready "${KAFKA_START_TIMEOUT_S}s without progress"; exit 1; fi
    if ((SECONDS >= cap)); then kafka_not_ready "${KAFKA_START_CAP_S}s since start-up began"; exit 1; fi
    sleep 0.2
  done
}

kafka_not_ready() {
  # Don't leave a half-started broker behind for the next run to wait on again.
  if pid_alive "$KAFKA_PID" java; then kill -TERM "$(cat "$KAFKA_PID")" || true; fi
  echo "kafka: not ready ($1); last log lines:" >&2
  tail -n 40 "$KAFKA_LOG" >&2 || true
  local dirs
  dirs="$( (find "$KAFKA_DATA" -mindepth 1 -maxdepth 1 -type d 2>/dev/null || true) | wc -l)"
  if ((dirs > 1000)); then
    echo "kafka: $dirs partition logs on disk to load; \`make clean\` starts afresh" >&2
  fi
}

# --- Redis ------------------------------------------------------------------------

redis_up() {
  if [[ -n ${POPSCORE_REDIS_URL:-} ]]; then
    local hp; hp="$(redis_hostport "$POPSCORE_REDIS_URL")"
    if tcp_open "${hp%:*}" "${hp##*:}"; then echo "redis: using $hp (POPSCORE_REDIS_URL)"; return; fi
    is_local_default "$hp" 6379 || die "redis: POPSCORE_REDIS_URL points at $hp, which does not answer"
  fi
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server                 # Debian's package brings redis-cli too
  fi
  if redis_ping; then echo "redis: reused 127.0.0.1:6379"; return; fi
  # Something that is not Redis (or a Redis that hangs) holds the port: say so now, not after
  # waiting out the start-up deadline on a server that cannot bind it.
  tcp_open 127.0.0.1 6379 && die "redis: 127.0.0.1:6379 is taken by something that does not answer PING"

  mkdir -p "$REDIS_DIR"
  # A cache for tests and the demo: nothing is worth persisting, and no dump.rdb appears.
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
    --dir "$REDIS_DIR" --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" 9>&-  # 9: see lock_stack
  wait_for "$REDIS_START_TIMEOUT_S" redis_ping || {
    echo "redis: no PONG within ${REDIS_START_TIMEOUT_S}s; last log lines:" >&2
    tail -n 40 "$REDIS_LOG" >&2 || true
    exit 1
  }
  echo "redis: started 127.0.0.1:6379 (pid $(cat "$REDIS_PID"), log ${REDIS_LOG#"$ROOT"/})"
}

# --- Kafka ------------------------------------------------------------------------

# Fetch the broker jars from Maven Central once; the marker names a hash of the pom, so
# editing the pom (e.g. a version bump) refreshes them.
kafka_jars() {
  local pom="$HERE/kafka/pom.xml" marker
  marker="$KAFKA_LIBS/.complete-$(sha256sum "$pom" | cut -c1-16)"
  [[ -f $marker ]] && return
  command -v mvn >/dev/null || apt_install maven
  echo "kafka: fetching jars with Maven (first run only)..."
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$STACK/logs"
  mvn -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >"$STACK/logs/maven.log" 2>&1 \
    || { tail -n 40 "$STACK/logs/maven.log" >&2; die "kafka: Maven could not fetch the jars"; }
  touch "$marker"
}

# Short-lived tool JVMs: C1 only and the serial GC start ~1 s faster; WARN keeps their
# stdout to what the tool prints.
kafka_tool() {
  java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Dkafka.root.log.level=WARN \
    -Dlog4j2.configurationFile="$HERE/kafka/log4j2.xml" -cp "$KAFKA_LIBS/*" "$@"
}

# KRaft refuses to start on an unformatted log dir; formatting writes meta.properties with
# a fresh cluster id. Done once: re-formatting would orphan the existing data.
kafka_format() {
  sed "s|@DATA_DIR@|$KAFKA_DATA|" "$HERE/kafka/server.properties" >"$KAFKA_CONF"
  [[ -f $KAFKA_DATA/meta.properties ]] && return
  local cluster_id
  cluster_id="$(kafka_tool kafka.tools.StorageTool random-uuid | tail -n 1)"
  kafka_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_CONF" >/dev/null
}

kafka_start() {
  mkdir -p "$(dirname "$KAFKA_LOG")"
  [[ -f $KAFKA_LOG ]] && mv -f "$KAFKA_LOG" "$KAFKA_LOG.1"  # readiness greps this start's log only
  rm -f "$KAFKA_PID"                                         # a stale one would pass the wait below
  # setsid: its own session, so a Ctrl-C in the terminal that ran `make` doesn't reach it.
  # The inner bash writes its own pid, then exec's the JVM, so the pid file is the JVM's.
  # shellcheck disable=SC2016  # $$ and $@ are for the inner bash
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KAFKA_PID" \
    java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$HERE/kafka/log4j2.xml" -cp "$KAFKA_LIBS/*" \
    kafka.Kafka "$KAFKA_CONF" </dev/null >"$KAFKA_LOG" 2>&1 9>&- &
  wait_for 5 test -s "$KAFKA_PID" || die "kafka: no pid file written"
  # The pid is the inner bash's until it exec's the JVM; the readiness wait checks for java.
  wait_for 5 pid_alive "$KAFKA_PID" java || true
}

# The major version of `java` on the PATH ("1.8.0_412" is 8, "17.0.11" is 17).
java_major() {
  local version
  version="$(java -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n 1)"
  [[ $version == 1.* ]] && version="${version#1.}"
  echo "${version%%[.+-]*}"
}

java_is_recent_enough() {
  local major; major="$(java_major)"
  [[ $major =~ ^[0-9]+$ ]] && ((major >= KAFKA_MIN_JAVA)) && return
  die "kafka: needs Java $KAFKA_MIN_JAVA or newer, found ${major:-an unreadable version} ($(command -v java));" \
    "install one (e.g. apt-get install openjdk-17-jre-headless) and put it first on the PATH"
}

kafka_up() {
  if [[ -n ${POPSCORE_KAFKA_BOOTSTRAP:-} ]]; then
    local hp; hp="$(first_hostport "$POPSCORE_KAFKA_BOOTSTRAP")"
    # Only TCP here: someone else's cluster may need SASL/TLS that the probe doesn't speak.
    if tcp_open "${hp%:*}" "${hp##*:}"; then echo "kafka: using $hp (POPSCORE_KAFKA_BOOTSTRAP)"; return; fi
    is_local_default "$hp" 9092 || die "kafka: POPSCORE_KAFKA_BOOTSTRAP points at $hp, which does not answer"
  fi
  if pid_alive "$KAFKA_PID" java; then       # ours, possibly still starting
    wait_our_kafka; echo "kafka: reused 127.0.0.1:9092 (pid $(cat "$KAFKA_PID"))"; return
  fi
  if kafka_answers 127.0.0.1:9092; then echo "kafka: reused 127.0.0.1:9092 (not started by us)"; return; fi
  tcp_open 127.0.0.1 9092 && die "kafka: 127.0.0.1:9092 is taken by something that is not a Kafka broker"

  command -v java >/dev/null || apt_install default-jre-headless
  java_is_recent_enough
  kafka_jars
  kafka_format
  local t0=$EPOCHREALTIME
  kafka_start
  wait_our_kafka
  echo "kafka: started 127.0.0.1:9092 in $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}")s" \
    "(pid $(cat "$KAFKA_PID"), log ${KAFKA_LOG#"$ROOT"/})"
}

lock_stack
PROBE_PY="$(probe_python || true)"
redis_up
kafka_up
