"""Peak memory and time of `rl.algos.token_logprobs` (chunked; `compiled`: its softmax passes compiled, as
under trainer.compile) vs full logits + log_softmax, forward (with the entropy, as the learner logs it) + backward.

Each variant runs in its own fresh process (same inputs, same seed), a warm-up step (the compilation) and then
`--reps` timed steps; `--rounds` runs the variants' processes interleaved that many times, and each ratio is the
median [min, max] over the rounds. Peak memory is the process's peak RSS (`--gpu`: CUDA's peak allocation)
minus what it held after the warm-up, so it counts exactly what the log-prob computation adds.

    python bench/token_logprobs.py                      # B=1, L=4096, V=151936, H=1024
    python bench/token_logprobs.py --batch 8 --only chunked
    python bench/token_logprobs.py --variants chunked,compiled --seq 1024 --rounds 5
    python bench/token_logprobs.py --gpu --batch 8 --seq 1024 --chunk 1024 --variants chunked,compiled --rounds 5

The issue's shape is B=8: there the full variant's logits alone are 8*4096*151936*4 B = 19.9 GB and
log_softmax doubles it, more than this 24 GiB machine has, so the side-by-side ratio is measured at B=1
(the ratio of the logits-dominated peak does not depend on B) and B=8 is run for the chunked variant only.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run_variant(variant: str, B: int, L: int, V: int, H: int, chunk: int, reps: int = 1, gpu: bool = False) -> dict:
    import statistics

    import torch

    from rl.algos import token_logprobs

    torch.manual_seed(0)
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    hidden = (torch.randn(B, L, H, device=dev) * 0.05).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=dev) * 0.02).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, L), device=dev)
    up = torch.randn(B, L, device=dev)

    def step():
        hidden.grad = w.grad = None
        if variant == "full":
            logq = torch.log_softmax((hidden @ w.T).float(), -1)
            logp = logq.gather(-1, ids[..., None]).squeeze(-1)
            ent = -(logq.exp() * logq).sum(-1).detach()
        else:
            logp, ent = token_logprobs(hidden, w, ids, chunk, return_entropy=True, compiled=variant == "compiled")
        (logp * up).sum().backward()
        if gpu:
            torch.cuda.synchronize()
        return float(ent.double().sum())

    step()  # warm-up: the compilation of `compiled` (its compiler's own memory is not the head's)
    hidden.grad = w.grad = None
    if gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
        with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        entropy = step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else _peak_rss_mb()
    return {"variant": variant, "seconds": statistics.median(times), "peak_extra_mb": peak - base, "entropy": entropy,
            "checksum": float(hidden.grad.double().sum() + w.grad.double().sum())}


def main() -> None:
    from benchstats import spread

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--only", choices=["chunked", "full", "compiled"], help="one variant (--variants chunked etc.)")
    p.add_argument("--variants", default="full,chunked", help="comma-separated: full, chunked, compiled")
    p.add_argument("--reps", type=int, default=1, help="timed steps per process after its warm-up (median)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved processes per variant (ratios: median [min, max])")
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16 hidden states and head (the learner's dtypes)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.batch, a.seq, a.vocab, a.hidden, a.chunk, a.reps, a.gpu)))
        return
    variants = [a.only] if a.only else a.variants.split(",")
    shape = f"B={a.batch} L={a.seq} V={a.vocab} H={a.hidden} chunk={a.chunk}{' bf16 GPU' if a.gpu else ' fp32 CPU'}"
    res: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(a.batch), "--seq", str(a.seq),
                   "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk), "--reps", str(a.reps)]
            res[variant].append(json.loads(subprocess.run(cmd + ["--gpu"] * a.gpu, check=True, capture_output=True,
                                                          text=True).stdout.splitlines()[-1]))
    for variant, runs in res.items():
        print(f"{variant:8s} {shape}: {spread([x['seconds'] for x in runs])} s fwd+bwd, peak extra memory "
              f"{spread([x['peak_extra_mb'] for x in runs], '.0f')} MB")

    def ratio(a_: str, b_: str, key: str) -> str:
        return spread([x[key] / y[key] for x, y in zip(res[a_], res[b_])], ".2f")

    if "full" in res and "chunked" in res:
        print(f"memory ratio full/chunked = {ratio('full', 'chunked', 'peak_extra_mb')}x (target >= 4x)")
        print(f"time ratio chunked/full  = {ratio('chunked', 'full', 'seconds')}x (target <= 1.2x)")
    if "compiled" in res and "chunked" in res:
        print(f"time ratio chunked/compiled = {ratio('chunked', 'compiled', 'seconds')}x, memory ratio "
              f"chunked/compiled = {ratio('chunked', 'compiled', 'peak_extra_mb')}x")
    for key in ("checksum", "entropy"):
        vals = [runs[0][key] for runs in res.values()]
        print(f"{key}s agree: {max(vals) - min(vals) <= 1e-3 * max(abs(v) for v in vals) + 1e-3} ({vals})")


if __name__ == "__main__":
    main()
