#!/usr/bin/env bash
# A real, throw-away Slurm cluster on this one machine, for trying spherinator-submit and for the `slurm` tests.
#
#   bash slurm/local_cluster.sh start    # install packages if missing, start everything, wait until it answers
#   bash slurm/local_cluster.sh status   # daemons (by recorded PID) and `sinfo`
#   bash slurm/local_cluster.sh env      # prints `export SLURM_CONF=...`: eval "$(bash slurm/local_cluster.sh env)"
#   bash slurm/local_cluster.sh stop     # cancels this cluster's jobs, stops only the daemons this script started
#
# What runs: munged (own key and socket), MariaDB (own datadir, 127.0.0.1 only), slurmdbd (so `sacct` works,
# which submitit needs), slurmctld and two slurmd: node1 on 127.0.0.11 and node2 on 127.0.0.12 (both on this
# host; /etc/hosts gets `127.0.0.11 node1` / `127.0.0.12 node2` so MASTER_ADDR=node1 resolves). Partition `debug`.
# Everything lives under one state dir, $SPHERINATOR_SLURM_DIR (default /var/tmp/spherinator-slurm); `start`
# wipes it unless the cluster is already up, so every start is from clean state. Ports: $SPHERINATOR_SLURM_PORT
# (default 16817) and the four after it, MariaDB on that + 5. Nothing is exported into your shell: Slurm
# commands find this cluster through SLURM_CONF (see `env`); jobs inherit it from the submitting shell.
# Needs root (package install, /etc/hosts, daemons running as root); measured facts: shared notes local-slurm.md.
set -euo pipefail

STATE="${SPHERINATOR_SLURM_DIR:-/var/tmp/spherinator-slurm}"
BASE_PORT="${SPHERINATOR_SLURM_PORT:-16817}"
CLUSTER=spherinator
PARTITION=debug
NODES=(node1 node2)
declare -A NODE_ADDR=([node1]=127.0.0.11 [node2]=127.0.0.12)
declare -A NODE_PORT=([node1]=$((BASE_PORT + 1)) [node2]=$((BASE_PORT + 2)))
CTLD_PORT=$BASE_PORT
DBD_PORT=$((BASE_PORT + 3))
DB_PORT=$((BASE_PORT + 5))
DB_PASS=spherinator-local # only reachable on 127.0.0.1, config files are mode 600
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

CONF="$STATE/etc/slurm.conf"
MUNGE_SOCKET="$STATE/munge/munge.socket"
DB_SOCKET="$STATE/mysql/mysql.sock"
export SLURM_CONF="$CONF" # for the commands this script runs; the caller's environment is left alone

