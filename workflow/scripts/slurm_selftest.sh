#!/usr/bin/env bash
# The SLURM profile, tested for real: brings up a one-node SLURM cluster on this machine, runs
# pipeline targets through snakemake-executor-plugin-slurm with workflow/profiles/slurm in a
# temporary copy of the repository, checks the outputs and that every job COMPLETED in SLURM,
# takes the cluster down again and prints "N passed, N failed" (exit 1 on any failure).
#
#   workflow/scripts/slurm_selftest.sh        # as root, from anywhere; about two minutes
#
# Needs root. Installs Debian's slurmctld, slurmd, slurm-client and munge with apt-get when they
# are missing; skips (exit 0, reason printed) where it cannot: not root, no apt-get and no SLURM,
# or SLURM daemons already running here (their cluster is not ours to reconfigure).
#
# The cluster: /etc/slurm/slurm.conf and gres.conf (the plugin's job step drops SLURM_CONF, so the
# config must sit where SLURM looks by default; any existing files are moved aside and put back
# at exit), a private munge key and socket, state and logs in a temporary folder, every address
# 127.0.0.1 (the daemons still listen on all interfaces; only holders of the munge key, made
# for this run and deleted after it, can talk to them).
# No accounting (jobs are checked with squeue/scontrol), proctrack/linuxproc and task/none (no
# cgroups in a container), DefMemPerCPU, and one fake `gpu` GRES (File=/dev/null) so that GPU
# rules are scheduled on a CPU node. munged, slurmctld and slurmd are stopped by PID at exit.
#
# Targets (the profile's config plans the GPU run; scale=smoke keeps it short):
#   results/smoke/e0_unfused/e0_unfused.csv  a smoke experiment (asks for no GPU)
#   figures/smoke/e0_unfused.png             a figure (1 CPU, small memory)
#   results/smoke/e3_hash/e3_hash.csv        a timed GPU rule: asks for gpu:1, gets the fake GRES
#                                            (no CUDA on the node: its GPU rows say skipped)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
PACKAGES=(slurmctld slurmd slurm-client munge)
TARGETS=(results/smoke/e0_unfused/e0_unfused.csv figures/smoke/e0_unfused.png results/smoke/e3_hash/e3_hash.csv)
GPU_JOB_RULE=rule_experiment_wildcards_smoke_e3_hash  # the plugin's --comment of the e3 job
SNAKEMAKE_LIMIT_S=240

say() { printf '[slurm-selftest] %s\n' "$*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*"; [ -n "${WORK:-}" ] && say "logs kept in $WORK"; echo "0 passed, 1 failed"; exit 1; }
WORK=""

# ------------------------------------------------------------------ preconditions, packages
[ "$(id -u)" = 0 ] || skip "needs root (starts munged, slurmctld, slurmd and writes /etc/slurm)"
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
  skip "SLURM daemons already run on this machine; not reconfiguring a cluster that is not ours"
fi
missing=()
for cmd in slurmctld slurmd sbatch squeue scontrol munged; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || skip "SLURM is not installed (${missing[*]} missing) and there is no apt-get"
  say "installing ${PACKAGES[*]} with apt-get (missing: ${missing[*]})"
  # Bounded: a held dpkg lock or an unreachable mirror fails here instead of hanging.
  { timeout 120 apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends \
      -o DPkg::Lock::Timeout=60 "${PACKAGES[@]}"; } >/tmp/fieldprint-slurm-apt.log 2>&1 ||
    { tail -20 /tmp/fieldprint-slurm-apt.log; fail "apt-get install (log above)"; }
fi
"$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null ||
  fail "$PY has no snakemake-executor-plugin-slurm (run make setup)"

# ------------------------------------------------------------------ cleanup (runs at any exit)
WORK=$(mktemp -d /tmp/fieldprint-slurm.XXXXXX)
CONF_DIR=/etc/slurm
BACKUP_SUFFIX=.fieldprint-selftest-backup
PIDS=()  # munged slurmctld slurmd, in start order

