#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing the SLURM profile for real.
#   tests/slurm/cluster.sh start DIR   # install (Debian packages) if needed, configure, start
#   tests/slurm/cluster.sh stop DIR    # stop the daemons it started, by PID
# Needs root. No systemd, no cgroups: proctrack/linuxproc and task/none. Two GPUs are declared
# as GRES backed by character device files (major 195, as NVIDIA's) made with mknod in DIR, so
# Slurm binds them and sets CUDA_VISIBLE_DEVICES for each job (no GPU is needed to test that).
# No accounting daemon: sacct does not work, use `--slurm-status-command squeue`.
set -euo pipefail
cmd=${1:?start or stop}
dir=$(realpath -m "${2:-/tmp/virnucpro-slurm}")
host=$(hostname -s)

stop() {
    local pidfile pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

if [[ $cmd == stop ]]; then
    stop
    for f in slurm.conf gres.conf; do
        if [[ -L /etc/slurm/$f && $(readlink "/etc/slurm/$f") == "$dir/$f" ]]; then rm -f "/etc/slurm/$f"; fi
    done
    if [[ -s $dir/munge_dir ]]; then rm -rf "$(cat "$dir/munge_dir")" "$dir/munge_dir"; fi
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null
fi
stop
mkdir -p "$dir"/{state,spool,log,dev}
# munge: a key of its own, in a folder the munge user can reach (DIR may be private to root)
munge_dir=$(cat "$dir/munge_dir" 2>/dev/null || mktemp -d /tmp/virnucpro-munge.XXXXXX)
echo "$munge_dir" > "$dir/munge_dir"
chmod 755 "$munge_dir"
if [[ ! -s $munge_dir/munge.key ]]; then
    dd if=/dev/urandom of="$munge_dir/munge.key" bs=1024 count=1 status=none
fi
chown -R munge:munge "$munge_dir"
chmod 400 "$munge_dir/munge.key"
mkdir -p /run/munge && chown munge:munge /run/munge
runuser -u munge -- /usr/sbin/munged --key-file="$munge_dir/munge.key" --socket=/run/munge/munge.socket.2 \
    --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" --force
for _ in $(seq 50); do [[ -s $munge_dir/munged.pid ]] && break; sleep 0.1; done
cp "$munge_dir/munged.pid" "$dir/munged.pid"

# two fake GPUs
for i in 0 1; do [[ -e $dir/dev/nvidia$i ]] || mknod "$dir/dev/nvidia$i" c 195 "$i"; done
# at least 4 CPUs declared (config_overrides lets slurmd accept more than the machine has): the test is
# about the two GPU jobs running at once, not about a 2-core CI machine fitting shard_index beside them
cpus=$(( $(nproc) < 4 ? 4 : $(nproc) ))
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=virnucpro-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=gpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$dir/gres.conf" <<CONF
NodeName=$host Name=gpu File=$dir/dev/nvidia[0-1]
CONF
# job steps (srun inside sbatch) look for /etc/slurm/slurm.conf: point it at this cluster's,
# unless the machine has a Slurm configuration of its own
mkdir -p /etc/slurm
for f in slurm.conf gres.conf; do
    if [[ ! -e /etc/slurm/$f ]] || grep -q "virnucpro-test" "/etc/slurm/$f" 2>/dev/null || [[ -L /etc/slurm/$f ]]; then
        ln -sfn "$dir/$f" "/etc/slurm/$f"
    else
        echo "/etc/slurm/$f exists and is not ours: not touching it" >&2
        exit 1
    fi
done
echo "# virnucpro-test" >> "$dir/gres.conf"
export SLURM_CONF=$dir/slurm.conf
/usr/sbin/slurmctld -f "$dir/slurm.conf"
/usr/sbin/slurmd -f "$dir/slurm.conf"
for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "slurm up: SLURM_CONF=$dir/slurm.conf"
        exit 0
    fi
    sleep 0.2
done
echo "slurm did not come up; logs in $dir/log" >&2
sinfo -N -l >&2 || true
tail -20 "$dir/log/"*.log >&2 || true
exit 1
