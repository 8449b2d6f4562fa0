#!/bin/sh
# make soak: the model-based test (tests/test_model.py) run again and again, each run with a
# fresh random hypothesis seed, for SOAK_MINUTES minutes (default 30); stops at the first
# failure and prints the seed that reproduces it. At the end: how many examples ran, on how
# many distinct layouts and feature combinations.
#   SOAK_MINUTES=N            how long (the last run started in time is finished: a run of
#                             SOAK_EXAMPLES_PER_RUN examples takes one to two minutes)
#   SOAK_EXAMPLES_PER_RUN=N   examples per pytest run (default 50)
#   QCOWFS_MODEL_STEPS, QCOWFS_MODEL_BUDGET_MB   passed on to the test (see its docstring)
# Then the writable hostile-image suite (tests/hostile_write.py, issue 23): HOSTILE_WRITE_CASES
# damaged images written to by qcowfs and by QEMU, judged "never worse than it was"; every
# violation is printed with the seed that reproduces it (python tests/hostile_write.py --seed N).
#   HOSTILE_WRITE_CASES=N     how many (default 3000, about 7 minutes on 2 cores; 0: skip)
#   HOSTILE_WRITE_JOBS=N      in parallel (default 2)
#   HOSTILE_WRITE_MOUNT_CASES=N  more cases with qcowfs's session through a real writable FUSE
#                             mount (default 300; 0: skip)
# Then the offline commands against qemu-img on random chains (tests/differential.py):
#   DIFFERENTIAL_CASES=N      how many (default 300, about 5 minutes; 0: skip)
# Then check --repair against qemu-img check -r all on damaged images (tests/repair_differential.py):
#   REPAIR_CASES=N            how many (default 500, about 4 minutes; 0: skip)
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MINUTES=${SOAK_MINUTES:-30}
PER_RUN=${SOAK_EXAMPLES_PER_RUN:-50}
stats=$(mktemp /tmp/qcowfs-soak-XXXXXX.jsonl)
trap 'rm -f "$stats"' EXIT
start=$(date +%s)
end=$((start + MINUTES * 60))
runs=0
status=0
failed_seed=
while [ "$(date +%s)" -lt "$end" ]; do
    seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    runs=$((runs + 1))
    echo "soak: run $runs, --hypothesis-seed=$seed ($(( (end - $(date +%s) + 59) / 60 )) min left)"
    if ! QCOWFS_MODEL_EXAMPLES=$PER_RUN QCOWFS_MODEL_STATS=$stats \
            "$PY" -m pytest -q -p no:cacheprovider tests/test_model.py --hypothesis-seed="$seed"; then
        status=1
        failed_seed=$seed
        break
    fi
done
"$PY" - "$stats" "$start" <<'PY'
import json, sys, time
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
minutes = (time.time() - int(sys.argv[2])) / 60
print(f"soak: {minutes:.1f} minutes, {len(runs)} examples, {len({r['layout'] for r in runs})} distinct layouts, "
      f"{len({r['features'] for r in runs})} distinct feature combinations, "
      f"{sum(r['sessions'] for r in runs)} sessions, {sum(r['written'] for r in runs) / 2**20:.0f} MiB written "
      f"through qcowfs, {sum(r['failed'] for r in runs)} failed examples (shrinking included)")
PY
if [ "$status" -ne 0 ]; then
    echo "soak: FAILED; reproduce with: QCOWFS_MODEL_EXAMPLES=$PER_RUN $PY -m pytest tests/test_model.py --hypothesis-seed=$failed_seed"
fi
# One seeded suite: CASES cases from a random seed of TOOL (a script in tests/), its
# extra arguments after; a failure sets the status and says how to reproduce a case.
seeded() {  # seeded CASES "WHAT" "HOW A FAILURE IS REPRODUCED" TOOL [ARGS...]
    local cases=$1 what=$2 again=$3 tool=$4
    shift 4
    [ "$cases" -gt 0 ] || return 0
    local from
    from=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    echo "soak: $what, $cases cases from seed $from"
    if ! "$PY" "tests/$tool" --cases "$cases" --start "$from" "$@"; then
        status=1
        echo "soak: $what FAILED (each case above names its seed: $again)"
    fi
}
seeded "${HOSTILE_WRITE_CASES:-3000}" "hostile-write" "$PY tests/hostile_write.py --seed N" \
    hostile_write.py --jobs "${HOSTILE_WRITE_JOBS:-2}"
seeded "${HOSTILE_WRITE_MOUNT_CASES:-300}" "hostile-write through FUSE mounts" \
    "$PY tests/hostile_write.py --mount --seed N" hostile_write.py --mount --jobs "${HOSTILE_WRITE_JOBS:-2}"
seeded "${DIFFERENTIAL_CASES:-300}" "the commands against qemu-img" "$PY tests/differential.py --seed N" \
    differential.py
seeded "${REPAIR_CASES:-500}" "check --repair against qemu-img check -r all" \
    "$PY tests/repair_differential.py --seed N" repair_differential.py
exit $status
