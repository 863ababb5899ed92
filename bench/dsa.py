"""DSA attention vs dense attention as the sequence grows: time and peak memory, crossover, scaling exponent.

One attention layer, forward only, fp32, CPU (2 threads here). Dense: softmax(q k^T) v with a causal mask,
O(L^2 H d). DSA: the lightning indexer (O(L^2 J d_I) with J*d_I << H*d), a top-k, and attention over the k
gathered keys per query (O(L k H d)). The reference module in `rollout/dsa.py` masks dense scores to stay
bitwise exact; this bench times the gather form, which is what a sparse kernel computes.

What it cannot show: DeepSeek's gains come from an FP8 indexer kernel and a fused sparse-attention kernel
on GPU; here the indexer is plain fp32 matmuls and the gather materialises [L, k, H, d]. The exponents
(dense ~2, DSA ~2 with a far smaller constant from the indexer, plus the linear gather part) and the
crossover are what this shows.

    python bench/dsa.py [--lengths 256,512,1024,2048,4096] [--top-k 256]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time


def run_one(kind: str, L: int, top_k: int, H: int = 16, d: int = 64, J: int = 4, dI: int = 32) -> dict:
    import torch

    from rollout.dsa import LightningIndexer

    torch.manual_seed(0)
    hidden = H * d
    x = torch.randn(1, L, hidden)
    q, k, v = (torch.randn(1, H, L, d) for _ in range(3))
    idx = LightningIndexer(hidden, J, dI)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        if kind == "dense":
            s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
            out = s.softmax(-1) @ v
        else:
            scores = idx.scores(x, x)[0]  # [L, L]
            scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
            kk = min(top_k, L)
            sel = scores.topk(kk, -1).indices  # [L, kk]
            ks, vs = k[0][:, sel], v[0][:, sel]  # [H, L, kk, d]
            s = torch.einsum("hld,hlkd->hlk", q[0], ks) / math.sqrt(d)
            s = s.masked_fill(torch.isinf(scores.gather(-1, sel))[None], float("-inf"))
            out = torch.einsum("hlk,hlkd->hld", s.softmax(-1), vs)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"seconds": dt, "peak_mb": peak / 1024, "finite": bool(torch.isfinite(out).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), a.top_k)))
        return
    rows = []
    print(f"one attention layer, H=16 d=64, indexer J=4 d_I=32, top_k={a.top_k}, fp32 CPU, fresh process per point")
    print(f"{'L':>6s} {'dense s':>9s} {'dsa s':>9s} {'dense MB':>9s} {'dsa MB':>9s} {'dsa/dense time':>15s}")
    for L in map(int, a.lengths.split(",")):
        r = {kind: json.loads(subprocess.run([sys.executable, __file__, "--one", kind, str(L), "--top-k", str(a.top_k)],
                                             check=True, capture_output=True, text=True).stdout) for kind in ("dense", "dsa")}
        rows.append((L, r))
        print(f"{L:6d} {r['dense']['seconds']:9.3f} {r['dsa']['seconds']:9.3f} {r['dense']['peak_mb']:9.0f} "
              f"{r['dsa']['peak_mb']:9.0f} {r['dsa']['seconds'] / r['dense']['seconds']:15.2f}")
    cross = next((L for L, r in rows if r["dsa"]["seconds"] < r["dense"]["seconds"]), None)
    print(f"crossover (first L where DSA is faster): {cross}")
    for kind in ("dense", "dsa"):
        (l0, r0), (l1, r1) = rows[-2], rows[-1]
        slope = math.log(r1[kind]["seconds"] / r0[kind]["seconds"]) / math.log(l1 / l0)
        print(f"scaling exponent of {kind} time between L={l0} and L={l1}: {slope:.2f}")


if __name__ == "__main__":
    main()
