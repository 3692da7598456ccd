#!/usr/bin/env bash
# Create a Cloud TPU VM slice.
#
# Usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]
#
#   --name NAME               name of the TPU VM slice
#   --zone ZONE               zone, e.g. us-central2-b
#   --accelerator-type TYPE   v4-N, v5litepod-N, v5p-N or v6e-N (e.g. v4-32)
#   --version VERSION         TPU runtime; default per generation:
#                               v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
#                               v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --project PROJECT         GCP project (default: the gcloud configuration's)
#   --spot                    use Spot capacity (cheaper, may be preempted)
#   --dry-run                 print the gcloud command instead of running it
#   -h, --help                show this help
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCEL='' VERSION='' SPOT=0
create_opt() {
  case $1 in
    --accelerator-type) need "$@"; ACCEL=$2 SHIFT=2 ;;
    --version) need "$@"; VERSION=$2 SHIFT=2 ;;
    --spot) SPOT=1 SHIFT=1 ;;
    *) return 1 ;;
  esac
}
parse_args create_opt tpu_opt -- "$@"
require_tpu
require ACCEL --accelerator-type
[[ $ACCEL =~ ^v(4|5litepod|5p|6e)-[0-9]+$ ]] ||
  die "bad accelerator type '$ACCEL' (expected v4-N, v5litepod-N, v5p-N or v6e-N)"

if [[ -z $VERSION ]]; then
  case $ACCEL in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
  esac
fi

args=(create "$NAME" --accelerator-type="$ACCEL" --version="$VERSION")
if ((SPOT)); then args+=(--spot); fi
tpu_vm "${args[@]}"
