#!/usr/bin/env bash
# Runs NUM_PROCESSES copies of a cxr_jax command on this machine, joined by jax.distributed on
# localhost: the multi-host code path (one mesh over all processes, each process reading its slice
# of the data, one writer) on one CPU box, for testing.
#
# Usage:
#   launch/local_multi_process.sh NUM_PROCESSES -- COMMAND [ARGS...]
#
#   launch/local_multi_process.sh 2 -- python -m cxr_jax.train \
#       --config configs/phantom.py --workdir /tmp/runs/two_processes
#
# Process i runs `COMMAND ARGS` followed by
#   --config.parallel.distributed=explicit --config.parallel.coordinator_address=localhost:$PORT
#   --config.parallel.num_processes=NUM_PROCESSES --config.parallel.process_id=i
# on CPU (JAX_PLATFORMS=cpu) with DEVICES_PER_PROCESS fake devices. Its output (stdout and stderr)
# is printed with the prefix "[i] ".
#
# Environment (all optional):
#   PORT                 coordinator port on localhost (default 12355; pick another for
#                        concurrent runs)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 4)
#   LOG_DIR              also write process i's output, unprefixed, to $LOG_DIR/process_i.log
#
# Ctrl-C or SIGTERM is passed on to every process as SIGTERM: they save a checkpoint at a step they
# agree on and exit; a second Ctrl-C or SIGTERM kills them. When one process fails, the others get
# SIGTERM, then SIGKILL after STOP_GRACE_S seconds (they may be blocked in a collective with the
# failed one), and the script exits with the failed process's status; otherwise it exits 0 once
# all have finished. Linux (needs setsid: each process runs in its own process group, so that a kill
# reaches its data-loading workers too).
set -euo pipefail

readonly STOP_GRACE_S=10

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0" >&2
  exit 2
}

die() {
  echo "local_multi_process.sh: $*" >&2
  exit 2
}

command -v setsid >/dev/null || die "needs setsid (util-linux)"
[[ $# -ge 3 && $2 == "--" ]] || usage
num_processes=$1
shift 2
command=("$@")
[[ $num_processes =~ ^[1-9][0-9]*$ ]] ||
  die "NUM_PROCESSES must be a positive integer, not '${num_processes}'"
port=${PORT:-12355}
devices_per_process=${DEVICES_PER_PROCESS:-4}
[[ $port =~ ^[0-9]+$ ]] || die "PORT must be a port number, not '${port}'"
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] ||
  die "DEVICES_PER_PROCESS must be a positive integer, not '${devices_per_process}'"
if [[ -n ${LOG_DIR:-} ]]; then
  mkdir -p "$LOG_DIR"
fi

# Prints each line of stdin with the prefix "[index] ".
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

declare -A running=()  # pid (= its process group) -> process index, while it runs
groups=()              # every process group started
kill_at=""             # SECONDS at which the processes still running get SIGKILL
interrupted=0

term_running() {
  local pid
  for pid in "${!running[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}

# SIGKILL to every group, including what an exited process left behind.
kill_all() {
  local group
  for group in "${groups[@]}"; do
    kill -KILL -- "-${group}" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317  # (called by the trap below)
on_interrupt() {
  if (( interrupted )); then
    echo "local_multi_process.sh: killing all processes" >&2
    kill_all
  else
    echo "local_multi_process.sh: stopping all processes (again to kill them)" >&2
    interrupted=1
    term_running
  fi
}

trap on_interrupt INT TERM
trap kill_all EXIT  # whatever ends the script, no process is left behind

# Process $1 of the job, in its own process group, its output prefixed (and copied to LOG_DIR).
run_process() {
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices_per_process}" \
    exec setsid "${command[@]}" \
    --config.parallel.distributed=explicit \
    --config.parallel.coordinator_address="localhost:${port}" \
    --config.parallel.num_processes="$num_processes" \
    --config.parallel.process_id="$1" \
    > >(if [[ -n ${LOG_DIR:-} ]]; then tee "${LOG_DIR}/process_$1.log"; else cat; fi |
        prefix_lines "$1") 2>&1
}

for ((i = 0; i < num_processes; i++)); do
  run_process "$i" &
  running[$!]=$i
  groups+=("$!")
done

status=0
while (( ${#running[@]} )); do
  for pid in "${!running[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid" && code=0 || code=$?
    index=${running[$pid]}
    unset "running[$pid]"
    if (( code != 0 && status == 0 )); then
      status=$code
      echo "local_multi_process.sh: process ${index} failed (exit ${code}); stopping the others" >&2
      term_running
      kill_at=$((SECONDS + STOP_GRACE_S))
    fi
  done
  if [[ -n $kill_at ]] && (( SECONDS >= kill_at )); then
    kill_all
  fi
  sleep 0.2
done
exit "$status"