stop_pid() {  # stop_pid PID NAME: TERM, up to 10 s, then KILL
  local pid=$1 name=$2
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  say "$name ($pid) ignored TERM for 10 s: KILL"
  kill -KILL "$pid" 2>/dev/null
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ ${#PIDS[@]} -ge 2 ]; then  # slurmctld is up: end any job still in our cluster first
    local running
    running=$(timeout 10 squeue -h -o %i 2>/dev/null)
    # shellcheck disable=SC2086  # one argument per job id
    [ -n "$running" ] && timeout 10 scancel --full --quiet $running
  fi
  local names=(munged slurmctld slurmd)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}" "${names[$i]}"; done
  for f in slurm.conf gres.conf; do
    if [ -e "$WORK/moved.$f" ]; then
      mv -f "$CONF_DIR/$f$BACKUP_SUFFIX" "$CONF_DIR/$f"
    elif [ -e "$WORK/wrote.$f" ]; then
      rm -f "$CONF_DIR/$f"
    fi
  done
  [ "$rc" = 0 ] && rm -rf "$WORK"  # else kept: the failure message named it
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ config
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
mkdir -p "$WORK"/{state,spool,munge,munge-key} "$CONF_DIR"
chmod 0755 "$WORK" "$WORK/munge"  # munged wants its socket's folders searchable by all
for f in slurm.conf gres.conf; do
  # A backup left by a run that was killed outright holds the machine's real file: never overwrite it.
  [ -e "$CONF_DIR/$f$BACKUP_SUFFIX" ] &&
    fail "$CONF_DIR/$f$BACKUP_SUFFIX exists (left by an interrupted run): put it back as $CONF_DIR/$f first"
done
for f in slurm.conf gres.conf; do  # cleanup puts back what was moved ("moved.*") or removes ours
  if [ -e "$CONF_DIR/$f" ]; then
    mv "$CONF_DIR/$f" "$CONF_DIR/$f$BACKUP_SUFFIX" || fail "cannot move $CONF_DIR/$f aside"
    touch "$WORK/moved.$f"
  fi
  touch "$WORK/wrote.$f"
done
cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by fieldprint's workflow/scripts/slurm_selftest.sh; removed (or the previous file put back) at its exit.
ClusterName=fieldprint-selftest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/munge.socket
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
DefMemPerCPU=$((MEM_MB / CPUS))
GresTypes=gpu
# Without accounting, TRES records no GRES: the prolog writes down each job's GPUs instead.
Prolog=$WORK/prolog.sh
PrologFlags=Alloc
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=selftest Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$CONF_DIR/gres.conf" <<EOF
# Written by fieldprint's workflow/scripts/slurm_selftest.sh: a fake GPU, so GPU jobs can be scheduled on a CPU node.
NodeName=$HOST Name=gpu File=/dev/null
EOF

cat >"$WORK/prolog.sh" <<EOF
#!/bin/sh
echo "\$SLURM_JOB_ID \${SLURM_JOB_GPUS:-none}" >>"$WORK/allocated_gpus"
EOF
chmod 0755 "$WORK/prolog.sh"

# ------------------------------------------------------------------ daemons
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.5 s, bounded
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  say "timed out after ${limit}s waiting for $what"
  return 1
}
dump_logs() {
  for log in "$WORK"/munged.log "$WORK"/slurmctld.log "$WORK"/slurmd.log; do
    [ -e "$log" ] && { echo "== $log"; tail -25 "$log"; }
  done
}

dd if=/dev/urandom of="$WORK/munge-key/munge.key" bs=1024 count=1 status=none
chmod 0700 "$WORK/munge-key" && chmod 0400 "$WORK/munge-key/munge.key"
munged --foreground --force --key-file="$WORK/munge-key/munge.key" --socket="$WORK/munge/munge.socket" \
  --pid-file="$WORK/munge/munged.pid" --seed-file="$WORK/munge/munged.seed" \
  --log-file="$WORK/munged.log" >"$WORK/munged.out" 2>&1 &
