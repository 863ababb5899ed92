#!/usr/bin/env bash
# The learner's step, this tree against git revision REV, side by side: 5 interleaved reps of
# `bench/learner_vs_trl.py --one ours` (fresh process each; PYTHONPATH set, since the venv's editable install
# would otherwise import this tree's code for both), then the ratio median [min, max] of REV's step time /
# this tree's. Model: a 4-layer dense model at Qwen3's vocabulary (the head dominates), built once.
#   bash bench/learner_ab.sh HEAD~1 [--batch 4 --prompt-len 128 --completion-len 384 --reps 3]
set -euo pipefail
rev=$1; shift
args=${*:---batch 4 --prompt-len 128 --completion-len 384 --reps 3}
root=$(git rev-parse --show-toplevel); py=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d /tmp/learner-ab-XXXX); trap 'git -C "$root" worktree remove --force "$work/rev" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$root" worktree add -q --detach "$work/rev" "$rev"
PYTHONPATH=$root "$py" -c "from rollout.tiny_models import build_tiny_model as b; b('dense', '$work/model', seed=0, hidden_size=512,
  intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=151936)" >/dev/null
for _ in 1 2 3 4 5; do
  for t in "$work/rev" "$root"; do
    (cd "$t" && PYTHONPATH=$t RAY_ADDRESS= "$py" bench/learner_vs_trl.py --one ours "$work/model" $args 2>/dev/null | tail -1 | sed "s|^|$t |")
  done
done > "$work/runs"
PYTHONPATH=$root/bench "$py" - "$work/runs" "$work/rev" "$rev" <<'PY'
import json, statistics as st, sys
from benchstats import spread
rows = [line.split(" ", 1) for line in open(sys.argv[1])]
old = [json.loads(r) for t, r in rows if t == sys.argv[2]]
new = [json.loads(r) for t, r in rows if t != sys.argv[2]]
ratio = [a["seconds"] / b["seconds"] for a, b in zip(old, new)]
print(f"step s {sys.argv[3]}: {spread([r['seconds'] for r in old])}; this tree: {spread([r['seconds'] for r in new])}")
print(f"speed-up (REV / this tree), median [min, max] of {len(ratio)} interleaved reps: {spread(ratio)}")
print(f"peak extra MB {sys.argv[3]}: {st.median(r['peak_extra_mb'] for r in old):.0f}; this tree: {st.median(r['peak_extra_mb'] for r in new):.0f}")
PY
