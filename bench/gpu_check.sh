#!/usr/bin/env bash
# The one GPU check (issue 21): on a machine with an NVIDIA GPU, python3 with cupy, torch
# and pytest, from the repository root:
#
#   OUT=/some/dir bash bench/gpu_check.sh        (OUT defaults to ./out/gpu_check)
#
# Runs, most important first, each step under a time limit and the whole under
# BUDGET seconds (default 450, so under 8 minutes), every step even when an earlier
# one failed, then prints a summary labelled with `git rev-parse HEAD`:
#   info            GPU, Python, CuPy, torch, compute-sanitizer              info.log
#   warm            every FlashAttention module compiled in parallel processes (CuPy's
#                   on-disk cache; later steps load, not build)              warm.log
#   pytest_flash    -m gpu tests/test_flash_attention_kernel.py: the float64 oracle,
#                   the boundary sweep, spike visibility and row-wise errors (the same
#                   test functions as on the CPU emulator), both variants    pytest_flash.log
#   pytest_fused    -m gpu tests/test_fused_kernels.py                       pytest_fused.log
#   pytest_quant    -m gpu tests/test_quant_kernels.py (when it exists)      pytest_quant.log
#   fused_*         compute-sanitizer memcheck, racecheck, synccheck on bench/fused_small.py
#   flash_*         compute-sanitizer memcheck, racecheck on bench/flash_attention_small.py
#                   (d=64 default plan, then every v2 kernel at d=32 and 128) sanitizer*.log
#   attention_bench bench/attention_gpu.py (T=4096 first; v1, v2; torch, naive)  attention_gpu.*
#   fused_bench     bench/fused_gpu.py (fused vs composed ops)              fused_gpu.*
#   train_step      bench/gpu_train_check.py: CPU vs GPU loss curves and the char-model
#                   ms/step, fused kernels off (default) and on           train_check*.*
#   quant_bench     bench/quant_gpu.py (when it exists)                     quant_gpu.*
#   train_cli       `tinylm train --device cuda` (+ --half) and generate      train_cli.log
#   pytest_gpu      the rest of the -m gpu suite                             pytest_gpu.log
# Replaces bench/gpu_kernel_check.sh and bench/gpu_integration_check.sh.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (+ uncommitted changes)"
source bench/_gpu_steps.sh

step info 20 "$OUT/info.log" bash -c '
    echo "commit '"$COMMIT"'"
    nvidia-smi -L
    nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    python3 -c "import sys, numpy; print(\"python\", sys.version.split()[0], \"numpy\", numpy.__version__)"
    python3 -c "import cupy; print(\"cupy\", cupy.__version__, \"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion())"
    python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())"
    command -v compute-sanitizer || echo "compute-sanitizer: not found"'

# One process per module (dtype, head dim, kernel family, ldmatrix), 12 at a time.
step warm 75 "$OUT/warm.log" bash -c '
    python3 -c "from tinylm.kernels import flash_attention as fa
for s in fa.module_specs(): print(*s)" |
    xargs -P 12 -L 1 python3 -c "
import sys, time
from tinylm.kernels import flash_attention as fa
dtype, d, fam, ldm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == \"True\"
t = time.time()
fa.precompile(dtype, d, fam, ldm)
print(f\"compiled {dtype:>8} d={d:<3} family={fam} ldmatrix={ldm!s:5} {time.time() - t:5.1f} s\")"'

PER_TEST=()
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 60)
PYTEST=(python3 -m pytest -m gpu -q -rfE --maxfail=30 "${PER_TEST[@]}" -p no:cacheprovider)
step pytest_flash 100 "$OUT/pytest_flash.log" "${PYTEST[@]}" --durations=5 \
    tests/test_flash_attention_kernel.py
step pytest_fused 45 "$OUT/pytest_fused.log" "${PYTEST[@]}" tests/test_fused_kernels.py
if [ -f tests/test_quant_kernels.py ]; then
    step pytest_quant 45 "$OUT/pytest_quant.log" "${PYTEST[@]}" tests/test_quant_kernels.py
