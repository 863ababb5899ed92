"""Keep sampling mask at a real vocabulary: bytes per token of the kept sets and the learner's step time with
the masks vs without, on a peaked distribution (a few dozen kept tokens) and a near-uniform one (top-p 0.95
keeps 95% of the vocabulary: the worst case, one ceil(V/8)-byte bitmap per token).

    python bench/kept_masks.py [--vocab 151936] [--hidden 1024] [--batch 8] [--resp 256] [--reps 5]

A one-layer dense model with the given vocabulary and hidden size (the head is where the masks cost), CPU. Each rep runs
the same batch's forward + backward (`Learner.accumulate_grads`) with keep_sampling_mask on and off,
interleaved; prints the median [min, max] of the time ratio (masks / none) per distribution.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def samples(vocab: int, batch: int, resp: int, kind: str, seed: int = 0):
    from rollout.sample import KeptSets, Sample, Status

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        toks = rng.integers(0, vocab, resp)
        if kind == "peaked":  # 20-50 kept ids around the sampled token
            rows = [np.union1d(rng.choice(vocab, rng.integers(19, 50), replace=False), [t]) for t in toks]
            kept = KeptSets.from_lists(rows, vocab)
        else:  # near-uniform: 95% of the vocabulary kept, the sampled token among them
            mask = rng.random((resp, vocab)) < 0.95
            mask[np.arange(resp), toks] = True
            kept = KeptSets.from_mask(mask)
        out.append(Sample(prompt_ids=rng.integers(0, vocab, 32).tolist(), response_ids=toks.tolist(),
                          logprobs=[-1.0] * resp, loss_mask=[1] * resp, status=Status.COMPLETED, kept=kept,
                          advantage=float(rng.normal())))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resp", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (the head matmul the masks ride on)")
    a = p.parse_args()
    import dataclasses

    from rl.learner import Learner, LearnerConfig, plan_step
    from rollout.tiny_models import build_tiny_model

    model = build_tiny_model("dense", tempfile.mkdtemp(prefix="kept-bench-"), vocab_size=a.vocab, hidden_size=a.hidden,
                             num_hidden_layers=1)
    on = Learner(LearnerConfig(model=str(model), micro_batch_size=a.batch))
    off_cfg = dataclasses.replace(on.cfg, keep_sampling_mask=False)
    for kind in ("peaked", "near_uniform"):
        batch = samples(a.vocab, a.batch, a.resp, kind)
        tokens = a.batch * a.resp
        nbytes = sum(s.kept.nbytes for s in batch)
        sizes = np.concatenate([s.kept.sizes() for s in batch])
        plan = plan_step(batch, 1, a.batch)
        times = {"masks": [], "none": []}
        for rep in range(a.reps + 1):
            for mode in (("masks", "none") if rep % 2 else ("none", "masks")):
                on.cfg = off_cfg if mode == "none" else dataclasses.replace(off_cfg, keep_sampling_mask=True)
                t0 = time.perf_counter()
                on.accumulate_grads(batch, plan)
                on.zero_grads()
                if rep:
                    times[mode].append(time.perf_counter() - t0)
        ratio = [m / n for m, n in zip(times["masks"], times["none"])]
        print(f"{kind:12s} median kept set {int(np.median(sizes)):>7,d}  bytes/token {nbytes / tokens:>8,.0f} "
              f"(padded int64 would be {8 * sizes.max():,})  step s: masks {statistics.median(times['masks']):.2f} "
              f"none {statistics.median(times['none']):.2f}  ratio median {statistics.median(ratio):.3f} "
              f"[{min(ratio):.3f}, {max(ratio):.3f}] over {a.reps} interleaved reps")


if __name__ == "__main__":
    main()
