#!/usr/bin/env bash
# Tools the deploy/ tests need beyond the venv: promtool and prometheus (Debian's `prometheus`
# package) for tests/unit/test_prometheus_rules.py, test_grafana_dashboard.py and
# tests/integration/test_observability.py. Idempotent: does nothing when both are installed.
# The tests start their own Prometheus; the package's system service must not run, so it is
# kept from starting (policy-rc.d during the install) and disabled where systemd exists.
set -euo pipefail

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  echo "prometheus: present ($(promtool --version 2>&1 | head -1))"
  exit 0
fi

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

# invoke-rc.d asks /usr/sbin/policy-rc.d whether a package may start its service; 101 = no.
POLICY=/usr/sbin/policy-rc.d
created_policy=false
if [[ ! -e $POLICY ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  created_policy=true
fi
cleanup() { if $created_policy; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# Where systemd runs, keep the packaged service off across reboots too (no-op without it).
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
echo "prometheus: installed ($(promtool --version 2>&1 | head -1)); system service not started"
