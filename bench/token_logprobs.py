"""Peak memory and time of `rl.algos.token_logprobs` (chunked) vs full logits + log_softmax, forward + backward.

Each variant runs in its own fresh process (same inputs, same seed); peak memory is the process's peak RSS
minus its RSS after the inputs were built, so it counts exactly what the log-prob computation adds.

    python bench/token_logprobs.py                      # B=1, L=4096, V=151936, H=1024
    python bench/token_logprobs.py --batch 8 --only chunked

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


def run_variant(variant: str, B: int, L: int, V: int, H: int, chunk: int) -> dict:
    import torch

    from rl.algos import token_logprobs

    torch.manual_seed(0)
    hidden = (torch.randn(B, L, H) * 0.05).requires_grad_()
    w = (torch.randn(V, H) * 0.02).requires_grad_()
    ids = torch.randint(0, V, (B, L))
    up = torch.randn(B, L)
    base = _rss_mb()
    t0 = time.perf_counter()
    if variant == "chunked":
        logp = token_logprobs(hidden, w, ids, chunk)
    else:
        logp = torch.log_softmax(hidden @ w.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    (logp * up).sum().backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "seconds": dt, "peak_extra_mb": peak - base,
            "checksum": float(hidden.grad.double().sum() + w.grad.double().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--only", choices=["chunked", "full"])
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.batch, a.seq, a.vocab, a.hidden, a.chunk)))
        return
    shape = f"B={a.batch} L={a.seq} V={a.vocab} H={a.hidden} chunk={a.chunk}"
    res = {}
    for variant in [a.only] if a.only else ["full", "chunked"]:
        cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(a.batch), "--seq", str(a.seq),
               "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk)]
        res[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r = res[variant]
        print(f"{variant:8s} {shape}: {r['seconds']:.2f} s fwd+bwd, peak extra memory {r['peak_extra_mb']:.0f} MB")
    if len(res) == 2:
        f, c = res["full"], res["chunked"]
        print(f"memory ratio full/chunked = {f['peak_extra_mb'] / c['peak_extra_mb']:.1f}x (target >= 4x)")
        print(f"time ratio chunked/full  = {c['seconds'] / f['seconds']:.2f}x (target <= 1.2x)")
        print(f"gradient checksums agree: {abs(f['checksum'] - c['checksum']) <= 1e-3 * abs(f['checksum']) + 1e-3}")


if __name__ == "__main__":
    main()
