#!/usr/bin/env bash
# One-shot GPU check of the FlashAttention kernels, both variants (v1: as verified on an
# H200; v2: cp.async pipelines, 32-row warps in the forward, FFMA exponents; SIMT v2:
# lse2 + larger d=128 tiles). About 3 minutes on an H200; every step runs even when an
# earlier one failed, each under a time limit, and the summary at the end gives each
# exit status, then a compact table of the timings.
#
#   OUT=/some/dir bash bench/gpu_kernel_check.sh     (OUT defaults to ./out/gpu_kernel_check)
#
# Steps (logs in $OUT):
#   info        GPU, Python, CuPy, torch versions                     info.log
#   warm        compile every kernel module in parallel processes: CuPy keeps them in
#               its on-disk cache (~/.cupy/kernel_cache), so later steps load, not build
#                                                                     warm.log
#   pytest      python3 -m pytest -m gpu ... tests/test_flash_attention_kernel.py
#               (both variants, float64 oracle, NaN poison, determinism)   pytest.log
#   memcheck    compute-sanitizer on bench/flash_attention_small.py (d=64) and on a
#   racecheck   small run of every v2 kernel at d=32 and 128, TINYLM_FA_VARIANT=v2
#                                                                     sanitizer.log
#   bench       bench/attention_gpu.py, T 1024/4096/16384, d 64/128, v1 and v2,
#               torch and naive CuPy (float32 and float16) rows   attention_gpu.{log,json}
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/out/gpu_kernel_check}"
mkdir -p "$OUT"
source bench/_gpu_steps.sh

step info 20 "$OUT/info.log" bash -c '
    nvidia-smi -L
    nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    python3 -c "import sys, numpy; print(\"python\", sys.version.split()[0], \"numpy\", numpy.__version__)"
    python3 -c "import cupy; print(\"cupy\", cupy.__version__, \"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion())"
    python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())"
    command -v compute-sanitizer || echo "compute-sanitizer: not found"'

# One process per module (dtype, head dim, kernel family, ldmatrix), 12 at a time.
step warm 90 "$OUT/warm.log" bash -c '
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
step pytest 120 "$OUT/pytest.log" \
    python3 -m pytest -m gpu -q -rfE --maxfail=20 "${PER_TEST[@]}" -p no:cacheprovider \
    --durations=5 tests/test_flash_attention_kernel.py


if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
        step "$tool" 75 "$OUT/sanitizer.log" env TINYLM_FA_VARIANT=v2 bash -c "
            compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/flash_attention_small.py
            a=\$?
            compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/flash_attention_small.py \\
                --head-dims 32,128 --T 130 --variant v2 --cases mma-float16,mma-bfloat16,simt-float32
            b=\$?
            exit \$(( a ? a : b ))"
    done
else
    skip memcheck "compute-sanitizer not on PATH"
    skip racecheck "compute-sanitizer not on PATH"
fi

step bench 80 "$OUT/attention_gpu.log" \
    python3 bench/attention_gpu.py --budget 55 --ms 150 --T 1024,4096,16384 --D 64,128 \
    --variants v1,v2 --out "$OUT/attention_gpu.json"

echo
echo "=== summary ($(( $(date +%s) - T0 )) s in all; logs in $OUT)"
printf '%-12s %6s %6s\n' step exit secs
FAILED=0
for i in "${!NAMES[@]}"; do
    printf '%-12s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"
    case "${CODES[$i]}" in 0|skip) ;; *) FAILED=1 ;; esac
done
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -1

# Compact table (from the JSON): TFLOP/s of the forward and of forward+backward, float16
# for torch and both variants, bfloat16 v2; float32 fwd+bwd milliseconds; and fwd+bwd
# speed-ups over naive CuPy of the same dtype.
python3 - "$OUT/attention_gpu.json" <<'EOF' || echo "(no benchmark JSON)"
import json, sys
res = json.load(open(sys.argv[1]))["results"]
get = {(r["impl"], r["dtype"], r.get("variant", ""), r["T"], r["D"]): r for r in res}

def f(impl, dt, var, T, D, key, fmt="{:6.1f}"):
    r = get.get((impl, dt, var, T, D))
    return fmt.format(r[key]) if r and r.get("status") == "ok" else f"{'-':>{len(fmt.format(0.0))}}"

def ratio(num, den, T, D):
    a, b = get.get(num + (T, D)), get.get(den + (T, D))
    ok = a and b and a.get("status") == b.get("status") == "ok"
    return f"{a['fwd_bwd_ms'] / b['fwd_bwd_ms']:6.1f}" if ok else f"{'-':>6}"

print("TFLOP/s (fwd | fwd+bwd), fp32 fwd+bwd ms, and naive-over-ours fwd+bwd (same dtype)")
print(f"{'D':>4} {'T':>6} | {'f16 fwd: torch':>14} {'v1':>6} {'v2':>6} | {'f16 f+b: torch':>14} "
      f"{'v1':>6} {'v2':>6} | {'bf16 v2':>6} {'f+b':>6} | {'f32 ms v1':>9} {'v2':>6} "
      f"{'naive':>6} | {'x f32':>6} {'x f16':>6}")
for D in sorted({r["D"] for r in res}):
    for T in sorted({r["T"] for r in res}):
        print(f"{D:>4} {T:>6} | {f('torch','float16','',T,D,'fwd_tflops'):>14} "
              f"{f('tinylm','float16','v1',T,D,'fwd_tflops')} {f('tinylm','float16','v2',T,D,'fwd_tflops')} | "
              f"{f('torch','float16','',T,D,'fwd_bwd_tflops'):>14} "
              f"{f('tinylm','float16','v1',T,D,'fwd_bwd_tflops')} {f('tinylm','float16','v2',T,D,'fwd_bwd_tflops')} | "
              f"{f('tinylm','bfloat16','v2',T,D,'fwd_tflops')} {f('tinylm','bfloat16','v2',T,D,'fwd_bwd_tflops')} | "
              f"{f('tinylm','float32','v1',T,D,'fwd_bwd_ms','{:9.2f}')} "
              f"{f('tinylm','float32','v2',T,D,'fwd_bwd_ms')} {f('naive','float32','',T,D,'fwd_bwd_ms')} | "
              f"{ratio(('naive','float32',''), ('tinylm','float32','v2'), T, D)} "
              f"{ratio(('naive','float16',''), ('tinylm','float16','v2'), T, D)}")
EOF
exit $FAILED
