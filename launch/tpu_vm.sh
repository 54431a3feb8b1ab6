#!/usr/bin/env bash
# Training on a Cloud TPU VM (one host or a pod slice of many) with gcloud: create or reuse the
# VM, put this working tree on every worker, run the same train command on all of them (one JAX
# process per worker, joined by jax.distributed), stream the logs, delete the VM on request.
#
# Usage, from the repository root:
#   launch/tpu_vm.sh create          create the TPU VM, or reuse it if it exists
#   launch/tpu_vm.sh setup           copy this working tree (git-tracked and untracked files that
#                                    .gitignore does not exclude) to every worker and install it
#                                    with jax[tpu] in a virtual environment there
#   launch/tpu_vm.sh train [FLAGS]   start `python -m cxr_jax.train --config $CONFIG --workdir
#                                    $WORKDIR --config.parallel.distributed=auto FLAGS` on every
#                                    worker, detached from SSH, then stream the logs
#   launch/tpu_vm.sh run [FLAGS]     create, setup and train
#   launch/tpu_vm.sh logs            stream every worker's log (Ctrl-C stops the stream only)
#   launch/tpu_vm.sh stop            SIGTERM to the training on every worker: the processes agree
#                                    on a step, save a checkpoint and exit; `train` resumes
#   launch/tpu_vm.sh delete          delete the TPU VM
#
#   TPU_NAME=cxr-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     RUNTIME_VERSION=tpu-ubuntu2204-base CONFIG=configs/nih/densenet121.py \
#     WORKDIR=/mnt/runs/chexnet launch/tpu_vm.sh run --config.data.dir=/mnt/data/nih
#
# Variables:
#   TPU_NAME          required: the TPU VM's name
#   ZONE              required: its zone
#   PROJECT           the Google Cloud project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  for create: e.g. v4-8, v4-32, v5litepod-16
#   RUNTIME_VERSION   for create: the TPU software image, e.g. tpu-ubuntu2204-base (v4),
#                     v2-alpha-tpuv5-lite (v5e)
#   SPOT              for create: 1 makes a Spot VM (cheaper, may be preempted: `train` resumes)
#   CONFIG, WORKDIR   for train: the experiment config file (relative to the repository root) and
#                     the run directory. With several workers, WORKDIR must be on a filesystem
#                     that every worker mounts at the same path (e.g. gcsfuse or Filestore): all
#                     processes write their part of each checkpoint there, and process 0 the logs.
#                     The data folder (config.data.dir) must be readable at the same path on every
#                     worker.
#   PYTHON_VERSION    for setup: the workers' Python, installed with uv (default 3.12)
#   REMOTE_DIR        the project's folder in the workers' home folder (default: cxr_jax), replaced
#                     by setup; it holds the virtual environment .venv and train.log, the output
#                     of every `train` on that worker, appended
#
# SSH to all workers at once needs your key in an agent: ssh-add ~/.ssh/google_compute_engine.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0" >&2
  exit 2
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
action=$1
shift
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone, e.g. ZONE=us-central2-b}"
remote_dir=${REMOTE_DIR:-cxr_jax}
# setup replaces the folder: a plain name only, never "." or a path that could reach elsewhere.
[[ $remote_dir =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] ||
  die "REMOTE_DIR must be a folder name (in the workers' home folder), not '${remote_dir}'"
gcloud_flags=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  gcloud_flags+=(--project="$PROJECT")
fi
# Remote shell code that fails when a training started by `train` is still running.
not_training="if [[ -f ${remote_dir}/train.pid ]] && kill -0 \"\$(cat ${remote_dir}/train.pid)\" \
2>/dev/null; then echo \"\$(hostname): training is running (${remote_dir}/train.pid);\
 stop it first\" >&2; exit 1; fi"

# Runs a bash command line on every worker at once, from the home folder.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all \
    --command="$1"
}

create() {
  if gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_flags[@]}" >/dev/null 2>&1; then
    echo "tpu_vm.sh: reusing the existing TPU VM ${TPU_NAME}"
    return
  fi
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE to create the TPU VM, e.g. ACCELERATOR_TYPE=v4-8}"
  : "${RUNTIME_VERSION:?set RUNTIME_VERSION to create the TPU VM, e.g. tpu-ubuntu2204-base}"
  if [[ ${SPOT:-0} == 1 ]]; then
    set -- --spot
  else
    set --
  fi
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_flags[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
}

setup() {
  local repo tmp
  repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  tmp=$(mktemp -d)
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    tar --null -T - -czf "${tmp}/tree.tar.gz")
  gcloud compute tpus tpu-vm scp "${tmp}/tree.tar.gz" "${TPU_NAME}:cxr_jax_tree.tar.gz" \
    "${gcloud_flags[@]}" --worker=all
  rm -r "$tmp"
  # The project needs Python >= 3.11, newer than some TPU images' python3: uv brings its own.
  on_all_workers "set -euo pipefail
    ${not_training}
    rm -rf ${remote_dir} && mkdir ${remote_dir} && cd ${remote_dir}
    tar -xzf ~/cxr_jax_tree.tar.gz && rm ~/cxr_jax_tree.tar.gz
    [[ -x ~/.local/bin/uv ]] || curl -LsSf https://astral.sh/uv/install.sh | sh
    ~/.local/bin/uv venv --quiet --python $(printf '%q' "${PYTHON_VERSION:-3.12}") .venv
    ~/.local/bin/uv pip install --quiet --python .venv/bin/python -e . 'jax[tpu]'
    .venv/bin/python -c 'import cxr_jax, jax; print(jax.devices())'"
}

train() {
  : "${CONFIG:?set CONFIG to the experiment config file, e.g. CONFIG=configs/nih/densenet121.py}"
  : "${WORKDIR:?set WORKDIR to the run directory (shared by all workers on a pod slice)}"
  local command
  command=$(printf '%q ' .venv/bin/python -m cxr_jax.train --config "$CONFIG" \
    --workdir "$WORKDIR" --config.parallel.distributed=auto "$@")
  # setsid + nohup: the training outlives this SSH session; train.pid lets `stop` find it.
  on_all_workers "set -euo pipefail
    ${not_training}
    cd ${remote_dir}
    setsid nohup ${command} >>train.log 2>&1 </dev/null &
    echo \$! >train.pid"
  logs
}

logs() {
  on_all_workers "tail -n 20 -F ${remote_dir}/train.log | sed -u \"s/^/[\$(hostname)] /\""
}

stop() {
  on_all_workers "kill -TERM \"\$(cat ${remote_dir}/train.pid)\" &&
    echo \"\$(hostname): SIGTERM sent to the training\""
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_flags[@]}" --quiet
}

case $action in
  create | setup | logs | stop | delete)
    [[ $# -eq 0 ]] || die "'${action}' takes no arguments"
    "$action"
    ;;
  train) train "$@" ;;
  run)
    create
    setup
    train "$@"
    ;;
  *) usage ;;
esac
