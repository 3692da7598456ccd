#!/usr/bin/env bash
# Copy a run's workdir (checkpoints, metrics, plots) back to this machine.
#
# A gs:// workdir is synced with `gsutil -m rsync -r` straight into DEST.
# Otherwise the workdir is copied from a worker's disk (worker 0 by default)
# into DEST/<basename of workdir>; a relative workdir is taken, like
# launch.sh does, relative to ~/kswap_jax.
#
# Usage: fetch.sh --workdir WORKDIR --dest DEST [--name NAME --zone ZONE] [options]
#
#   --workdir WORKDIR   the --workdir given to launch.sh
#   --dest DEST         local directory to copy into
#   --name NAME         name of the TPU VM slice (not needed for gs://)
#   --zone ZONE         its zone (not needed for gs://)
#   --project PROJECT   GCP project (default: the gcloud configuration's)
#   --worker W          worker to copy from (default 0)
#   --dry-run           print the commands instead of running them
#   -h, --help          show this help
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEST='' WORKER=0
fetch_opt() {
  case $1 in
    --workdir) need "$@"; WORKDIR=$2 ;;
    --dest) need "$@"; DEST=$2 ;;
    --worker) need "$@"; WORKER=$2 ;;
    *) return 1 ;;
  esac
  SHIFT=2
}
parse_args fetch_opt tpu_opt -- "$@"
require WORKDIR --workdir
require DEST --dest

if [[ $WORKDIR == gs://* ]]; then
  run mkdir -p "$DEST"
  run gsutil -m rsync -r "$WORKDIR" "$DEST"
else
  require_tpu
  [[ $WORKDIR == /* ]] || WORKDIR=$REMOTE_REPO/$WORKDIR
  run mkdir -p "$DEST"
  tpu_vm scp "$NAME:$WORKDIR" "$DEST" --worker="$WORKER" --recurse
fi
