"""Rollout throughput: our Ray-actor rollout vs raw `vllm.LLM.generate`, and the reference engine, on the
same tiny model, prompts and sampling settings, in one run. Prints generated tokens/s and the ratios.

Mode: vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), enforce_eager; CPU: fp32, tiny model, 2 cores;
`--gpu`: bf16, the ~0.85B Qwen3-MoE-style shape of bench/gpu_capture.py, the actor holds one GPU.

    python bench/rollout_throughput.py [--kind moe|dense] [--prompts 64] [--n 8] [--max-tokens 64] [--gpu]
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(k, v)


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + j) % 900 + 10 for j in range(8 + i % 8)] for i in range(n)]


def raw_vllm(model: str, ps, a) -> tuple[float, int]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=a.dtype, enforce_eager=True, max_model_len=512, seed=0, logprobs_mode="processed_logprobs",
              **({"gpu_memory_utilization": 0.35} if a.gpu else {}))
    sp = SamplingParams(n=a.n, temperature=1.0, max_tokens=a.max_tokens, ignore_eos=True, seed=0, logprobs=0, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)  # warm-up (JIT of every batch shape)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
    del llm
    gc.collect()
    return dt, toks


def ours(model: str, engine: str, ps, a) -> tuple[float, int]:

    from rollout.engine import EngineConfig, SamplingConfig
    from rollout.manager import RolloutManager

    mgr = RolloutManager(EngineConfig(model=model, engine=engine, max_model_len=512, seed=0, dtype=a.dtype,
                                      gpu_memory_utilization=0.35), num_engines=1,
                         chunk_prompts=len(ps), num_cpus=1, num_gpus=1 if a.gpu else 0)
    sp = SamplingConfig(n=a.n, temperature=1.0, max_tokens=a.max_tokens, seed=0, ignore_eos=True)
    mgr.generate(ps, sp)
    t0 = time.perf_counter()
    samples = [s for g in mgr.generate(ps, sp) for s in g]
    dt = time.perf_counter() - t0
    mgr.shutdown()
    return dt, sum(len(s.response_ids) for s in samples)


def direct(model: str, ps, a) -> tuple[float, int]:
    """Our engine class in this process (what the actor holds), to split the actor's cost from Ray's."""
    from rollout.engine import EngineConfig, SamplingConfig
    from rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(EngineConfig(model=model, max_model_len=512, seed=0, dtype=a.dtype, gpu_memory_utilization=0.35))
    sp = SamplingConfig(n=a.n, temperature=1.0, max_tokens=a.max_tokens, seed=0, ignore_eos=True)
    eng.generate(ps, sp)
    t0 = time.perf_counter()
    samples = [s for g in eng.generate(ps, sp) for s in g]
    return time.perf_counter() - t0, sum(len(s.response_ids) for s in samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="moe")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--gpu", action="store_true")
    a = p.parse_args()
    a.dtype = "bfloat16" if a.gpu else "float32"
    import ray

    from rollout.tiny_models import build_tiny_model

    shape = {}
    if a.gpu:
        from gpu_weight_sync import SHAPE as shape  # (bench/ is on sys.path) the same ~0.85B MoE as the other GPU benches
    model = str(build_tiny_model(a.kind, tempfile.mkdtemp(prefix="bench-rollout-"), seed=0, eos_token_id=None,
                                 dtype=a.dtype, **shape))
    ps = prompts(a.prompts)
    t_raw, n_raw = raw_vllm(model, ps, a)
    ray.init(num_cpus=2, num_gpus=1 if a.gpu else 0, include_dashboard=False, log_to_driver=False)
    t_ours, n_ours = ours(model, "vllm", ps, a)
    t_ref, n_ref = ours(model, "reference", ps, a) if not a.gpu else (float("nan"), 0)
    ray.shutdown()
    t_dir, n_dir = direct(model, ps, a) if a.gpu else (float("nan"), 0)
    where = "GPU (" + __import__("torch").cuda.get_device_name(0) + ")" if a.gpu else "CPU"
    print(f"{'0.85B' if a.gpu else 'tiny'} {a.kind}, {a.prompts} prompts x n={a.n}, {a.max_tokens} new tokens, {a.dtype}, "
          f"vLLM in-process, enforce_eager, {where}")
    for name, t, n in (("raw vllm.LLM.generate", t_raw, n_raw), ("ours: Ray actor + vLLM", t_ours, n_ours),
                       ("ours: reference engine", t_ref, n_ref), ("ours: VLLMEngine, no Ray", t_dir, n_dir)):
        if n:
            print(f"{name:26s} {n:6d} tokens in {t:6.2f} s = {n / t:8.1f} tok/s")
    print(f"ratio ours(vLLM actor) / raw vLLM   = {(n_ours / t_ours) / (n_raw / t_raw):.3f} (target >= 0.95)")
    if n_ref:
        print(f"ratio reference engine / raw vLLM   = {(n_ref / t_ref) / (n_raw / t_raw):.3f}")
    if n_dir:
        print(f"ratio VLLMEngine (no Ray) / raw vLLM = {(n_dir / t_dir) / (n_raw / t_raw):.3f}")


if __name__ == "__main__":
    main()
