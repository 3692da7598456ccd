#!/usr/bin/env bash
# Install kswap_jax on every worker of a TPU VM slice.
#
# Packs the committed tree (`git archive HEAD`: commit your changes first),
# copies it to all workers, unpacks it to ~/kswap_jax and installs it into
# ~/kswap_jax/.venv with `pip install -e '.[tpu]'`. jax needs Python >= 3.11;
# where the image's python3 is older, a Python 3.12 is fetched with uv.
# Running it again updates the code and keeps the venv.
#
# Usage: setup.sh --name NAME --zone ZONE [options]
#
#   --name NAME            name of the TPU VM slice
#   --zone ZONE            its zone
#   --project PROJECT      GCP project (default: the gcloud configuration's)
#   --data-bucket GS_DIR   also make a TFDS data dir (gs://bucket[/path])
#                          available as ~/tensorflow_datasets on every worker
#   --data-mode MODE       copy: gsutil rsync it to the local disk (default)
#                          mount: mount it read-only with gcsfuse
#   --dry-run              print the commands instead of running them
#   -h, --help             show this help
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DATA_BUCKET='' DATA_MODE=copy
setup_opt() {
  case $1 in
    --data-bucket) need "$@"; DATA_BUCKET=$2 ;;
    --data-mode) need "$@"; DATA_MODE=$2 ;;
    *) return 1 ;;
  esac
  SHIFT=2
}
parse_args setup_opt tpu_opt -- "$@"
require_tpu
[[ $DATA_MODE == copy || $DATA_MODE == mount ]] || die "bad --data-mode '$DATA_MODE' (copy or mount)"
[[ -z $DATA_BUCKET || $DATA_BUCKET == gs://* ]] || die "--data-bucket must start with gs://"

tarball=kswap_jax-src.tar.gz
local_tarball=${TMPDIR:-/tmp}/$tarball
run git -C "$REPO_ROOT" archive --format=tar.gz --output="$local_tarball" HEAD
tpu_vm scp "$local_tarball" "$NAME:$tarball" --worker=all --recurse

make_venv='if python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"; then python3 -m venv .venv;'
make_venv+=' else curl -LsSf https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv venv --seed --python 3.12 .venv; fi'
tpu_ssh all "$(chain "mkdir -p ~/$REMOTE_REPO" "tar -xzf ~/$tarball -C ~/$REMOTE_REPO" \
  "rm ~/$tarball" "cd ~/$REMOTE_REPO" "{ [ -x .venv/bin/python ] || { $make_venv; }; }" \
  ".venv/bin/pip install -q --upgrade pip" ".venv/bin/pip install -q -e '.[tpu]'")"

[[ -n $DATA_BUCKET ]] || exit 0
tfds=tensorflow_datasets
if [[ $DATA_MODE == copy ]]; then
  tpu_ssh all "$(chain "mkdir -p ~/$tfds" "gsutil -m -q rsync -r $(shell_join "$DATA_BUCKET") ~/$tfds")"
else
  path=${DATA_BUCKET#gs://}
  mount_args=(-o ro --implicit-dirs)
  [[ $path != */* || -z ${path#*/} ]] || mount_args+=(--only-dir "${path#*/}")
  # The $(...) is expanded on the worker.
  # shellcheck disable=SC2016
  install_gcsfuse=$(chain \
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null' \
    'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null' \
    'sudo apt-get update -qq' 'sudo apt-get install -y -qq gcsfuse')
  tpu_ssh all "$(chain "{ command -v gcsfuse >/dev/null || { $install_gcsfuse; }; }" "mkdir -p ~/$tfds" \
    "{ mountpoint -q ~/$tfds || gcsfuse $(shell_join "${mount_args[@]}" "${path%%/*}") ~/$tfds; }")"
fi
