#!/usr/bin/env bash
# Submit a kswap_jax job to a SLURM GPU cluster.
#
# Writes an sbatch script and submits it. The job runs ONE process per node,
# each driving all of its node's GPUs:
#   srun --ntasks-per-node=1 VENV/bin/python -m kswap_jax JOB --config CONFIG \
#       --workdir WORKDIR --multihost [EXTRA...]
# jax.distributed.initialize() reads the coordinator, the process count and
# each process's id from SLURM's environment. By default JAX would then limit
# each process to the single GPU numbered by its SLURM_LOCALID (it assumes one
# process per GPU); the script exports JAX_LOCAL_DEVICE_IDS=0,...,G-1 so that
# every process uses all G GPUs of its node instead.
# The repository (with its venv, see --venv) must be on a file system that all
# nodes see; a relative WORKDIR is relative to the repository.
#
# Usage: slurm_launch.sh --job JOB --config CONFIG --workdir WORKDIR [options]
#                        [-- EXTRA...]
#
#   --job JOB              pretrain, swap, forget, dispose or sweep
#   --config CONFIG        configs/NAME.py[:ARGS]
#   --workdir WORKDIR      output directory, shared by all nodes
#   --nodes N              number of nodes (default 1)
#   --gpus-per-node G      GPUs per node (default 8)
#   --cpus-per-task C      CPU cores for each node's process (input pipeline);
#                          default: the cluster's default
#   --time T               time limit (default 24:00:00)
#   --partition P          partition (default: the cluster's default)
#   --job-name NAME        SLURM job name (default kswap-JOB)
#   --sbatch-opt OPT       extra #SBATCH option, repeatable
#                          (e.g. --sbatch-opt --account=myproj)
#   --venv DIR             virtual environment (default: REPO/.venv)
#   --log-dir DIR          where the script and SLURM output go
#                          (default: REPO/runs/slurm)
#   --dry-run              print the sbatch script and the sbatch command
#   -h, --help             show this help
#   -- EXTRA...            passed on, e.g. -- --config.seed=1
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NODES=1 GPUS=8 CPUS='' TIME=24:00:00 PARTITION='' JOB_NAME='' SBATCH_OPTS=()
VENV=$REPO_ROOT/.venv LOG_DIR=$REPO_ROOT/runs/slurm
slurm_opt() {
  case $1 in
    --nodes) need "$@"; NODES=$2 ;;
    --gpus-per-node) need "$@"; GPUS=$2 ;;
    --cpus-per-task) need "$@"; CPUS=$2 ;;
    --time) need "$@"; TIME=$2 ;;
    --partition) need "$@"; PARTITION=$2 ;;
    --job-name) need "$@"; JOB_NAME=$2 ;;
    --sbatch-opt) need "$@"; SBATCH_OPTS+=("$2") ;;
    --venv) need "$@"; VENV=$2 ;;
    --log-dir) need "$@"; LOG_DIR=$2 ;;
    *) return 1 ;;
  esac
  SHIFT=2
}
parse_args slurm_opt job_opt -- "$@"
require_job
for n in "$NODES" "$GPUS" "${CPUS:-1}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "--nodes, --gpus-per-node and --cpus-per-task need a positive number"
done
JOB_NAME=${JOB_NAME:-kswap-$JOB}
[[ $VENV == /* ]] || VENV=$PWD/$VENV # the job runs in the repository

srun_args=(srun --ntasks-per-node=1)
sbatch_opts=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1
  --gpus-per-node="$GPUS" --time="$TIME" --output="$LOG_DIR/%x-%j.out")
[[ -z $PARTITION ]] || sbatch_opts+=(--partition="$PARTITION")
if [[ -n $CPUS ]]; then
  sbatch_opts+=(--cpus-per-task="$CPUS")
  srun_args+=(--cpus-per-task="$CPUS") # srun does not always inherit it
fi
sbatch_opts+=(${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"})

sbatch_script() {
  echo '#!/usr/bin/env bash'
  printf '#SBATCH %s\n' "${sbatch_opts[@]}"
  echo '# One process per node, using all its GPUs (see tpu_scripts/slurm_launch.sh).'
  echo 'set -euo pipefail'
  echo "cd $(shell_join "$REPO_ROOT")"
  echo "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))"
  echo "$(shell_join "${srun_args[@]}") $(kswap_command "$VENV/bin/python")"
}

script=$LOG_DIR/$JOB_NAME.sbatch
if ((DRY_RUN)); then
  sbatch_script
else
  mkdir -p "$LOG_DIR"
  sbatch_script >"$script"
fi
run sbatch "$script"
