#!/usr/bin/env bash
# The one-shot GPU check: versions, the GPU tests, CPU-vs-GPU training, compute-sanitizer
# on a small attention run, the attention benchmark, the fused kernels' tests and bench.
# At most about 13 minutes (the sum of the steps' limits), usually under 5; every step
# runs even when an earlier one failed, and the summary at the end gives each exit status.
#
#   OUT=/some/dir bash bench/gpu_check.sh        (OUT defaults to ./out/gpu_check)
#
# Logs and JSON land in $OUT: pytest_flash.log, train_check.{log,json}, pytest_gpu.log,
# sanitizer.log (memcheck + racecheck), attention_gpu.{log,json}, pytest_fused.log,
# fused_gpu.{log,json}, sanitizer_fused.log (memcheck, racecheck, synccheck).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
source bench/_gpu_steps.sh

step info 30 "$OUT/info.log" bash -c '
    nvidia-smi -L
    python3 -c "import sys, numpy; print(\"python\", sys.version.split()[0], \"numpy\", numpy.__version__)"
    python3 -c "import cupy; print(\"cupy\", cupy.__version__, \"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion())"
    python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())"
    command -v compute-sanitizer || echo "compute-sanitizer: not found"'

# Most important first: the whole check must fit a few minutes of device time, and a
# step cut short by the caller's limit still leaves the earlier logs in $OUT.
PER_TEST=()
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 120)
# The FlashAttention file runs without -x, so that one failing case does not hide the
# others; the rest of the GPU suite keeps -x.
step pytest_flash_attention 150 "$OUT/pytest_flash.log" \
    python3 -m pytest -m gpu -q -rfE --maxfail=30 "${PER_TEST[@]}" -p no:cacheprovider \
    tests/test_flash_attention_kernel.py
step train_cpu_vs_gpu 90 "$OUT/train_check.log" \
    python3 bench/gpu_train_check.py --steps 60 --out "$OUT/train_check.json"
step pytest_gpu 90 "$OUT/pytest_gpu.log" \
    python3 -m pytest -m gpu -q -x "${PER_TEST[@]}" -p no:cacheprovider \
    --ignore=tests/test_flash_attention_kernel.py --ignore=tests/test_fused_kernels.py tests

sanitize memcheck memcheck 60 "$OUT/sanitizer.log" python3 bench/flash_attention_small.py

step attention_bench 80 "$OUT/attention_gpu.log" \
    python3 bench/attention_gpu.py --budget 60 --out "$OUT/attention_gpu.json"

sanitize racecheck racecheck 60 "$OUT/sanitizer.log" python3 bench/flash_attention_small.py

# The fused training-step kernels (tinylm/kernels/fused.cu, off by default until these
# pass): their GPU tests without -x, then fused vs unfused timings.
step pytest_fused 60 "$OUT/pytest_fused.log" \
    python3 -m pytest -m gpu -q -rfE --maxfail=30 "${PER_TEST[@]}" -p no:cacheprovider \
    tests/test_fused_kernels.py
step fused_bench 50 "$OUT/fused_gpu.log" \
    python3 bench/fused_gpu.py --budget 35 --out "$OUT/fused_gpu.json"
for tool in memcheck racecheck synccheck; do
    sanitize "fused_$tool" "$tool" 40 "$OUT/sanitizer_fused.log" python3 bench/fused_small.py
done

# more checks below
#   step NAME LIMIT "$OUT/NAME.log" CMD ARGS...

echo
echo "=== summary ($(( $(date +%s) - T0 )) s in all; logs in $OUT)"
printf '%-24s %6s %6s\n' step exit secs
FAILED=0
for i in "${!NAMES[@]}"; do
    printf '%-24s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"
    case "${CODES[$i]}" in 0|skip) ;; *) FAILED=1 ;; esac
done
exit $FAILED
