"""Start-up of a run's actors: the learner and the engines one after the other (before) vs side by side
(`rl.components.actors`, what `rl.train` does), built from the config, interleaved repetitions in one Ray
session. Prints seconds per mode and the ratio sequential / parallel (median [min, max]).

    python bench/startup.py [--reps 5] [key=value ...]      # default: the quickstart, tiny dense model on vLLM
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchstats import spread

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    from rl import components
    from rl.cluster import ray_session
    from rl.config import load_config

    run_dir = tempfile.mkdtemp(prefix="bench-start-")
    cfg = load_config(["rollout=vllm", "model=tiny_dense", "distill.enabled=false", f"trainer.run_dir={run_dir}",
                       "~rewards.math.language", *a.overrides], "quickstart")
    s = components.setup(cfg)

    def sequential():
        return components.learner(cfg, s.model_path, s.kl_coefs), components.engines(cfg, s.model_path)

    def parallel():
        return components.actors(cfg, s.model_path, s.kl_coefs)

    times: dict[str, list[float]] = {"sequential": [], "parallel": []}
    with ray_session(cfg.cluster):
        for rep in range(a.reps + 1):  # rep 0 warms caches (imports, compiled kernels) for both
            for mode in (("sequential", "parallel") if rep % 2 else ("parallel", "sequential")):
                t0 = time.perf_counter()
                learner, engines = sequential() if mode == "sequential" else parallel()
                dt = time.perf_counter() - t0
                engines.shutdown()
                learner.shutdown()
                if rep:
                    times[mode].append(dt)
    ratios = [x / y for x, y in zip(times["sequential"], times["parallel"])]
    print(f"rollout.engine={cfg.rollout.engine} engine_gpus={cfg.rollout.engine_gpus} learner_gpus={cfg.trainer.learner_gpus}")
    for mode, v in times.items():
        print(f"{mode:10s} s median {spread(v, '.2f')}")
    print(f"ratio sequential / parallel: median {spread(ratios)} over {len(ratios)} interleaved reps")


if __name__ == "__main__":
    main()
