#!/bin/bash
# Is a change slower? `tinylm train` on nanoGPT's char recipe (examples/shakespeare_char.toml,
# one thread, 300 steps, no evaluation), this checkout against an older revision checked
# out in OLD (git worktree add /tmp/base REV), interleaved three times; ms/step is the
# median over the log windows of metrics.jsonl (tokens_per_s of 12 x 64 tokens per step).
#   bash bench/compare_revisions.sh [OLD_CHECKOUT] [CORPUS]
set -u
OLD=${1:-/tmp/base}
CORPUS=${2:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data/tinyshakespeare.txt}
NEW=$(cd "$(dirname "$0")/.." && pwd)
PY=$NEW/.venv/bin/python
TMP=$(mktemp -d)
for i in 1 2 3; do
  for side in new old; do
    if [ $side = new ]; then d=$NEW; else d=$OLD; fi
    out=$TMP/run-$side-$i; rm -rf $out
    (cd $d && OMP_NUM_THREADS=1 PYTHONPATH=$d $PY -c "from tinylm.cli import main; main()" \
      train --config $NEW/examples/shakespeare_char.toml --data "$CORPUS" \
      --threads 1 --max-steps 300 --eval-every 1000 --sample-tokens 0 --no-progress --out $out --cache-dir $TMP/cache-$side >/dev/null 2>&1)
    $PY - $out $side <<'PY'
import json, sys, statistics
recs=[json.loads(l) for l in open(sys.argv[1]+"/metrics.jsonl") if '"tokens_per_s"' in l]
ms=[768/r["tokens_per_s"]*1000 for r in recs[2:]]
print(sys.argv[2], "median ms/step %.2f over %d log windows, wall %.1f s" % (statistics.median(ms), len(ms), recs[-1]["elapsed_s"]))
PY
  done
done
