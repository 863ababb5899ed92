#!/usr/bin/env bash
# The driver's step in one mode, this tree against git revision REV, side by side: 5 interleaved runs of
# `python -m rl.train --config-name quickstart` per tree (fresh process each, PYTHONPATH set so each imports its
# own tree), then the ratio median [min, max] of REV's median wall per step / this tree's (step 1 left out).
#   bash bench/modes_ab.sh HEAD~1 [rl.train overrides, default: trainer.mode=async trainer.steps=20 distill.enabled=false]
set -euo pipefail
rev=$1; shift
args=${*:-trainer.mode=async trainer.steps=20 distill.enabled=false}
root=$(git rev-parse --show-toplevel); py=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d /tmp/modes-ab-XXXX); trap 'git -C "$root" worktree remove --force "$work/rev" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$root" worktree add -q --detach "$work/rev" "$rev"
for i in 1 2 3 4 5; do
  for t in "$work/rev" "$root"; do
    run="$work/run-$i-$(basename "$t")"
    (cd "$t" && PYTHONPATH=$t RAY_ADDRESS= "$py" -m rl.train --config-name quickstart data.eval=null trainer.eval_every=0 \
      logging.wandb=false logging.plots=false trainer.run_dir="$run" $args >/dev/null 2>&1)
    echo "$t $run/metrics.jsonl"
  done
done > "$work/runs"
PYTHONPATH=$root/bench "$py" - "$work/runs" "$work/rev" "$rev" <<'PY'
import json, statistics as st, sys
from benchstats import spread
def wall(path):
    rows = [json.loads(line) for line in open(path)]
    return st.median(r["time/step"] for r in [r for r in rows if "train/loss" in r][1:])
rows = [line.split() for line in open(sys.argv[1])]
old = [wall(p) for t, p in rows if t == sys.argv[2]]
new = [wall(p) for t, p in rows if t != sys.argv[2]]
ratio = [a / b for a, b in zip(old, new)]
print(f"median wall per step, s: {sys.argv[3]}: {spread(old)}; this tree: {spread(new)}")
print(f"speed-up (REV / this tree), median [min, max] of {len(ratio)} interleaved runs: {spread(ratio)}")
PY
