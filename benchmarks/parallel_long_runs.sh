#!/usr/bin/env bash
# Several jobs of long_digits_runs.py at once on one machine (each in its own process, its own
# output folder and log): on a lent GPU, jobs side by side instead of one after another.
# Every 30 s and at the end the results (JSON, PNG, logs) are packed into ARCHIVE, and the saved
# walkers into ARCHIVE with "_walkers" before ".tar.gz", so that a run cut short still returns
# every job that finished.
#
#   bash benchmarks/parallel_long_runs.sh OUT ARCHIVE BUDGET_S MNIST_DIR JOB[:walkers] ...
#
# At most MAX_JOBS (default 4) run at a time, started in the order given as others end.
# BUDGET_S: seconds from the start after which a job still running is stopped (each job's
# long_digits_runs.py --budget is what is left of it when it starts);
# ":walkers" after a job name: also save its final walkers (--save-walkers). SMOKE=1: the jobs'
# tiny settings (--smoke), a check of the script on a CPU. PYTHON: the interpreter (python3).
set -u
if [ $# -lt 5 ]; then
  echo "usage: $0 OUT ARCHIVE BUDGET_S MNIST_DIR JOB[:walkers] ..." >&2
  exit 2
fi
out=$1 archive=$2 budget=$3 mnist=$4
shift 4
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
# several processes share the GPU: each takes a tenth of its memory instead of JAX's 75%
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.1}
export PYTHONUNBUFFERED=1

pack() {
  (cd "$out" && find . -name '*_walkers.npz' | tar czf "$archive.walkers.part" -T - \
    && tar czf "$archive.part" --exclude='*_walkers.npz' --exclude='*.tar.gz' .)
  mv "$archive.part" "$archive"
  mv "$archive.walkers.part" "${archive%.tar.gz}_walkers.tar.gz"
}

# wait until fewer than $1 jobs run, packing the results every 30 s
wait_below() {
  while [ "$(jobs -rp | wc -l)" -ge "$1" ]; do
    sleep 5
    if [ $((SECONDS - packed)) -ge 30 ]; then
      pack
      packed=$SECONDS
      echo "$((SECONDS - start)) s: $(jobs -rp | wc -l) jobs running"
    fi
  done
}

start=$SECONDS packed=$SECONDS
for spec in "$@"; do
  wait_below "${MAX_JOBS:-4}"
  left=$((budget - (SECONDS - start)))
  job=${spec%%:*}
  extra=()
  [ "${SMOKE:-0}" = 1 ] && extra=(--smoke)
  [ "$spec" != "$job" ] && [ "${spec#*:}" = walkers ] && extra+=(--save-walkers)
  "$python" "$here/long_digits_runs.py" --out "$out/$job" --mnist-dir "$mnist" --only "$job" \
    --budget "$left" --archive "$out/$job/.archive.tar.gz" --progress "${extra[@]}" \
    >"$out/$job.log" 2>&1 &
  echo "$((SECONDS - start)) s: started $job ($left s left)"
done
wait_below 1
pack
for spec in "$@"; do
  job=${spec%%:*}
  echo "== $job: $(grep -h '^job ' "$out/$job.log")"
done
