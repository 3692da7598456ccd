#!/usr/bin/env bash
# Start a kswap_jax job on every worker of a TPU VM slice at once.
#
# Each worker runs, in the background under nohup,
#   cd ~/kswap_jax && .venv/bin/python -m kswap_jax JOB --config CONFIG \
#       --workdir WORKDIR --multihost [EXTRA...]
# and writes its output to ~/kswap_logs/RUN.log on its own disk. The processes
# find each other through jax.distributed (no pmap); on a multi-host slice use
# a gs:// WORKDIR so that all hosts share checkpoints. A relative WORKDIR is
# relative to ~/kswap_jax; a leading ~ is not expanded.
#
# Usage: launch.sh --name NAME --zone ZONE --job JOB --config CONFIG
#                  --workdir WORKDIR [options] [-- EXTRA...]
#
#   --name NAME          name of the TPU VM slice
#   --zone ZONE          its zone
#   --project PROJECT    GCP project (default: the gcloud configuration's)
#   --job JOB            pretrain, swap, forget, dispose or sweep
#   --config CONFIG      configs/NAME.py[:ARGS]
#   --workdir WORKDIR    output directory (gs://bucket/path on multi-host slices)
#   --run RUN            log name (default: JOB-YYYYmmdd-HHMMSS)
#   --follow             then stream worker 0's log (Ctrl-C stops the stream,
#                        not the job)
#   --dry-run            print the gcloud commands instead of running them
#   -h, --help           show this help
#   -- EXTRA...          passed on, e.g. -- --config.seed=1 --config.lr=3e-4
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN='' FOLLOW=0
launch_opt() {
  case $1 in
    --run) need "$@"; RUN=$2 SHIFT=2 ;;
    --follow) FOLLOW=1 SHIFT=1 ;;
    *) return 1 ;;
  esac
}
parse_args launch_opt job_opt tpu_opt -- "$@"
require_tpu
require_job
RUN=${RUN:-$JOB-$(date +%Y%m%d-%H%M%S)}
check_run_name "$RUN"

log=$REMOTE_LOGS/$RUN.log
tpu_ssh all "$(chain "mkdir -p ~/$REMOTE_LOGS" "cd ~/$REMOTE_REPO") \
&& { nohup $(kswap_command .venv/bin/python) >~/$log 2>&1 </dev/null & }"
((DRY_RUN)) || echo "run $RUN started; follow it with: $(dirname "$0")/logs.sh --follow --name $NAME --zone $ZONE --run $RUN" >&2
if ((FOLLOW)); then
  tpu_ssh 0 "tail -n +1 -F ~/$log"
fi
