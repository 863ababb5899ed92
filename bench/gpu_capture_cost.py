"""Cost of the engine captures (routed experts + sampling masks) on GPU, through the driver's construction
path: two vLLM engine actors built by `rl.components.engine_config` from `configs/gpu_real_shape.yaml`, one
with the captures the config asks for, one without, each on its own GPU, called alternately.

    python bench/gpu_capture_cost.py MODEL_DIR [--reps 5] [--prompts 16] [--n 8] [--max-tokens 256]

Prints generated tokens per second per rep and the ratio (captures / none) as median [min, max]. The two
engines sit on different GPUs of the same kind; the roles swap halfway to cancel a GPU difference.
"""
from __future__ import annotations

import argparse
import time

from benchstats import spread


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    a = p.parse_args()
    import random

    import ray

    from rl import components
    from rl.config import load_config
    from rollout.engine import SamplingConfig, engine_actor

    cfg = load_config([f"model.path={a.model}", "model.tiny=null", "~rewards.math.language"], "gpu_real_shape")
    want = components.captures(cfg, a.model)
    ray.init(include_dashboard=False, log_to_driver=False)
    actor = engine_actor(num_cpus=1, num_gpus=1)
    engines = {"captures": actor.remote(components.engine_config(cfg.rollout, a.model, want=want)),
               "none": actor.remote(components.engine_config(cfg.rollout, a.model, want=components.Captures(False, False)))}
    ray.get([e.ping.remote() for e in engines.values()])
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(64)] for _ in range(a.prompts)]
    sp = SamplingConfig(n=a.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=a.max_tokens,
                        seed=0, ignore_eos=True)
    rates = {k: [] for k in engines}
    for rep in range(a.reps + 1):
        for k in (("captures", "none") if rep % 2 else ("none", "captures")):
            t0 = time.time()
            out = [s for g in ray.get(engines[k].generate.remote(prompts, sp)) for s in g]
            dt = time.time() - t0
            if rep:  # rep 0 warms both up
                rates[k].append(sum(len(s.response_ids) for s in out) / dt)
            if k == "captures" and rep == 1:
                s = out[0]
                print(f"capture check: routed {None if s.routed_experts is None else s.routed_experts.shape}, "
                      f"kept rows {len(s.kept)}, mean kept set {s.kept.sizes().mean():.0f}, bytes/token {s.kept.nbytes / len(s.kept):.0f}")
    ratios = [c / n for c, n in zip(rates["captures"], rates["none"])]
    for k, v in rates.items():
        print(f"{k:9s} tok/s median {spread(v, ',.0f')}")
    print(f"throughput ratio captures/none: median {spread(ratios)} "
          f"over {len(ratios)} interleaved reps; captures {want}")


if __name__ == "__main__":
    main()