log() { printf 'local_cluster: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

pid_alive() {
  # A <defunct> (zombie) process counts as stopped: PID 1 here reaps exited daemons late.
  local pid=$1 stat
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  stat=$(ps -o stat= -p "$pid" 2>/dev/null || true)
  [[ -n "$stat" && "$stat" != Z* ]]
}

recorded_pids() {
  # "name pid" per line for every daemon this script started.
  local f
  for f in "$STATE"/pids/*.pid; do
    [[ -e "$f" ]] || continue
    printf '%s %s\n' "$(basename "$f" .pid)" "$(cat "$f")"
  done
}

any_alive() {
  local name pid
  while read -r name pid; do
    pid_alive "$pid" && return 0
  done < <(recorded_pids)
  return 1
}

all_alive() {
  local name pid n=0
  while read -r name pid; do
    pid_alive "$pid" || return 1
    n=$((n + 1))
  done < <(recorded_pids)
  [[ $n -eq $((4 + ${#NODES[@]})) ]] # munged, mariadbd, slurmdbd, slurmctld + one slurmd per node
}

# Start "$@" detached (own session, no terminal, output to a log) and record its PID under pids/<name>.pid.
# The daemons run in the foreground (-D/-F) so that $! is the daemon itself, not a forking parent.
spawn() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
  echo $! >"$STATE/pids/$name.pid"
}

wait_for() {
  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
  local timeout=$1 what=$2 i
  shift 2
  for ((i = 0; i < timeout * 5; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up within ${timeout}s; logs under $STATE/log"
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $EUID -eq 0 ]] || die "packages missing (${missing[*]}) and not root: run as root or install them first"
  log "installing ${missing[*]} (apt-get, --no-install-recommends)"
  # The package scripts try to start services and are refused without systemd; harmless.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >"/tmp/spherinator-slurm-apt.log" 2>&1 ||
    die "apt-get update failed, see /tmp/spherinator-slurm-apt.log"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    </dev/null >>"/tmp/spherinator-slurm-apt.log" 2>&1 ||
    die "apt-get install ${missing[*]} failed, see /tmp/spherinator-slurm-apt.log"
}

ensure_hosts() {
  local node line
  for node in "${NODES[@]}"; do
    line="${NODE_ADDR[$node]} $node"
    if ! grep -qE "^${NODE_ADDR[$node]//./\\.}[[:space:]]+$node([[:space:]]|$)" /etc/hosts; then
      grep -qwE "$node" /etc/hosts && log "warning: /etc/hosts already names $node elsewhere; adding '$line'"
      # Append in place (not sed -i): /etc/hosts may be a bind mount that cannot be replaced.
      printf '%s # spherinator local slurm\n' "$line" >>/etc/hosts
    fi
  done
}

write_configs() {
  local host real_mem node
  host=$(hostname -s)
  # The machine's memory as slurmd sees it; each node claims all of it (one host, CR_Core schedules cores only).
  real_mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mkdir -p "$STATE"/{etc,munge,mysql,ctld,spool,log,pids,run}
  chmod 755 "$STATE/munge" # munged wants its socket directory searchable by all; the key itself is 600

  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$STATE/munge/munge.key"

  {
    cat <<EOF
# Written by slurm/local_cluster.sh; a throw-away cluster on one host.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Without cred_expire=10 and sched_interval=5 a requeued job waits 2-3 minutes before it restarts.
SchedulerParameters=bf_interval=5,sched_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# The munge socket for the slurmctld -> slurmdbd connection (AuthInfo does not cover that one).
AccountingStoragePass=$MUNGE_SOCKET
EOF
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeAddr=${NODE_ADDR[$node]} NodeHostname=$host Port=${NODE_PORT[$node]}" \
        "CPUs=$(nproc) RealMemory=$real_mem State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=$(
      IFS=,
      echo "${NODES[*]}"
    ) Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"

  cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/etc/slurmdbd.conf" # slurmdbd refuses a readable config holding a password
}

start_munge() {
  spawn munged munged -F --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/run/munged.pid" --seed-file="$STATE/munge/seed" --log-file="$STATE/log/munged.log"
  wait_for 10 munged bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"
}

start_mariadb() {
  local opts=(--no-defaults --datadir="$STATE/mysql/data" --user=root)
  mariadb-install-db "${opts[@]}" --auth-root-authentication-method=socket --skip-test-db \
    >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $STATE/log/mariadb-install.log"
  spawn mariadbd mariadbd "${opts[@]}" --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" --skip-log-bin \
    --innodb-buffer-pool-size=64M
  wait_for 30 MariaDB mariadb-admin --no-defaults -S "$DB_SOCKET" -u root ping
  mariadb --no-defaults -S "$DB_SOCKET" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
  [[ $(grep -cE ' idle$' <<<"$states") -eq ${#NODES[@]} ]]
}

cmd_start() {
  if [[ -d "$STATE/pids" ]] && all_alive && nodes_idle_or_busy; then
    log "already running (state $STATE)"
    usage_hint
    return 0
  fi
  [[ $EUID -eq 0 ]] || die "needs root (daemons run as root, /etc/hosts is edited); run it with sudo"
  install_packages
  if [[ -d "$STATE/pids" ]] && any_alive; then
    log "a partial cluster from an earlier start is running: stopping it first"
    cmd_stop
  fi
  rm -rf "$STATE" # clean state: a stale slurmctld state means ghost jobs and reused job ids
  ensure_hosts
  write_configs
  local t0=$SECONDS node
  start_munge
  start_mariadb
  spawn slurmdbd slurmdbd -D
  wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  spawn slurmctld slurmctld -D -i -f "$CONF"
  wait_for 30 slurmctld scontrol ping
  for node in "${NODES[@]}"; do
    spawn "slurmd-$node" slurmd -D -N "$node" -f "$CONF"
  done
  wait_for 60 "nodes ${NODES[*]} (idle in sinfo)" nodes_idle
  wait_for 30 sacct sacct -n -X -S now-1hours
  log "up in $((SECONDS - t0))s: partition $PARTITION, nodes ${NODES[*]}, state $STATE"
  usage_hint
}

nodes_idle_or_busy() {
  local states
  states=$(sinfo -h -N -p "$PARTITION" -o '%t' 2>/dev/null) || return 1
  [[ $(grep -cE '^(idle|mix|alloc)' <<<"$states") -eq ${#NODES[@]} ]]
}

usage_hint() {
  cat >&2 <<EOF
Use it from a shell with:
  export SLURM_CONF=$CONF     # or: eval "\$(bash slurm/local_cluster.sh env)"
  sinfo; sbatch -N2 --wrap 'srun hostname'; sacct
  spherinator-submit -c <config.yaml> --partition $PARTITION --nodes 1 --time 10
Stop it with: bash slurm/local_cluster.sh stop
EOF
}

cmd_stop() {
  if [[ ! -d "$STATE/pids" ]]; then
    log "nothing recorded under $STATE/pids: nothing to stop"
    return 0
  fi
  # Cancel this cluster's jobs first: their slurmstepd/job processes are not daemons we can kill by PID.
  if pid_alive "$(cat "$STATE/pids/slurmctld.pid" 2>/dev/null)"; then
    local jobs
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n "${jobs// /}" ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do
        [[ -z "$(squeue -h -o '%A' 2>/dev/null)" ]] && break
        sleep 0.2
      done
    fi
  fi
  local name pid order=()
  for name in "${NODES[@]}"; do order+=("slurmd-$name"); done
  order+=(slurmctld slurmdbd mariadbd munged)
  for name in "${order[@]}"; do
    [[ -f "$STATE/pids/$name.pid" ]] || continue
    pid=$(cat "$STATE/pids/$name.pid")
    if pid_alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 75); do
        pid_alive "$pid" || break
        sleep 0.2
      done
      if pid_alive "$pid"; then
        log "$name ($pid) ignored SIGTERM for 15s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$STATE/pids/$name.pid"
    log "stopped $name ($pid)"
  done
}

cmd_status() {
  if [[ -z "$(recorded_pids 2>/dev/null)" ]]; then
    echo "not running (no daemons recorded under $STATE/pids)"
    return 3
  fi
  local name pid rc=0
  while read -r name pid; do
    if pid_alive "$pid"; then echo "$name $pid running"; else
      echo "$name $pid stopped"
      rc=3
    fi
  done < <(recorded_pids)
  sinfo -N -o '%N %P %t %c' 2>/dev/null || rc=3
  return $rc
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
  echo "usage: bash slurm/local_cluster.sh start|stop|status|env   (state dir: $STATE)" >&2
  exit 2
  ;;
esac
