#!/usr/bin/env bash
# Delete a TPU VM slice, without a confirmation prompt (gcloud --quiet).
# Results on the workers' disks are lost: run fetch.sh first.
#
# Usage: delete.sh --name NAME --zone ZONE [--project PROJECT] [--dry-run]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args tpu_opt -- "$@"
require_tpu
tpu_vm delete "$NAME" --quiet
