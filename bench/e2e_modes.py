"""The driver end to end in sync and async mode, side by side: per-step time split (generate / score /
train / sync), wall time per step, and the async speed-up. Extra arguments are `rl.train` overrides.

    python bench/e2e_modes.py --steps 20 [OVERRIDES ...]                      # CPU: the quickstart config
    python bench/e2e_modes.py --steps 20 rollout=vllm rollout.engine_gpus=1 trainer.learner_gpus=1   # 2 GPUs

In async mode step k+1 generates while step k trains, so `time/generate` overlaps `time/train`; the
speed-up is measured on `time/step`, the wall time between consecutive steps' rows (step 1 left out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    out["wall_per_step"] = statistics.mean(r["time/step"] for r in later)
    out["reward_first"], out["reward_last"] = steps_rows[0].get("reward/math/total"), steps_rows[-1].get("reward/math/total")
    out["mismatch_kl_max"] = max(r.get("train/mismatch_kl", 0.0) for r in steps_rows)
    out["total_s"] = time.time() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    a, overrides = p.parse_known_args()
    res = {mode: run_mode(mode, a.steps, overrides) for mode in ("sync", "async")}
    print(f"{a.steps} steps, overrides: {' '.join(overrides) or '(none)'}")
    for mode, r in res.items():
        split = " ".join(f"{k.split('/')[1]}={r[k]:.2f}s" for k in KEYS)
        print(f"  {mode:5s}: {split}  wall/step={r['wall_per_step']:.2f}s  reward {r['reward_first']:.3f} -> "
              f"{r['reward_last']:.3f}  max mismatch KL {r['mismatch_kl_max']:.1e}  (whole run {r['total_s']:.0f} s)")
    print(f"  async speed-up (wall per step, sync / async) = {res['sync']['wall_per_step'] / res['async']['wall_per_step']:.2f}x")


if __name__ == "__main__":
    main()
