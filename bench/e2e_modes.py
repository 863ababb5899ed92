"""The driver end to end in sync and async mode, side by side: per-step time split (generate / score /
train / sync), wall time per step, and the async speed-up. Extra arguments are `rl.train` overrides.

    python bench/e2e_modes.py --steps 20 [OVERRIDES ...]                      # CPU: the quickstart config
    python bench/e2e_modes.py --steps 20 rollout=vllm rollout.engine_gpus=1 trainer.learner_gpus=1   # 2 GPUs

In async mode step k+1 generates while step k trains, so `time/generate` overlaps `time/train`; the
speed-up is measured on `time/step`, the wall time between consecutive steps' rows (step 1 left out), as the
ratio of the two modes' median steps (each printed with its min and max over the run's steps). `--reps R`
runs the modes alternately R times each and prints the median [min, max] of the R ratios.

The ceiling: a two-stage pipeline overlaps collection (generate + score, on the engines) with learning
(train + sync), so with the sync mode's means c and l the async speed-up is at most (c + l) / max(c, l), which
is 2 only when the stages are equal; the script prints that bound from the sync run beside the measured ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchstats import spread

KEYS = ("time/generate", "time/score", "time/train", "time/sync")  # per step, from metrics.jsonl


def run_mode(mode: str, steps: int, overrides: list[str]) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"e2e-{mode}-")
    cmd = [sys.executable, "-m", "rl.train", "--config-name", "quickstart", f"trainer.mode={mode}", f"trainer.steps={steps}",
           f"trainer.run_dir={run_dir}", "trainer.eval_every=0", "eval.max_prompts=16", "logging.wandb=false",
           "logging.plots=false", *overrides]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    steps_rows = [r for r in rows if "train/loss" in r]
    later = steps_rows[1:]  # step 1 includes the first generation and has no overlap yet
    out = {k: statistics.mean(r[k] for r in later) for k in KEYS}
    parts = sorted(k for k in later[0] if k.startswith("time/sync_"))  # the sync's split (rl.train.sync_weights)
    out["per_step"] = {k: [r[k] for r in later] for k in (*KEYS, *parts)}  # an outlier moves a mean: medians print too
    out["walls"] = [r["time/step"] for r in later]
    out["wall_per_step"] = statistics.median(out["walls"])
    out["reward_first"], out["reward_last"] = steps_rows[0].get("reward/math/total"), steps_rows[-1].get("reward/math/total")
    out["mismatch_kl_max"] = max(r.get("train/mismatch_kl", 0.0) for r in steps_rows)
    out["total_s"] = time.time() - t0
    out["auto"] = [line for line in res.stdout.splitlines() if line.startswith("auto settings:")]  # e.g. the sync transport
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=1, help="alternate sync and async runs this many times each")
    a, overrides = p.parse_known_args()
    runs = [{mode: run_mode(mode, a.steps, overrides) for mode in ("sync", "async")} for _ in range(a.reps)]
    print(f"{a.steps} steps per run, {a.reps} run(s) per mode alternating, overrides: {' '.join(overrides) or '(none)'}")
    for i, res in enumerate(runs):
        for mode, r in res.items():
            split = " ".join(f"{k.split('/')[1]}={r[k]:.2f}s" for k in KEYS)
            print(f"  [{i}] {mode:5s}: {split}  wall/step median [min, max] {spread(r['walls'], '.2f')} s  reward "
                  f"{r['reward_first']:.3f} -> {r['reward_last']:.3f}  max mismatch KL {r['mismatch_kl_max']:.1e}  "
                  f"(whole run {r['total_s']:.0f} s)")
            for line in r["auto"]:
                print(f"        {mode:5s} {line}")
            print(f"        {mode:5s} per-step median [min, max]: "
                  + " ".join(f"{k.split('/')[1]}={spread(v, '.2f')}" for k, v in r["per_step"].items()))
        s = res["sync"]
        c, l = s["time/generate"] + s["time/score"], s["time/train"] + s["time/sync"]
        print(f"  [{i}] score share of the sync step {s['time/score'] / (c + l):.1%}; pipeline ceiling (c + l) / max(c, l) = "
              f"{(c + l) / max(c, l):.2f}x with collect c = {c:.2f} s, learn l = {l:.2f} s")
    ratios = [res["sync"]["wall_per_step"] / res["async"]["wall_per_step"] for res in runs]
    print(f"  async speed-up (median wall per step, sync / async) = {spread(ratios, '.2f')}x over {len(ratios)} pair(s)")
    if os.environ.get("OUT"):  # every step's times, for the next look at where a step goes
        (Path(os.environ["OUT"]) / "e2e_modes.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
