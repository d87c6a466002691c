#!/usr/bin/env bash
# A private Slurm cluster on this machine for testing jobs/: two emulated nodes (n1, n2) on
# loopback, each declaring 8 CPUs and 2 (fake) GPUs, one partition `debug`. Runs as root, needs no
# systemd and touches nothing outside its work folder (no /etc, /run or /var changes).
#
#   cluster.sh install       install slurmctld slurmd slurm-client munge from Debian's packages
#                            when missing (apt-get update + install; root)
#   cluster.sh serve DIR     start munged, slurmctld and two slurmds with everything under DIR,
#                            print `READY DIR/env.sh` when both nodes are idle, then stay in the
#                            foreground until stdin reaches EOF or SIGTERM/SIGINT/SIGHUP arrives,
#                            and tear everything down (jobs cancelled, daemons killed by pid).
#
# `source DIR/env.sh` points sbatch/squeue/scontrol at the cluster. Ports: CTLD_PORT,
# SLURMD_PORT1, SLURMD_PORT2 (defaults 26817..26819). The pytest fixture (tests/slurm/conftest.py)
# runs `serve` under `unshare -fp --mount-proc --kill-child`, so whatever the daemons and jobs
# started dies with it even if the teardown below never runs.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

install() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && { echo "slurm and munge already installed"; return 0; }
  if [ "$(id -u)" != 0 ]; then
    echo "cluster.sh: missing ${missing[*]} and not root: cannot install" >&2
    return 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
  "${apt[@]}" update >/dev/null
  # policy-rc.d (exit 101) in containers keeps postinst from starting the system services
  "${apt[@]}" install --no-install-recommends "${PACKAGES[@]}" >/dev/null
  echo "installed ${PACKAGES[*]}"
}

# Globals, because the EXIT trap runs after serve()'s locals are gone.
W="" S="" M="" MSOCKDIR="" PIDS=() TORN_DOWN=0

teardown() {
  [ "$TORN_DOWN" = 1 ] && return
  TORN_DOWN=1
  set +e
  export SLURM_CONF="$S/slurm.conf"
  if [ -f "$SLURM_CONF" ] && [ -n "$(squeue -h 2>/dev/null)" ]; then
    scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null   # a private cluster:
    scancel --user="$(id -un)" 2>/dev/null                        # every job is ours
    for _ in $(seq 20); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
  fi
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null
  done
  [ -f "$M/munged.pid" ] && kill "$(cat "$M/munged.pid")" 2>/dev/null
  [ -n "$MSOCKDIR" ] && rm -rf "$MSOCKDIR"
  echo "cluster.sh: torn down" >&2
}

serve() {
  W=${1:?usage: cluster.sh serve DIR}
  W=$(mkdir -p "$W" && cd "$W" && pwd)
  local CTLD_PORT=${CTLD_PORT:-26817} P1=${SLURMD_PORT1:-26818} P2=${SLURMD_PORT2:-26819}
  S="$W/slurm" M="$W/munge"
  mkdir -p "$S"/{state,spool,log,tmp/n1,tmp/n2} "$M" "$W/tmp" "$W/dev/n1" "$W/dev/n2"
  export PATH="/usr/sbin:/sbin:$PATH"
  trap teardown EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  trap 'exit 129' HUP

  # munge as root with a private key and socket. munged wants every folder above its socket
  # to be o+x, which a test's private temporary folder is not: the socket gets its own.
  dd if=/dev/urandom of="$M/munge.key" bs=1024 count=1 status=none
  chmod 400 "$M/munge.key"
  MSOCKDIR=$(mktemp -d /tmp/easgd-munge.XXXXXX)
  chmod 755 "$MSOCKDIR"
  local SOCK="$MSOCKDIR/munge.sock"
  munged -S "$SOCK" --key-file="$M/munge.key" --pid-file="$M/munged.pid" \
    --log-file="$M/munged.log" --seed-file="$M/munged.seed"   # forks; pid in the pid file
  munge -S "$SOCK" -n | unmunge -S "$SOCK" | grep -q 'STATUS: *Success'

  # Fake GPUs: slurmd wants character devices named like the real ones and numbers the GPUs by
  # the names (it sets CUDA_VISIBLE_DEVICES from them); nothing opens them (no cgroups here).
  local n
  for n in n1 n2; do
    ln -sfn /dev/null "$W/dev/$n/nvidia0"
    ln -sfn /dev/zero "$W/dev/$n/nvidia1"
  done

  # Job ids start at a number of their own in each cluster session: MPICH names its shared-memory
  # segment after the step ("<job>.<step>"), and a segment left in /dev/shm by a killed step of
  # an earlier session (same ids, other rank count) would fail a later step's MPI_Init.
  local first_job=$(( (RANDOM * 32768 + RANDOM) % 50000000 + 1000 ))
  # cred_expire (default 120 s) is also how long Slurm holds a requeued job before it may run
  # again; the preemptible template's test waits that long once.
  cat >"$S/slurm.conf" <<EOF
ClusterName=easgdci
FirstJobId=$first_job
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$P1 CPUs=8 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$P2 CPUs=8 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat >"$S/gres.conf" <<EOF
AutoDetect=off
NodeName=n1 Name=gpu File=$W/dev/n1/nvidia[0-1]
NodeName=n2 Name=gpu File=$W/dev/n2/nvidia[0-1]
EOF
  for n in n1 n2; do
    cp "$S/slurm.conf" "$S/slurm.$n.conf"
    echo "TmpFS=$S/tmp/$n" >>"$S/slurm.$n.conf"
  done
  export SLURM_CONF="$S/slurm.conf"

  slurmctld -D -f "$S/slurm.conf" >"$S/log/slurmctld.out" 2>&1 &
  PIDS+=($!)
  for n in n1 n2; do
    slurmd -D -N "$n" -f "$S/slurm.$n.conf" >"$S/log/slurmd.$n.out" 2>&1 &
    PIDS+=($!)
  done
  local ok=0
  for _ in $(seq 80); do
    if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cx idle)" = 2 ]; then ok=1; break; fi
    sleep 0.25
  done
  if [ "$ok" != 1 ]; then
    echo "cluster.sh: nodes not idle: $(sinfo -h -N -o '%N %T' 2>&1 | tr '\n' ' ')" >&2
    tail -n 20 "$S"/log/*.out "$S"/log/*.log >&2 || true
    exit 1
  fi

  # Jobs inherit the submitting environment: keep MPI on loopback and temporary files here.
  cat >"$W/env.sh" <<EOF
export SLURM_CONF=$S/slurm.conf
export PATH=/usr/sbin:/sbin:\$PATH
export TMPDIR=$W/tmp
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
EOF
  echo "READY $W/env.sh"
  # Stay up until our stdin closes (the test process ended, however it ended) or a signal.
  while read -r _line; do :; done
  exit 0
}

case "${1:-}" in
  install) install ;;
  serve) shift; serve "$@" ;;
  *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
