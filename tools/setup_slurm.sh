#!/usr/bin/env bash
# Installs Debian's SLURM (slurm-wlm: slurmctld, slurmd, sbatch, ...) and
# munge when slurmctld is missing, for the real-SLURM tests
# (tests/test_study_slurm.py, tests/slurm_cluster.py). Idempotent: a second run
# only checks. Needs root or sudo; no daemon is started or enabled here (the
# tests start their own private cluster and stop it).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

if have slurmctld && have slurmd && have munged && have sbatch; then
  exit 0
fi
echo "== installing Debian's slurm-wlm and munge"
if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "setup_slurm.sh: slurmctld is missing and neither root nor sudo is" \
    "available; install slurm-wlm and munge, or skip the SLURM tests." >&2
  exit 1
fi
# policy-rc.d 101: the packages' postinst must not start system daemons
# (munged, slurmctld, slurmd) on this machine; the tests run their own.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod +x "$POLICY"
  ADDED_POLICY=1
fi
status=0
"${SUDO[@]}" apt-get update -qq || status=$?
if [ "$status" = 0 ]; then
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
    status=$?
fi
if [ "$ADDED_POLICY" = 1 ]; then
  "${SUDO[@]}" rm -f "$POLICY"
fi
exit "$status"
