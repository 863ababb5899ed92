"""Samples -> padded training tensors (`rl.batch.collate`, on the learner's critical path every micro-batch):
this tree vs a git revision's `rl/batch.py`, interleaved, per batch shape. Prints ms per call of each and the
ratio old / new as the median [min, max] of `--reps` interleaved repetitions (each the mean of `--calls` calls).

    python bench/collate.py [--against REV] [--reps 7] [--calls 20]
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
import types

from benchstats import spread

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = [(8, 256, 1024), (256, 128, 512)]  # (samples, prompt, response): the GPU learner bench's batch; a step of 32 x 8


def old_collate(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:rl/batch.py"], capture_output=True, text=True, check=True).stdout
    mod = sys.modules["old_batch"] = types.ModuleType("old_batch")  # dataclasses look their module up
    exec(compile(src, f"{rev}:rl/batch.py", "exec"), mod.__dict__)
    return mod.collate


def samples(B: int, P: int, R: int, layers: int = 16, k: int = 4):
    import numpy as np

    from rollout.sample import Sample, Status

    rng = random.Random(0)
    return [Sample(prompt_ids=[rng.randrange(10, 151936) for _ in range(P)], response_ids=[rng.randrange(10, 151936) for _ in range(R)],
                   logprobs=[-rng.random() for _ in range(R)], loss_mask=[1] * R, status=Status.COMPLETED, advantage=0.5,
                   routed_experts=np.random.default_rng(b).integers(0, 32, (P + R - 1, layers, k), dtype=np.uint8))
            for b in range(B)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="HEAD~1", help="the revision whose rl/batch.py is the baseline")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    a = p.parse_args()
    from rl.batch import collate

    fns = {"old": old_collate(a.against), "new": collate}
    for B, P, R in SHAPES:
        for routed in (False, True):
            batch = samples(B, P, R)
            if not routed:
                for s in batch:
                    s.routed_experts = None
            ms = {k: [] for k in fns}
            for rep in range(a.reps + 1):  # rep 0: warm-up
                for k in (("old", "new") if rep % 2 else ("new", "old")):
                    t0 = time.perf_counter()
                    for _ in range(a.calls):
                        fns[k](batch)
                    if rep:
                        ms[k].append((time.perf_counter() - t0) / a.calls * 1e3)
            ratio = [o / n for o, n in zip(ms["old"], ms["new"])]
            print(f"B={B} prompt={P} response={R} routed={routed}: {a.against} {spread(ms['old'], '.2f')} ms, "
                  f"this tree {spread(ms['new'], '.2f')} ms; old / new {spread(ratio, '.2f')}x over {a.reps} reps")


if __name__ == "__main__":
    main()
