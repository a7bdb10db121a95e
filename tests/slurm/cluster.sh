#!/usr/bin/env bash
# A three-node Slurm cluster on this one host, for the tests and CI.
#
#   tests/slurm/cluster.sh start    install what is missing, start, wait until idle
#   tests/slurm/cluster.sh stop     cancel every job, stop every daemon, remove the network
#   tests/slurm/cluster.sh status   say whether it runs (exit 0) or not (exit 1)
#   tests/slurm/cluster.sh env      print the export line clients need (SLURM_CONF)
#
# Layout (all under $KS_SLURM_DIR, default /run/kernel-supervisor-slurm):
#   a private bridge ks-br0 (10.233.77.254/24 on this host, nothing routed anywhere
#   else) and one network namespace per daemon: ks-head (slurmctld, 10.233.77.1) and
#   ks-node1..3 (slurmd -N nodeN, 10.233.77.11..13). A kernel started on node2 binds
#   10.233.77.12 inside ks-node2, so "reachable at that node's address" is real. Our
#   own munged (its own key and socket) authenticates all of them; slurm.conf lives in
#   the directory and clients find it through SLURM_CONF. Needs root (namespaces).
#
# Waits poll sinfo/scontrol and pid files under a deadline: the daemons offer no event.
set -euo pipefail

DIR=${KS_SLURM_DIR:-/run/kernel-supervisor-slurm}
CONF=$DIR/slurm.conf
NET=10.233.77
BRIDGE=ks-br0
HOST_ADDR=$NET.254
HEAD_ADDR=$NET.1
NODES=(node1 node2 node3)
NODE_CPUS=${KS_SLURM_CPUS:-8}
NODE_MEM=${KS_SLURM_MEM:-8000}
export SLURM_CONF=$CONF

say() { echo "cluster.sh: $*" >&2; }

node_addr() { echo "$NET.$((10 + ${1#node}))"; }

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "timed out waiting for $what"
      return 1
    fi
    sleep 0.1  # an external daemon gives no event to wait on
  done
}

install() {
  local missing=()
  for pkg in slurmctld slurmd slurm-client munge; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  for tool in ip nsenter; do
    command -v "$tool" >/dev/null || missing+=(iproute2 util-linux)
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

write_config() {
  mkdir -p "$DIR"/{munge,state,run,log,spool}
  chmod 711 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
  fi
  : >"$DIR/plugstack.conf"
  {
    cat <<EOF
# Written by tests/slurm/cluster.sh: a test cluster on one host, in network namespaces.
ClusterName=kstest
SlurmctldHost=$(hostname -s)($HEAD_ADDR)
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=200
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=2
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=30
SlurmctldTimeout=30
EOF
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node" \
        "CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

netns_up() {  # netns_up NAME ADDRESS
  local ns=$1 addr=$2 veth=ks-v-${1#ks-}
  ip netns add "$ns"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
}

network_up() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  netns_up ks-head "$HEAD_ADDR"
  for node in "${NODES[@]}"; do
    netns_up "ks-$node" "$(node_addr "$node")"
  done
}

in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

nodes_idle() {
  local idle
  idle=$(sinfo -h -N -t idle -o %N | sort -u | wc -l)
  [ "$idle" -eq "${#NODES[@]}" ]
}

start() {
  if status >/dev/null 2>&1; then
    say "already running"
    return 0
  fi
  stop >/dev/null 2>&1 || true
  install
  write_config
  network_up
  munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" --force
  wait_until 10 "munged" test -S "$DIR/munge/munge.socket.2"
  in_ns ks-head slurmctld -i -f "$CONF"
  wait_until 20 "slurmctld" scontrol ping
  for node in "${NODES[@]}"; do
    in_ns "ks-$node" slurmd -N "$node" -f "$CONF"
  done
  if ! wait_until 60 "3 idle nodes" nodes_idle; then
    sinfo -N >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    return 1
  fi
  say "up: ${NODES[*]} idle; export SLURM_CONF=$CONF"
}

pid_of() { [ -s "$1" ] && cat "$1"; }

stop_daemon() {  # stop_daemon PIDFILE
  local pid
  pid=$(pid_of "$1") || return 0
  kill "$pid" 2>/dev/null || return 0
  wait_until 15 "pid $pid to exit" bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
}

all_jobs() { squeue -h -o %i 2>/dev/null | sort -u; }

no_jobs() { [ -z "$(all_jobs)" ]; }

stop() {
  local jobs
  if [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1; then
    jobs=$(all_jobs)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel --quiet --signal=KILL --full $jobs 2>/dev/null || true
      # shellcheck disable=SC2086
      scancel --quiet $jobs 2>/dev/null || true
      wait_until 20 "jobs to end" no_jobs || true
    fi
  fi
  for node in "${NODES[@]}"; do
    stop_daemon "$DIR/run/slurmd-$node.pid"
  done
  stop_daemon "$DIR/run/slurmctld.pid"
  # Job steps of a killed slurmd, kernels, srun clients of this cluster: nothing stays.
  kill_leftovers
  kill_clients
  stop_daemon "$DIR/run/munged.pid"
  for ns in ks-head "${NODES[@]/#/ks-}"; do
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  # Job ids go on from the saved state next time; node spools start empty.
  rm -rf "$DIR/spool" "$DIR/run"
  say "stopped"
}

kill_clients() {  # srun/salloc left talking to this cluster (it is gone: they cannot end)
  local pid
  for pid in $(pgrep -x srun; pgrep -x salloc; pgrep -x sattach); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

ns_pids() {  # every process living in one of our namespaces (steps, kernels left)
  local ns
  for ns in ks-head "${NODES[@]/#/ks-}"; do
    [ -e "/run/netns/$ns" ] && ip netns pids "$ns" 2>/dev/null
  done
  return 0
}

kill_leftovers() {
  local pids
  pids=$(ns_pids)
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null || true
  wait_until 10 "processes in the node namespaces to exit" bash -c "[ -z \"\$(\"$0\" ns-pids)\" ]" || true
}

status() {
  [ -f "$CONF" ] || { echo "not configured ($CONF missing)"; return 1; }
  scontrol ping >/dev/null 2>&1 || { echo "slurmctld not answering"; return 1; }
  sinfo -N -h -o "%N %t %c %m" | sort -u
  nodes_idle_or_busy
}

nodes_idle_or_busy() {
  local up
  up=$(sinfo -h -N -t idle,mix,alloc,comp -o %N | sort -u | wc -l)
  [ "$up" -eq "${#NODES[@]}" ]
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  ns-pids) ns_pids ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
