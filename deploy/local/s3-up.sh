#!/usr/bin/env bash
# Start a local S3-protocol server (moto in server mode, 127.0.0.1:9000; S3_LOCAL_PORT picks
# another port) for the s3:// tests and local runs, unless one already answers there, and wait
# until it serves requests. Idempotent: a second run finds it answering and returns at once.
# Point boto3 at it with AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 and any AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY (moto accepts every signature). Its buckets live in memory only.
# Exit 3: moto[server] is missing and pip could not install it (the tests skip on that).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

S3_START_TIMEOUT_S=60
PORT="${S3_LOCAL_PORT:-9000}"
if ! [[ $PORT =~ ^[0-9]{1,5}$ ]] || ((PORT < 1 || PORT > 65535)); then
  die "s3: S3_LOCAL_PORT=$PORT is not a port"
fi
EXIT_NO_MOTO=3
# wait_our_s3's readiness check: 0 ready, 1 not yet, PROCESS_GONE when our server is gone.
PROCESS_GONE=3

# True when an S3-protocol server answers on 127.0.0.1:$1: GET / is ListBuckets, which moto
# answers with the list and a store that wants a signature with an S3 <Error> document.
s3_answers() {
  # shellcheck disable=SC2016  # $0 is for the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
    printf "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3 && cat <&3' "$1" 2>/dev/null \
    | grep -qs -e '<ListAllMyBucketsResult' -e '<Error>'
}

moto_server_bin() {
  local bin
  for bin in "$ROOT/.venv/bin/moto_server" "$(command -v moto_server || true)"; do
    if [[ -n $bin && -x $bin ]]; then echo "$bin"; return 0; fi
  done
  return 1
}

# moto_server, installed into the project's venv when missing: the version range is the one
# pyproject.toml's dev extra names, so there is one place to change it.
ensure_moto() {
  moto_server_bin && return
  local spec pip="$ROOT/.venv/bin/pip" log="$STACK/logs/moto-pip.log"
  spec="$(sed -n 's/^ *"\(moto\[server\][^"]*\)".*/\1/p' "$ROOT/pyproject.toml")"
  mkdir -p "$(dirname "$log")"
  if [[ -x $pip ]] && "$pip" install -q "${spec:-moto[server]}" >"$log" 2>&1 && moto_server_bin; then
    return
  fi
  echo "s3: moto[server] is not installed and could not be installed (${log#"$ROOT"/})" >&2
  exit "$EXIT_NO_MOTO"
}

# Ours is ready once it answers; it failed if the process is gone. Every "not yet" is 1 (a
# failed pipe or grep may say 2 or 124): only a gone process is PROCESS_GONE.
our_s3_ready() {
  pid_alive "$S3_PID" moto_server || return "$PROCESS_GONE"
  s3_answers "$PORT" || return 1
}

wait_our_s3() {
  local deadline=$((SECONDS + S3_START_TIMEOUT_S)) rc
  while true; do
    rc=0; our_s3_ready || rc=$?
    ((rc == 0)) && return 0
    if ((rc == PROCESS_GONE)) || ((SECONDS >= deadline)); then
      local why="${S3_START_TIMEOUT_S}s passed"
      ((rc == PROCESS_GONE)) && why="the process exited"
      echo "s3: not ready ($why); last log lines:" >&2
      tail -n 40 "$S3_LOG" >&2 || true
      if pid_alive "$S3_PID" moto_server; then kill -TERM "$(cat "$S3_PID")"; fi
      exit 1
    fi
    sleep 0.2
  done
}

s3_start() {
  local bin=$1
  mkdir -p "$S3_DIR" "$(dirname "$S3_LOG")"
  rm -f "$S3_PID"                              # a stale one would pass the wait below
  echo "$PORT" >"$S3_PORT_FILE"
  # setsid: its own session, so a Ctrl-C in the terminal that ran the tests doesn't reach it.
  # The inner bash writes its own pid, then exec's moto, so the pid file is moto's.
  # shellcheck disable=SC2016  # $$ and $@ are for the inner bash
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$S3_PID" \
    "$bin" -H 127.0.0.1 -p "$PORT" </dev/null >"$S3_LOG" 2>&1 9>&- &
  wait_for 5 test -s "$S3_PID" || die "s3: no pid file written"
  # The pid is the inner bash's until it exec's moto; the readiness wait checks for moto.
  wait_for 5 pid_alive "$S3_PID" moto_server || true
}

lock_s3
if pid_alive "$S3_PID" moto_server; then       # ours, possibly still starting
  ours="$(cat "$S3_PORT_FILE" 2>/dev/null || echo "?")"
  [[ $ours == "$PORT" ]] || die "s3: ours runs on port $ours, not $PORT; run s3-down.sh first"
  wait_our_s3
  echo "s3: reused 127.0.0.1:$PORT (pid $(cat "$S3_PID"))"
  exit 0
fi
if s3_answers "$PORT"; then echo "s3: reused 127.0.0.1:$PORT (not started by us)"; exit 0; fi
tcp_open 127.0.0.1 "$PORT" && die "s3: 127.0.0.1:$PORT is taken by something that does not speak S3"

moto="$(ensure_moto)"
t0=$EPOCHREALTIME
s3_start "$moto"
wait_our_s3
echo "s3: started 127.0.0.1:$PORT in $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}")s" \
  "(pid $(cat "$S3_PID"), log ${S3_LOG#"$ROOT"/})"
