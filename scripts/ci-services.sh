#!/usr/bin/env bash
# scripts/ci-services.sh [start|stop|status] - services that tests need beyond Python.
#
# Today that is one thing: the throw-away SLURM cluster of tests/launch (two slurmd's on
# this host, 2 CPUs each, in $SFM_SLURM_TEST_DIR (default /tmp/sfm-slurm-test), ports
# 17817-17819), started with the vendored recipe scripts/slurm-local. `start` apt-installs
# slurm-wlm and munge when they are missing (about 10 s) and starts the cluster; the test
# fixture then reuses it (same settings) instead of starting its own, and leaves it running.
#
#   bash scripts/ci-services.sh            # = start; stdout: export SLURM_CONF=...
#   bash scripts/ci-services.sh stop       # stop the cluster (idempotent)
#   bash scripts/ci-services.sh status     # sinfo of the cluster, exit 1 if it is not up
#
# Not root (the recipe runs munged/slurmctld/slurmd as root): `start` says so and exits 0,
# and the launch tests skip with that reason -- unless SFM_REQUIRE_SLURM=1 (set it in CI),
# which makes both this script and the tests fail instead.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${SFM_SLURM_TEST_DIR:-/tmp/sfm-slurm-test}"
# keep in sync with tests/launch/conftest.py (CLUSTER_ENV)
export SLURM_LOCAL_NODES=2 SLURM_LOCAL_CPUS=2 SLURM_LOCAL_PORT_BASE=17817

case "${1:-start}" in
  start)
    if [ "$(id -u)" != 0 ]; then
      echo "ci-services: not root, cannot run the SLURM test cluster; tests/launch will skip" >&2
      [ "${SFM_REQUIRE_SLURM:-0}" = 1 ] && exit 1
      exit 0
    fi
    bash "$HERE/slurm-local/start-cluster.sh" "$DIR"
    ;;
  stop)
    bash "$HERE/slurm-local/stop-cluster.sh" "$DIR"
    ;;
  status)
    [ -f "$DIR/etc/slurm.conf" ] || { echo "ci-services: no cluster in $DIR" >&2; exit 1; }
    SLURM_CONF="$DIR/etc/slurm.conf" sinfo -N
    ;;
  *)
    echo "usage: bash scripts/ci-services.sh [start|stop|status]" >&2
    exit 2
    ;;
esac
