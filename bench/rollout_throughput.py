"""Rollout throughput: our rollout (the driver's `rl.components.engines`: a RolloutManager over a vLLM engine
actor, built from the config) vs raw `vllm.LLM.generate` on the same model, prompts and sampling settings,
interleaved in one run. Prints generated tokens/s per mode and the ratio ours / raw as the median of `--reps`
interleaved repetitions with its min and max (issue 19 target: >= 0.95).

Both sample n per prompt at temperature 1 with `ignore_eos` (equal work) and return the sampled token's
log-prob; raw vLLM gets the prompts in one call, as our manager hands each engine its share. CPU: the tiny
dense model in fp32 (vLLM in-process, 2 cores); `--gpu`: the config's auto settings on one GPU.

    python bench/rollout_throughput.py [--prompts 64] [--n 8] [--max-tokens 64] [--reps 5] [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

from benchstats import spread

for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(k, v)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + j) % 900 + 10 for j in range(8 + i % 8)] for i in range(n)]


def raw_llm(ecfg):
    """vllm.LLM with the engine settings ours uses (`rl.components.engine_config`, the routed-expert capture
    included), none of our code."""
    from vllm import LLM

    kw = {"gpu_memory_utilization": ecfg.gpu_memory_utilization} if __import__("torch").cuda.is_available() else {}
    if ecfg.enable_return_routed_experts:  # keep routing on a MoE: vLLM's capture is engine work, the same on both sides
        kw["enable_return_routed_experts"] = True
    return LLM(model=ecfg.model, dtype=ecfg.dtype, enforce_eager=ecfg.enforce_eager, max_model_len=ecfg.max_model_len,
               seed=0, **kw, **ecfg.extra)


def run_raw(llm, ps, sp) -> int:
    from vllm import SamplingParams

    params = SamplingParams(n=sp.n, temperature=sp.temperature, top_p=sp.top_p, max_tokens=sp.max_tokens, seed=sp.seed,
                            ignore_eos=True, logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs)


def run_ours(mgr, ps, sp) -> int:
    return sum(len(s.response_ids) for g in mgr.generate(ps, sp) for s in g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="config overrides (the driver's keys)")
    a = p.parse_args()
    import ray

    from rl import components
    from rl.config import load_config
    from rollout.tiny_models import build_tiny_model

    cfg = load_config(["rollout=vllm", "model=tiny_dense", f"rollout.n={a.n}", f"rollout.max_tokens={a.max_tokens}",
                       "rollout.max_model_len=512", "rollout.top_p=1.0", *a.overrides])
    gpus = __import__("torch").cuda.device_count()  # load_config resolved the 'auto' settings for them
    model = str(build_tiny_model(cfg.model.tiny, tempfile.mkdtemp(prefix="bench-rollout-"), seed=0, dtype=cfg.rollout.dtype,
                                 **cfg.model.tiny_overrides))
    ps = prompts(a.prompts)
    sp = dataclasses.replace(components.sampling(cfg.rollout, seed=0), ignore_eos=True)
    # the captures ours gets (keep routing on a MoE: vLLM's routed-expert capture), so both do the same engine work
    raw_cfg = components.engine_config(cfg.rollout, model, want=components.captures(cfg, model))
    llm = raw_llm(raw_cfg)
    ray.init(num_cpus=2, num_gpus=min(gpus, 1), include_dashboard=False, log_to_driver=False)
    mgr = components.engines(cfg, model)
    # A guard against regressions (39e0578 shipped raw without the capture). The bench's top_p=1.0 records no
    # kept sets, so the routed experts are the only capture to match.
    raw_cap, ours_cap = raw_cfg.enable_return_routed_experts, mgr.cfg.enable_return_routed_experts
    if raw_cap != ours_cap:
        raise SystemExit(f"rollout bench: raw vLLM's routed-expert capture {raw_cap} != ours {ours_cap}")
    rates: dict[str, list[float]] = {"raw": [], "ours": []}
    for rep in range(a.reps + 1):  # rep 0 warms both up (every batch shape)
        for mode in (("raw", "ours") if rep % 2 else ("ours", "raw")):
            t0 = time.perf_counter()
            toks = run_raw(llm, ps, sp) if mode == "raw" else run_ours(mgr, ps, sp)
            if rep:
                rates[mode].append(toks / (time.perf_counter() - t0))
    mgr.shutdown()
    ray.shutdown()
    ratios = [o / r for o, r in zip(rates["ours"], rates["raw"])]
    where = __import__("torch").cuda.get_device_name(0) if gpus else "CPU"
    print(f"tiny {cfg.model.tiny} {dict(cfg.model.tiny_overrides) or ''}, {a.prompts} prompts x n={a.n}, "
          f"{a.max_tokens} new tokens, {cfg.rollout.dtype}, "
          f"enforce_eager={cfg.rollout.enforce_eager}, routed-expert capture (both) {raw_cfg.enable_return_routed_experts}, {where}")
    for mode, v in rates.items():
        print(f"{mode:5s} tok/s median {spread(v, ',.0f')}")
    print(f"ratio ours / raw vLLM: median {spread(ratios)} "
          f"over {len(ratios)} interleaved reps (target >= 0.95)")


if __name__ == "__main__":
    main()
