#!/usr/bin/env bash
# GPU check of the integration: the GPU-marked tests of attention dispatch, training,
# amp and nn; `tinylm train --device cuda` end to end (with and without --half); and
# the CPU-vs-GPU loss curve of bench/gpu_train_check.py. About 2 minutes on an H200.
#
#   OUT=/some/dir bash bench/gpu_integration_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out/gpu_integration}"
mkdir -p "$OUT"
tinylm() { python3 -c "from tinylm.cli import main; main()" "$@"; }
codes=()

timeout 120 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_ops_attention.py \
    tests/test_train.py tests/test_amp.py tests/test_nn.py 2>&1 | tee "$OUT/pytest.log" | tail -15
codes+=("pytest=${PIPESTATUS[0]}")

for half in "" "--half"; do
    timeout 100 bash -c "$(declare -f tinylm); tinylm train --device cuda $half --max-steps 300 \
        --eval-every 150 --out '$OUT/run$half' && tinylm generate --model '$OUT/run$half' \
        --prompt 'The ' --max-new-tokens 80" > "$OUT/train$half.log" 2>&1
    codes+=("train$half=$?")
    grep -aE "val|loss|tok/s|Error" "$OUT/train$half.log" | tail -4
    tail -3 "$OUT/train$half.log"
done

timeout 90 python3 bench/gpu_train_check.py --steps 60 --out "$OUT/train_check.json" 2>&1 \
    | tee "$OUT/train_check.log" | tail -6
codes+=("train_check=${PIPESTATUS[0]}")
rm -rf "$OUT"/run*  # checkpoints are not needed back
echo "exit codes: ${codes[*]}"
