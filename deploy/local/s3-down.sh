#!/usr/bin/env bash
# Stop the local S3 server that s3-up.sh started (known by its pid file); one it merely
# reused is left alone. Idempotent. Its buckets were in memory: nothing is left behind.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lock_s3
stop s3 "$S3_PID" moto_server 10
rm -f "$S3_PORT_FILE"
