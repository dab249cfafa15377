#!/usr/bin/env bash
# The robustness matrix in parallel processes (a GPU machine with many cores, or a CPU machine with patience):
# first every cell's teacher (one process per teacher), then JOBS processes sharing the job list, validation and
# test split side by side. Rows land in OUT_DIR/robustness_matrix{_tune,}.csv as they finish.
#   OUT_DIR=benchmarks/results DEVICE=cuda JOBS=8 bash benchmarks/run_matrix.sh [extra robustness_matrix.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-benchmarks/results}
DEVICE=${DEVICE:-cpu}
JOBS=${JOBS:-2}
PY=${PY:-python3}
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
M="$PY benchmarks/robustness_matrix.py --device $DEVICE"
pids=()
for split in --tune ""; do
    for cell in ${TEACHER_CELLS:-vit-strong vit-heavy-own vit-ra-overconf}; do  # the distinct teachers
        $M $split --teachers-only --cells $cell > "$OUT_DIR/teacher_${cell}${split}.log" 2>&1 &
        pids+=($!)
    done
done
wait "${pids[@]}"
half=$(( (JOBS + 1) / 2 ))
pids=()
for ((k = 0; k < half; k++)); do
    $M --tune --shard $k/$half --csv "$OUT_DIR/robustness_matrix_tune.csv" "$@" > "$OUT_DIR/matrix_tune_$k.log" 2>&1 &
    pids+=($!)
    $M --shard $k/$half --csv "$OUT_DIR/robustness_matrix.csv" "$@" > "$OUT_DIR/matrix_test_$k.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