else
    skip pytest_quant "tests/test_quant_kernels.py not here"
fi

for tool in memcheck racecheck synccheck; do
    sanitize "fused_$tool" "$tool" 30 "$OUT/sanitizer_fused.log" python3 bench/fused_small.py
done
for tool in memcheck racecheck; do
    sanitize "flash_$tool" "$tool" 30 "$OUT/sanitizer.log" python3 bench/flash_attention_small.py
    sanitize "flash_v2_$tool" "$tool" 40 "$OUT/sanitizer.log" python3 bench/flash_attention_small.py \
        --head-dims 32,128 --T 130 --variant v2 --cases mma-float16,mma-bfloat16,simt-float32
done

step attention_bench 55 "$OUT/attention_gpu.log" \
    python3 bench/attention_gpu.py --budget 45 --ms 150 --T 4096,16384,1024 --D 64,128 \
    --variants v1,v2 --out "$OUT/attention_gpu.json"
step fused_bench 35 "$OUT/fused_gpu.log" \
    python3 bench/fused_gpu.py --budget 25 --out "$OUT/fused_gpu.json"
step train_step 45 "$OUT/train_check.log" \
    python3 bench/gpu_train_check.py --steps 40 --out "$OUT/train_check.json"
step train_step_fused 45 "$OUT/train_check_fused.log" env TINYLM_FUSED_KERNELS=1 \
    python3 bench/gpu_train_check.py --steps 40 --out "$OUT/train_check_fused.json"
if [ -f bench/quant_gpu.py ]; then
    step quant_bench 60 "$OUT/quant_gpu.log" python3 bench/quant_gpu.py --out "$OUT/quant_gpu.json"
else
    skip quant_bench "bench/quant_gpu.py not here"
fi
# the CLI end to end on the GPU (was bench/gpu_integration_check.sh), float32 and --half
tinylm() { python3 -c "from tinylm.cli import main; main()" "$@"; }
step train_cli 50 "$OUT/train_cli.log" bash -c "$(declare -f tinylm)
    for half in '' --half; do
        tinylm train --device cuda \$half --max-steps 150 --eval-every 150 --out '$OUT/run' &&
        tinylm generate --model '$OUT/run' --prompt 'The ' --max-new-tokens 40 || exit 1
        rm -rf '$OUT/run'
    done"
step pytest_gpu 60 "$OUT/pytest_gpu.log" python3 -m pytest -m gpu -q -x "${PER_TEST[@]}" \
    -p no:cacheprovider --ignore=tests/test_flash_attention_kernel.py \
    --ignore=tests/test_fused_kernels.py --ignore=tests/test_quant_kernels.py tests

summary
echo
echo "=== tests (last line of each log)"
for f in pytest_flash pytest_fused pytest_quant pytest_gpu; do
    [ -f "$OUT/$f.log" ] && printf '%-14s %s\n' "$f" "$(grep -E 'passed|failed|error|skipped' "$OUT/$f.log" | tail -1)"
done
echo
echo "=== char-model step (bench/gpu_train_check.py; ms/step)"
grep -h "ms/step" "$OUT"/train_check*.log 2>/dev/null | sed 's/^/  /'
[ -f "$OUT/train_check_fused.log" ] && echo "  (second line: TINYLM_FUSED_KERNELS=1)"
echo
echo "=== fused kernels vs composed (bench/fused_gpu.py)"
[ -f "$OUT/fused_gpu.log" ] && tail -n 12 "$OUT/fused_gpu.log"
echo
echo "=== attention, commit $COMMIT"
if [ -f "$OUT/attention_gpu.json" ]; then python3 bench/attention_gpu.py --table "$OUT/attention_gpu.json"; else echo "(no benchmark JSON)"; fi
exit $FAILED