PIDS+=($!)
wait_for 15 munged test -S "$WORK/munge/munge.socket" || { dump_logs; fail "munged did not start"; }
slurmctld -D -i >>"$WORK/slurmctld.out" 2>&1 &
PIDS+=($!)
wait_for 30 slurmctld scontrol ping || { dump_logs; fail "slurmctld did not answer"; }
slurmd -D >>"$WORK/slurmd.out" 2>&1 &
PIDS+=($!)
node_idle() { sinfo -h -N -o %T | grep -qx idle; }
wait_for 30 "node $HOST idle" node_idle || { sinfo -N -l; dump_logs; fail "node $HOST did not come up"; }
say "cluster up: $(sinfo -h -N -o '%N %T cpus=%c mem=%m gres=%G')"

# ------------------------------------------------------------------ the pipeline through SLURM
COPY=$WORK/repo
mkdir -p "$COPY"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$REPO" ls-files -z --cached --others --exclude-standard |
    (cd "$REPO" && tar --null -T - -cf - 2>/dev/null) | tar -xf - -C "$COPY"
else
  tar -C "$REPO" --exclude=./.venv --exclude=./results --exclude=./.snakemake -cf - . | tar -xf - -C "$COPY"
fi
say "running ${#TARGETS[@]} targets through the slurm executor (profile workflow/profiles/slurm)"
started=$(date +%s)
(cd "$COPY" &&
  PATH="$(dirname "$PY"):$PATH" PYTHONPATH="$COPY/src" timeout "$SNAKEMAKE_LIMIT_S" \
    "$PY" -m snakemake --workflow-profile workflow/profiles/slurm --config scale=smoke \
      --cores "$CPUS" --slurm-init-seconds-before-status-checks 3 "${TARGETS[@]}") \
  >"$WORK/snakemake.log" 2>&1
snakemake_rc=$?
say "snakemake exited $snakemake_rc after $(($(date +%s) - started)) s"

# ------------------------------------------------------------------ checks
passed=0 failed=0
check() {  # check DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then say "PASS $what"; passed=$((passed + 1)); else say "FAIL $what"; failed=$((failed + 1)); fi
}
gpus_of() { awk -v id="$1" '$1 == id {print $2}' "$WORK/allocated_gpus" 2>/dev/null; }  # from the prolog
job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }

check "snakemake exit status 0" test "$snakemake_rc" = 0
for t in "${TARGETS[@]}"; do check "output $t" test -s "$COPY/$t"; done
mapfile -t JOBS < <(sed -n 's/.*has been submitted with SLURM jobid \([0-9]*\).*/\1/p' "$WORK/snakemake.log")
check "one SLURM job per target (${#JOBS[@]} submitted)" test "${#JOBS[@]}" = "${#TARGETS[@]}"
all_jobs=$(squeue -h --states=all -o '%i %T' | sort -n)
check "every job in the cluster is one snakemake submitted" \
  test "$(awk '{print $1}' <<<"$all_jobs" | tr '\n' ' ')" = "$(printf '%s\n' "${JOBS[@]}" | sort -n | tr '\n' ' ')"
gpu_job=""
for id in "${JOBS[@]}"; do
  comment=$(job_field "$id" Comment)
  check "job $id ($comment) COMPLETED" test "$(job_field "$id" JobState)" = COMPLETED
  asked=$(job_field "$id" TresPerJob)$(job_field "$id" TresPerNode)
  got=$(gpus_of "$id")
  if [ "$comment" = "$GPU_JOB_RULE" ]; then
    gpu_job=$id
    check "job $id asked for a GPU (${asked:-nothing}) and was given GPU ${got:-?}" \
      test "$asked" = gres:gpu:1 -a -n "$got" -a "$got" != none
  else
    check "job $id asked for no GPU (${asked:-nothing}) and was given ${got:-?}" \
      test -z "$asked" -a "$got" = none
  fi
done
check "the GPU rule ran as a SLURM job" test -n "$gpu_job"

if [ "$failed" -gt 0 ]; then
  echo "== snakemake log (last 40 lines)"; tail -40 "$WORK/snakemake.log"
  echo "== squeue --states=all"; echo "$all_jobs"
  dump_logs
  say "logs kept in $WORK"
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
