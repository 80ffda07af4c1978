#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU VM slice.
#
#   tools/launch_tpu.sh TPU_NAME ZONE [--project P] [--data_bucket B]... [--dry_run] -- --config=stage2_skip:paper --workdir=gs://... [overrides]
#
# Each worker: mount every --data_bucket read-only with gcsfuse at $DATA_MOUNT/B (default
# /tmp/gcsfuse/B; ArrayRecord shards are read by file path, so data.sources names the mount:
# Grain's and MaxText's setup_gcsfuse.sh do the same), cd to the repo, install it with the TPU
# extra (jax[tpu]: libtpu) at the locked versions (requirements/lock-cpu.txt pins jax, flax, ...
# for every platform), then
#   python -m experiments.run --distributed <your flags>
# `--distributed` calls jax.distributed.initialize(), which on TPU VMs discovers the slice by
# itself. Each worker keeps its own log in $LOG_DIR/<hostname>.log (default ~/genieblue_jax_logs).
# The repo must already be on every worker at $REPO_DIR (default ~/genieblue_jax), e.g.
# `gcloud compute tpus tpu-vm scp --recurse . TPU:~/genieblue_jax --worker=all`.
set -euo pipefail
usage() { sed -n '2,16p' "$0"; exit 2; }
[ $# -ge 2 ] || usage
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT=""; DRY_RUN=0; BUCKETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT="--project=$2"; shift 2 ;;
    --data_bucket) BUCKETS+=("${2#gs://}"); shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (training flags go after --)" >&2; usage ;;
  esac
done
[ $# -gt 0 ] || { echo "no training flags after --" >&2; usage; }
REPO_DIR=${REPO_DIR:-'~/genieblue_jax'}
LOG_DIR=${LOG_DIR:-'~/genieblue_jax_logs'}
DATA_MOUNT=${DATA_MOUNT:-/tmp/gcsfuse}
TRAIN_ARGS=$(printf '%q ' "$@")
MOUNTS=""
for b in "${BUCKETS[@]+"${BUCKETS[@]}"}"; do
  m=$(printf '%q' "$DATA_MOUNT/$b")
  # Read-only, metadata cached for the run (the shards do not change while it trains).
  MOUNTS+="mkdir -p $m && { mountpoint -q $m || gcsfuse -o ro --implicit-dirs --type-cache-max-size-mb=-1 \
--stat-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1 --metadata-cache-ttl-secs=-1 $(printf '%q' "$b") $m; } && "
done
REMOTE="set -o pipefail; ${MOUNTS}cd $REPO_DIR && mkdir -p $LOG_DIR && pip install -q -c requirements/lock-cpu.txt -e '.[tpu]' \
&& python -m experiments.run --distributed $TRAIN_ARGS 2>&1 | tee -a $LOG_DIR/\$(hostname).log"
CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT --worker=all --command="$REMOTE")
if [ "$DRY_RUN" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; else "${CMD[@]}"; fi
