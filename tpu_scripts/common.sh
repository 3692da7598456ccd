# shellcheck shell=bash
# Helpers shared by the launch scripts in this folder; sourced, never run.
#
# Option parsing: every script lists its parser functions in `parse_args`.
# A parser looks at "$@"; if $1 is one of its options it consumes it, sets
# SHIFT to the number of words used and returns 0, otherwise it returns 1.

# Constants for the scripts that source this file.
# shellcheck disable=SC2034
{
  REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  REMOTE_REPO=kswap_jax  # checkout on every TPU worker, relative to $HOME
  REMOTE_LOGS=kswap_logs # per-worker run logs, relative to $HOME
}

DRY_RUN=0
SHIFT=0
NAME='' ZONE='' PROJECT=''
JOB='' CONFIG='' WORKDIR=''
EXTRA=()

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Prints the leading comment block of the running script.
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

# Joins words into one line that a POSIX shell splits back into the same words.
shell_join() {
  local line
  line=$(printf '%q ' "$@")
  printf '%s' "${line% }"
}

# Joins shell command lines with " && ".
chain() {
  local line
  printf -v line '%s && ' "$@"
  printf '%s' "${line% && }"
}

# Runs a command, or only prints it (one line, safely quoted) under --dry-run.
run() {
  if ((DRY_RUN)); then
    shell_join "$@"
    echo
  else
    "$@"
  fi
}

need() { (($# >= 2)) || die "$1 needs a value"; }

# require VAR OPTION: dies unless the variable named VAR is non-empty.
require() { [[ -n ${!1} ]] || die "missing $2 (see --help)"; }

parse_args() {
  local parsers=() p
  while [[ $1 != -- ]]; do parsers+=("$1"); shift; done
  shift
  while (($#)); do
    for p in "${parsers[@]}" common_opt; do
      if "$p" "$@"; then shift "$SHIFT"; continue 2; fi
    done
    die "unknown option: $1 (see --help)"
  done
}

common_opt() {
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 SHIFT=1 ;;
    *) return 1 ;;
  esac
}

# --name, --zone, --project of a TPU VM slice.
tpu_opt() {
  case $1 in
    --name) need "$@"; NAME=$2 ;;
    --zone) need "$@"; ZONE=$2 ;;
    --project) need "$@"; PROJECT=$2 ;;
    *) return 1 ;;
  esac
  SHIFT=2
}

# --job, --config, --workdir and `-- EXTRA...` (passed on to python -m kswap_jax).
job_opt() {
  case $1 in
    --job) need "$@"; JOB=$2 ;;
    --config) need "$@"; CONFIG=$2 ;;
    --workdir) need "$@"; WORKDIR=$2 ;;
    --) shift; EXTRA=("$@"); SHIFT=$(($# + 1)); return 0 ;;
    *) return 1 ;;
  esac
  SHIFT=2
}

require_tpu() {
  require NAME --name
  require ZONE --zone
}

require_job() {
  require JOB --job
  require CONFIG --config
  require WORKDIR --workdir
  [[ $JOB =~ ^(pretrain|swap|forget|dispose|sweep)$ ]] ||
    die "unknown job '$JOB' (pretrain, swap, forget, dispose or sweep)"
}

# The multi-host training command line, run with the python interpreter $1.
kswap_command() {
  shell_join "$1" -m kswap_jax "$JOB" --config "$CONFIG" --workdir "$WORKDIR" \
    --multihost ${EXTRA[@]+"${EXTRA[@]}"}
}

# Run names become log file names, so keep them to safe characters.
check_run_name() {
  [[ $1 =~ ^[A-Za-z0-9._-]+$ ]] || die "bad run name '$1' (use letters, digits, . _ -)"
}

# tpu_vm SUBCOMMAND ARG...: `gcloud compute tpus tpu-vm` with --zone/--project.
tpu_vm() {
  local flags=(--zone="$ZONE")
  [[ -z $PROJECT ]] || flags+=(--project="$PROJECT")
  run gcloud compute tpus tpu-vm "$@" "${flags[@]}"
}

# tpu_ssh WORKER COMMAND: run a shell command line on worker(s) of the slice.
tpu_ssh() { tpu_vm ssh "$NAME" --worker="$1" --command="$2"; }
