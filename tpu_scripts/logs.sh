#!/usr/bin/env bash
# Show, follow or download the log of a run started by launch.sh.
#
# Usage: logs.sh --name NAME --zone ZONE [options]
#
#   --name NAME         name of the TPU VM slice
#   --zone ZONE         its zone
#   --project PROJECT   GCP project (default: the gcloud configuration's)
#   --run RUN           run name given to launch.sh (default: the newest log)
#   --worker W          worker to read (default 0; `all` prints every worker's)
#   --lines N           show the last N lines (default 100)
#   --follow            keep streaming new lines (tail -F)
#   --fetch DIR         instead copy the log (all logs without --run) into
#                       DIR/worker-W/; needs a single worker
#   --dry-run           print the gcloud commands instead of running them
#   -h, --help          show this help
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN='' WORKER=0 LINES=100 FOLLOW=0 FETCH=''
logs_opt() {
  case $1 in
    --run) need "$@"; RUN=$2 SHIFT=2 ;;
    --worker) need "$@"; WORKER=$2 SHIFT=2 ;;
    --lines) need "$@"; LINES=$2 SHIFT=2 ;;
    --follow) FOLLOW=1 SHIFT=1 ;;
    --fetch) need "$@"; FETCH=$2 SHIFT=2 ;;
    *) return 1 ;;
  esac
}
parse_args logs_opt tpu_opt -- "$@"
require_tpu
[[ -z $RUN ]] || check_run_name "$RUN"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines needs a number"

if [[ -n $FETCH ]]; then
  [[ $WORKER =~ ^[0-9]+$ ]] || die "--fetch needs a single --worker number"
  dest=${FETCH%/}/worker-$WORKER
  run mkdir -p "$dest"
  if [[ -n $RUN ]]; then
    tpu_vm scp "$NAME:$REMOTE_LOGS/$RUN.log" "$dest/" --worker="$WORKER"
  else
    tpu_vm scp "$NAME:$REMOTE_LOGS" "$dest/" --worker="$WORKER" --recurse
  fi
  exit 0
fi

if [[ -n $RUN ]]; then
  file=$RUN.log
else
  # Expanded on the worker: its newest log.
  # shellcheck disable=SC2016
  file='"$(ls -t -- *.log | head -n 1)"'
fi
tail_args="-n $LINES"
if ((FOLLOW)); then tail_args+=" -F"; fi
tpu_ssh "$WORKER" "cd ~/$REMOTE_LOGS && tail $tail_args $file"
